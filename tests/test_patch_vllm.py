"""``patches/0004-vllm-engines-on-cpu.patch``: with it, OpenRLHF's own engine path runs on a CPU Ray cluster with
this package's CPU layer switched off (``OPENRLHF_IRL_COMPAT=0``, which also turns its vLLM plugin off):
``create_vllm_engines`` starts an engine, OpenRLHF's stateless group and ``update_weight`` RPCs push new weights
the way ``broadcast_to_vllm`` does, and the engine's greedy tokens then equal transformers' on those weights."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from helpers import assert_ok, run_python
from helpers.openrlhf_checkout import LAUNCHER_VARS

from openrlhf_irl.utils.cache_dir import cache_dir

pytestmark = pytest.mark.slow

SCRIPT = r"""
import os, sys, socket, torch, ray
MODEL, DTYPE = sys.argv[1], sys.argv[3]  # DTYPE: "bf16" (OpenRLHF's default engines) or "fp32" (patch 0007)
import openrlhf
assert openrlhf.__file__.startswith(sys.argv[2]), openrlhf.__file__  # the patched copy
from openrlhf_irl import compat
assert not compat.needed()  # the layer is off
from transformers import AutoModelForCausalLM, AutoTokenizer

if __name__ == "__main__":
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    from openrlhf.trainer.ray.vllm_engine import create_vllm_engines
    from openrlhf.utils.distributed_util import stateless_init_process_group

    engine_dtype = {"dtype": "float32"} if DTYPE == "fp32" else {}
    engines = create_vllm_engines(1, 1, MODEL, 0, False, True, True, 128, gpu_memory_utilization=0.5, **engine_dtype)
    tok = AutoTokenizer.from_pretrained(MODEL)
    prompts = [tok(f"User: count from {a}\nAssistant: ", add_special_tokens=False)["input_ids"] for a in (3, 41)]
    import vllm
    params = vllm.SamplingParams(temperature=0.0, max_tokens=8)
    eos = tok.eos_token_id

    def greedy():  # the engine's tokens, ending in EOS exactly when it stopped there
        outs = [o.outputs[0] for o in ray.get([engines[0].generate.remote(p, params) for p in prompts])]
        return [list(o.token_ids) + ([eos] if o.finish_reason == "stop" and eos not in o.token_ids else []) for o in outs]

    before = greedy()

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32 if DTYPE == "fp32" else torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.5 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    refs = [engines[0].init_process_group.remote("127.0.0.1", port, 1, 2, "push", "gloo", False)]
    group = stateless_init_process_group("127.0.0.1", port, 0, 2, torch.device("cpu"))
    ray.get(refs)
    named = list(model.named_parameters())
    for i, (name, p) in enumerate(named):  # as PolicyModelActor.broadcast_to_vllm sends them
        ref = engines[0].update_weight.remote(name, dtype=p.dtype, shape=p.shape, empty_cache=i == len(named) - 1)
        group.broadcast(p.data, src=0, stream=None)
        ray.get(ref)
    after = greedy()
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        tokens = out[0, len(p):].tolist()
        expected.append(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)
    if DTYPE == "fp32":
        assert after == expected, (after, expected)
    else:  # bf16 engine vs bf16 transformers: every engine token is the argmax up to a bf16 near-tie (relative gap)
        for p, tokens in zip(prompts, after):
            ids = torch.tensor([p + tokens])
            with torch.no_grad():
                logits = model(ids).logits[0, len(p) - 1:-1].float()
            chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
            gap = (logits.max(-1).values - chosen) / logits.abs().max(-1).values
            assert float(gap.max()) <= 0.02, (after, expected, gap)
        assert sum(a == e for a, e in zip(after, expected)) >= 1, (after, expected)
    assert before != after
    print("pushed", len(named), "tensors; greedy tokens match transformers")
    ray.shutdown()
"""


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_patched_openrlhf_pushes_weights_into_a_cpu_engine_without_the_compat_layer(
        tiny_model, patched_openrlhf, tmp_path, vllm_ready, dtype):  # noqa: F811
    """fp32: patch 0007's ``create_vllm_engines(dtype="float32")``; ``update_weight`` asserts the pushed dtype is the
    engine's, so fp32 weights arriving at a bfloat16 engine would fail the push."""
    script = tmp_path / "push.py"
    script.write_text(SCRIPT)
    run_dir = tempfile.mkdtemp(prefix="oirl_t_")  # short: Ray and vLLM put unix sockets under it (107-byte limit)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OPENRLHF_IRL_COMPAT="0", PYTHONPATH=os.pathsep.join([str(patched_openrlhf), env.get("PYTHONPATH", "")]),
               VLLM_CPU_KVCACHE_SPACE="1", TORCHDYNAMO_DISABLE="1", VLLM_RPC_BASE_PATH=run_dir,
               VLLM_CACHE_ROOT=str(cache_dir() / "vllm"), TMPDIR=run_dir)
    try:
        proc = run_python([str(script), tiny_model, str(patched_openrlhf), dtype], timeout=900, env=env)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    assert_ok(proc)
    assert "greedy tokens match transformers" in proc.stdout
