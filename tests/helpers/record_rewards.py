"""A Ray worker setup hook for the PPO tests (``OPENRLHF_IRL_WORKER_HOOK=record_rewards.install``).

Every reward OpenRLHF's reward model returns inside the PPO job is appended to the JSON-lines file
``PPO_TEST_RM_LOG`` names, with the token ids it scored (the attended positions of its input), so a test can
recompute each score with a plain transformers forward pass and compare it with what PPO logged."""

from __future__ import annotations

import json
import os


def install() -> None:
    from openrlhf_irl.compat.vllm_cpu import install_import_hooks

    install_import_hooks({"openrlhf.models.model": _patch})


def _patch(module) -> None:
    make = module._get_reward_model
    if getattr(make, "_records", False):
        return

    def _get_reward_model(*args, **kwargs):
        cls = make(*args, **kwargs)
        forward = cls.forward

        def recording_forward(self, input_ids, attention_mask=None, *rest, **kw):
            out = forward(self, input_ids, attention_mask, *rest, **kw)
            reward = out[0] if isinstance(out, tuple) else out
            with open(os.environ["PPO_TEST_RM_LOG"], "a", encoding="utf-8") as f:
                for ids, mask, r in zip(input_ids.tolist(), attention_mask.tolist(), reward.float().tolist()):
                    f.write(json.dumps({"ids": [i for i, m in zip(ids, mask) if m], "reward": r}) + "\n")
            return out

        cls.forward = recording_forward
        return cls

    _get_reward_model._records = True
    module._get_reward_model = _get_reward_model
