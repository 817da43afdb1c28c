"""The training-free AfD reward for OpenRLHF's PPO: ``--reward.remote_url <this file>``.

OpenRLHF 0.11.2 loads ``reward_func(queries, prompts, labels)`` from a ``.py`` path given as the remote reward URL
and calls it with the decoded prompt+response (special tokens kept) and the formatted prompt. The reward is

    r(x, y) = log pi_SFT(y|x) - log pi_init(y|x)

the optimum of the Init-SFT discriminator (docs/afd.md#the-log-ratio-reward). Set ``AFD_SFT_MODEL`` and
``AFD_INIT_MODEL`` to the two model directories (``AFD_DEVICE`` optional).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _scorer():
    from openrlhf_irl.generation.scoring import LogRatioScorer

    try:
        sft, init = os.environ["AFD_SFT_MODEL"], os.environ["AFD_INIT_MODEL"]
    except KeyError as missing:
        raise RuntimeError(f"set {missing.args[0]} to use the AfD log-ratio reward") from None
    return LogRatioScorer(sft, init, device=os.environ.get("AFD_DEVICE"))


def check_environment() -> None:
    """Raise with one line when the two model directories are not set or missing (the launcher calls this before
    starting Ray; OpenRLHF would only fail inside a vLLM engine, minutes later)."""
    for key in ("AFD_SFT_MODEL", "AFD_INIT_MODEL"):
        path = os.environ.get(key)
        if not path:
            raise RuntimeError(f"set {key} to use the AfD log-ratio reward")
        if (path.startswith((".", "/")) or os.path.exists(path)) and not os.path.isfile(
                os.path.join(path, "config.json")):
            raise RuntimeError(f"{key}={path}: not a model directory (no config.json)")


def split_response(query: str, prompt: str, eos_token: str | None) -> tuple[str, bool]:
    """The response text of ``query`` = prompt + response (+ EOS); returns (response, ended_with_eos)."""
    response = query[len(prompt):] if query.startswith(prompt) else query
    for token in filter(None, [eos_token]):
        if response.endswith(token):
            return response[: -len(token)], True
    return response, False


def reward_func(queries, prompts, labels):
    scorer = _scorer()
    eos = scorer.sft_tokenizer.eos_token
    split = [split_response(q, p, eos) for q, p in zip(queries, prompts)]
    rewards = scorer.score(list(prompts), [r for r, _ in split], add_eos=[ended for _, ended in split])
    rewards = torch.tensor(rewards, dtype=torch.float32)
    return {"rewards": rewards, "scores": rewards, "extra_logs": {"afd_log_ratio": rewards}}
