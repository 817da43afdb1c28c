"""Token-level inverse-RL losses (IQ-Learn), plain and fused with the lm_head."""

from .fused_iq_objective import HeadTransform, IQTermWeights, iq_weighted_loss, linear_iq_objective, token_weights_of
from .fused_linear_qv import LinearQV, linear_q_and_v, masked_linear_q_and_v
from .iq_learn import (
    IQTokenTerms,
    entropy_from_logits,
    iq_per_token_loss,
    iq_stats,
    iq_token_terms,
    logits_q_and_v,
    token_rewards,
)

__all__ = [
    "IQTokenTerms",
    "iq_token_terms",
    "iq_per_token_loss",
    "iq_stats",
    "token_rewards",
    "logits_q_and_v",
    "entropy_from_logits",
    "linear_q_and_v",
    "masked_linear_q_and_v",
    "LinearQV",
    "linear_iq_objective",
    "IQTermWeights",
    "HeadTransform",
    "iq_weighted_loss",
    "token_weights_of",
]
