"""Responses as every reward-model and DPO dataset of this package stores them.

OpenRLHF's SFT dataset without a chat template trains each response as ``response + " " + EOS``, so a policy
trained that way emits a space before EOS, and the decoded sample keeps it (``"... 11 "``). The reward-model
datasets then append ``" " + EOS`` once more. A demonstration ``"... 11"`` becomes the tokens ``' 11', ' ', EOS``
and the same text sampled from the SFT policy ``' 11', ' ', ' ', EOS``: a reward model can tell the two classes
apart without reading the answer. :func:`normalize_response` removes trailing whitespace on both sides, so a
demonstration and a sample of the same text reach the datasets as the same tokens; it is also what OpenRLHF's PPO
presents to a reward model (the policy's own ``' ', EOS`` after the answer). Leading whitespace is kept: it is
where the prompt and the response join, and the policy's tokens there are what PPO scores.
"""

from __future__ import annotations

__all__ = ["normalize_response"]


def normalize_response(response: str) -> str:
    """``response`` without trailing whitespace (the SFT convention's space before EOS, newlines, tabs)."""
    return response.rstrip()
