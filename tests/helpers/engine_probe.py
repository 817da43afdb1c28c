"""``--irl.sampler engine_probe:make_sampler`` (this directory on ``PYTHONPATH``): the real vLLM sampler of
``--irl.sampler vllm`` (OpenRLHF's engines, the weight push), observed. After every push it asks the first engine
for greedy tokens on fixed prompts and computes the live policy's own greedy tokens (``generate`` on the training
model: LoRA adapters active, ZeRO-3 shards gathered by DeepSpeed's hooks). Both run in bf16 with different kernels,
so at a near-tie their argmax may differ; the probe therefore also teacher-forces the engine's tokens through the
policy and records, per prompt, the largest gap ``(max_a l_t[a] - l_t[engine token]) / max_a |l_t[a]|`` (0 where
the engine chose the policy's argmax). Rank 0 appends one JSON line per push to ``$ENGINE_PROBE_LOG``. Nothing is replaced: sampling and
pushing are the production code's."""

from __future__ import annotations

import json
import os

import torch

from openrlhf_irl.generation.online import PolicySampler, build_vllm_sampler, completion_tokens
from openrlhf_irl.generation.policy_samples import cut_after_eos
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
                                    max_new_tokens=PROBE_TOKENS, synced_gpus=synced,
                                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
            out.append(cut_after_eos(g[0, ids.shape[1]:].tolist(), self.tokenizer.eos_token_id))
        return out

    def _engine_greedy(self):
        import ray
        import vllm

        params = vllm.SamplingParams(temperature=0.0, max_tokens=PROBE_TOKENS)  # stops at EOS, as generate does
        refs = [self.inner.engines[0].generate.remote(self.tokenizer(t, add_special_tokens=False)["input_ids"], params)
                for t in PROBE_PROMPTS]
        return [completion_tokens(o, self.tokenizer.eos_token_id) for o in ray.get(refs)]

    def _gaps(self, model, engine_tokens):
        """Per prompt: max over steps of (policy's max logit - policy's logit of the engine's token)."""
        module = getattr(model, "module", model)
        gaps = []
        for text, tokens in zip(PROBE_PROMPTS, engine_tokens):
            prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + tokens])
            with torch.no_grad():
                logits = module(ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt) - 1:-1].float()
            chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
            gap = (logits.max(-1).values - chosen) / logits.abs().max(-1).values  # relative to the logits' scale
            gaps.append(float(gap.max()))
        return gaps

    def refresh(self, model, *, zero_stage=0):
        self.inner.refresh(model, zero_stage=zero_stage)
        policy = self._policy_greedy(model, zero_stage)
        self.pushes += 1
        rank, world = rank_and_world()
        engine = [self._engine_greedy() if rank == 0 else None]
        if world > 1:
            torch.distributed.broadcast_object_list(engine, src=0)
        gaps = self._gaps(model, engine[0])  # a forward under ZeRO-3 is collective: every rank runs it
        if rank == 0:
            record = {"push": self.pushes, "zero_stage": zero_stage, "policy": policy, "engine": engine[0],
                      "gaps": gaps}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def sample(self, prompts):
        return self.inner.sample(prompts)

    def close(self):
        self.inner.close()


def make_sampler(args, tokenizer):
    return ProbedSampler(build_vllm_sampler(args, tokenizer), tokenizer, os.environ["ENGINE_PROBE_LOG"])
