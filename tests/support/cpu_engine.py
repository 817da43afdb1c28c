"""Test double of OpenRLHF's vLLM engine (``RolloutRayActor`` + ``WorkerWrap``) for CPU machines.

Same RPC names and argument order as OpenRLHF 0.11.2, so the trainer-side code under test
(:class:`EngineWeightSync`, :class:`VLLMPolicySampler`) is the code that talks to real engines on GPUs. Behind
them: a transformers model instead of vLLM, a stateless gloo group instead of ``PyNcclCommunicator``, and
``generate`` answering with the two fields of a vLLM ``RequestOutput`` the sampler reads.

``make_sampler`` is an ``--irl.sampler tests.support.cpu_engine:make_sampler``-style factory: put this directory on
``PYTHONPATH`` and pass ``--irl.sampler cpu_engine:make_sampler``. Each engine appends one JSON line per event to
``$CPU_ENGINE_LOG`` when that is set.
"""

from __future__ import annotations

import datetime
import json
import os
from types import SimpleNamespace

import ray
import torch


class GlooBroadcastGroup:
    """A process group outside ``torch.distributed``'s default one (the trainer already has that)."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int):
        timeout = datetime.timedelta(seconds=120)
        store = torch.distributed.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                                           timeout=timeout)
        self.pg = torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, stream=None) -> None:
        self.pg.broadcast(tensor, src).wait()


@ray.remote(num_cpus=0)
class CPUEngine:
    def __init__(self, model_path: str, log_path: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_path)
        self.eos_id, self.pad_id = tok.eos_token_id, tok.pad_token_id
        self.log_path = log_path
        self.received = 0
        self.group = None

    def _log(self, **event) -> None:
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(event) + "\n")

    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name, backend,
                           use_ray):
        self.group = GlooBroadcastGroup(master_address, master_port, rank_offset, world_size)

    def update_weight(self, name, dtype, shape, empty_cache=False):
        weight = torch.empty(shape, dtype=dtype)
        self.group.broadcast(weight, src=0)
        with torch.no_grad():
            dict(self.model.named_parameters())[name].copy_(weight)  # an unknown name fails like load_weights
        self.received += 1
        if empty_cache:  # the sender marks the last tensor of a push
            self._log(event="sync", tensors=self.received)
            self.received = 0

    def reset_prefix_cache(self):
        pass

    def generate(self, prompt_token_ids, params):
        """One completion; ``params``: dict with temperature (0 = greedy), max_new_tokens, seed."""
        torch.manual_seed(params["seed"])
        greedy = params["temperature"] == 0
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt_token_ids]), attention_mask=torch.ones(1, len(prompt_token_ids), dtype=torch.long),
                do_sample=not greedy, temperature=None if greedy else params["temperature"], top_p=None, top_k=None,
                max_new_tokens=params["max_new_tokens"], eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            )
        tokens = out[0, len(prompt_token_ids):].tolist()
        stopped = self.eos_id in tokens
        if stopped:
            tokens = tokens[: tokens.index(self.eos_id) + 1]
        self._log(event="generate", prompt_len=len(prompt_token_ids), completion_len=len(tokens))
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, finish_reason="stop" if stopped else "length")])

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}


def sampling_params(*, temperature, max_new_tokens, seed) -> dict:
    return {"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}


def make_sampler(args, tokenizer):
    """``--irl.sampler cpu_engine:make_sampler``: ``--irl.vllm_num_engines`` CPU engines behind VLLMPolicySampler."""
    from openrlhf_irl.generation.online import VLLMPolicySampler, training_seed
    from openrlhf_irl.generation.ray_pool import ensure_ray
    from openrlhf_irl.generation.weight_sync import EngineWeightSync
    from openrlhf_irl.utils.distributed import rank_and_world

    engines = []
    if rank_and_world()[0] == 0:
        ensure_ray(num_cpus=1)
        log = os.environ.get("CPU_ENGINE_LOG")
        engines = [CPUEngine.remote(args.model.model_name_or_path, log) for _ in range(args.irl.vllm_num_engines)]
    sync = EngineWeightSync(engines, mode="nccl", engine_dtype=torch.float32, group_factory=GlooBroadcastGroup)
    return VLLMPolicySampler(engines, tokenizer, n=args.irl.n_samples, max_new_tokens=args.irl.max_new_tokens,
                             temperature=args.irl.temperature, seed=training_seed(args), weight_sync=sync,
                             params_factory=sampling_params)
