"""Loading and scoring with models trained by openrlhf_irl (OpenRLHF-format checkpoints)."""

from openrlhf_irl.models.reward import RewardScorer  # noqa: F401
