"""``--irl.sampler engine_probe:make_sampler`` (this directory on ``PYTHONPATH``): the real vLLM sampler of
``--irl.sampler vllm`` (OpenRLHF's engines, the weight push), observed. After every push it asks the first engine
for greedy tokens on fixed prompts and computes the live policy's own greedy tokens (``generate`` on the training
model: LoRA adapters active, ZeRO-3 shards gathered by DeepSpeed's hooks), and rank 0 appends both to
``$ENGINE_PROBE_LOG`` as one JSON line. Nothing is replaced: sampling and pushing are the production code's."""

from __future__ import annotations

import json
import os

import torch

from openrlhf_irl.generation.online import PolicySampler, build_vllm_sampler
from openrlhf_irl.utils.distributed import rank_and_world

PROBE_PROMPTS = ("User: count from 3\nAssistant: ", "User: count from 41\nAssistant: ")
PROBE_TOKENS = 8


class ProbedSampler(PolicySampler):
    def __init__(self, inner, tokenizer, log_path):
        self.inner, self.tokenizer, self.log_path = inner, tokenizer, log_path
        self.pushes = 0

    def _policy_greedy(self, model, zero_stage):
        module = getattr(model, "module", model)
        synced = zero_stage == 3 and rank_and_world()[1] > 1
        out = []
        for text in PROBE_PROMPTS:
            ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                g = module.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=PROBE_TOKENS, min_new_tokens=PROBE_TOKENS, synced_gpus=synced,
                                    eos_token_id=None, pad_token_id=self.tokenizer.pad_token_id)
            out.append(g[0, ids.shape[1]:].tolist())
        return out

    def _engine_greedy(self):
        import ray
        import vllm

        params = vllm.SamplingParams(temperature=0.0, max_tokens=PROBE_TOKENS, min_tokens=PROBE_TOKENS,
                                     ignore_eos=True)
        refs = [self.inner.engines[0].generate.remote(self.tokenizer(t, add_special_tokens=False)["input_ids"], params)
                for t in PROBE_PROMPTS]
        return [list(o.outputs[0].token_ids) for o in ray.get(refs)]

    def refresh(self, model, *, zero_stage=0):
        self.inner.refresh(model, zero_stage=zero_stage)
        policy = self._policy_greedy(model, zero_stage)
        self.pushes += 1
        if rank_and_world()[0] == 0:
            record = {"push": self.pushes, "zero_stage": zero_stage, "policy": policy, "engine": self._engine_greedy()}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def sample(self, prompts):
        return self.inner.sample(prompts)

    def close(self):
        self.inner.close()


def make_sampler(args, tokenizer):
    return ProbedSampler(build_vllm_sampler(args, tokenizer), tokenizer, os.environ["ENGINE_PROBE_LOG"])
