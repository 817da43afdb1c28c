"""Foundation: CPU layer for OpenRLHF 0.11.2, tiny models, trainer registry, OpenRLHF's own flows on CPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import assert_ok, counting_records, mean_response_nll, run_python, sft_flags
from openrlhf_irl.compat import flash_attn_standin as fa

# ---------------------------------------------------------------- flash-attn stand-ins (hand-built cases)


def test_unpad_input_hand_case():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # [b=2, s=3, h=2]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rows, indices, cu_seqlens, max_seqlen, used = fa.unpad_input(hidden, mask)
    assert indices.tolist() == [0, 1, 3, 4, 5]
    assert cu_seqlens.tolist() == [0, 2, 5] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 3 and used.tolist() == [2, 3]
    assert rows.tolist() == [[0, 1], [2, 3], [6, 7], [8, 9], [10, 11]]


def test_pad_input_inverts_unpad_and_zero_fills():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    rows, indices, *_ = fa.unpad_input(hidden, mask)
    padded = fa.pad_input(rows, indices, 2, 4)
    assert torch.equal(padded[mask.bool()], hidden[mask.bool()])
    assert torch.count_nonzero(padded[~mask.bool()]) == 0


def test_index_first_axis_is_differentiable():
    x = torch.randn(5, 2, requires_grad=True)
    fa.index_first_axis(x, torch.tensor([4, 0])).sum().backward()
    assert x.grad.tolist() == [[1, 1], [0, 0], [0, 0], [0, 0], [1, 1]]


ALL_GATHER_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from openrlhf_irl.compat.flash_attn_standin import all_gather
dist.init_process_group("gloo")
rank = dist.get_rank()
x = torch.full((2, 1), float(rank + 1), requires_grad=True)
out = all_gather(x, dist.group.WORLD)
assert out.squeeze(1).tolist() == [1, 1, 2, 2], out
(out * torch.arange(4.0).unsqueeze(1)).sum().backward()
# d/dx of sum_r sum_i w_i * gathered_i: every rank's loss sees this rank's slice, weights summed over 2 ranks
expected = [[0.0], [2.0]] if rank == 0 else [[4.0], [6.0]]
assert x.grad.tolist() == expected, (rank, x.grad.tolist())
dist.barrier()
dist.destroy_process_group()
sys.stdout.write(f"ok{rank}\n"); sys.stdout.flush()
# Skip interpreter teardown: now and then a gloo worker thread still being torn down aborts a rank at exit
# ("terminate called without an active exception") after everything above has passed.
os._exit(0)
"""


def test_all_gather_two_processes(tmp_path):
    script = tmp_path / "ag.py"
    script.write_text(ALL_GATHER_SCRIPT)
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)], timeout=120)
    assert_ok(proc)
    assert "ok0" in proc.stdout and "ok1" in proc.stdout


# ---------------------------------------------------------------- the compat layer


def test_openrlhf_models_import_needs_compat_and_works_with_it():
    code = "import openrlhf_irl.compat as c; print('active', c.activate()); import openrlhf.models; print('imported')"
    with_compat = run_python(["-c", code], timeout=300)
    assert_ok(with_compat)
    assert "active True" in with_compat.stdout and "imported" in with_compat.stdout
    without = run_python(["-c", code], env={"OPENRLHF_IRL_COMPAT": "0"}, timeout=300)
    assert without.returncode != 0 and "flash_attn" in without.stderr


def test_compat_is_a_noop_for_unsupported_versions(monkeypatch):
    import openrlhf_irl.compat as compat

    monkeypatch.setattr(compat, "_openrlhf_version", lambda: "9.9.9")
    assert compat.needed() is False
    monkeypatch.setattr(compat, "_openrlhf_version", lambda: "0.11.2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compat.needed() is False


# ---------------------------------------------------------------- tiny model + registry


def test_tiny_model_loads_like_a_hub_model(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok) == 300
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.pad_token_id != tok.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "1 2"}],
                                   tokenize=False)
    assert chat == "User: hi\nAssistant: 1 2</s>"
    ids = tok("count from 7 </s>", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]).strip() == "count from 7"


def test_registry_lists_plugin_and_builtin_trainers():
    from openrlhf_irl.registry import UnknownTrainerError, available_trainers, get_trainer

    assert set(available_trainers("sft")) == {"sft", "irl_iq"}
    assert set(available_trainers("rm")) == {"rm", "afd_rm"}
    assert get_trainer("irl_iq", "sft").trainer_class().__name__ == "IQLearnTrainer"
    assert get_trainer("sft", "sft").trainer_class() is None  # OpenRLHF's own trainer
    with pytest.raises(UnknownTrainerError, match="known trainers: irl_iq, sft"):
        get_trainer("nope", "sft")


def test_unknown_trainer_fails_fast_with_known_names():
    proc = run_python(["-m", "openrlhf_irl.cli.train_sft", "--trainer", "nope"], timeout=300)
    assert proc.returncode == 2
    assert "unknown trainer 'nope'" in proc.stderr and "irl_iq, sft" in proc.stderr


def test_cli_accepts_all_openrlhf_arguments_plus_plugin_ones():
    from openrlhf_irl.cli.launcher import build_args

    args = build_args("sft", ["--trainer", "irl_iq", "--irl.td_weight", "0.3", "--ds.zero_stage", "3",
                              "--data.max_len", "99", "--ds.lora.rank", "4"])
    assert args.trainer == "irl_iq" and args.irl.td_weight == 0.3
    assert args.ds.zero_stage == 3 and args.data.max_len == 99 and args.ds.lora.rank == 4
    assert args.adam.lr == 5e-6  # OpenRLHF's own default
    with pytest.raises(SystemExit):
        build_args("sft", ["--irl.td_weight", "0.3"])  # plug-in arguments belong to their trainer only


# ---------------------------------------------------------------- OpenRLHF's own flows, unmodified, on CPU

TRAIN_SCRIPT = r"""
import sys, importlib
from openrlhf_irl.cli.launcher import build_args
task = sys.argv[1]
args = build_args(task, sys.argv[2:])          # OpenRLHF's own parser
importlib.import_module(f"openrlhf.cli.train_{task}").train(args)   # OpenRLHF's own, unmodified train(args)
"""


@pytest.mark.slow
def test_openrlhf_sft_train_unmodified_on_cpu(tiny_model, sft_data, tmp_path):
    out = str(tmp_path / "sft")
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    proc = run_python([str(script), "sft", *sft_flags(tiny_model, sft_data, out)])
    assert_ok(proc)
    records = counting_records()
    before, after = mean_response_nll(tiny_model, records), mean_response_nll(out, records)
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow
def test_openrlhf_rm_train_unmodified_on_cpu(tiny_model, pair_data, tmp_path):
    out = str(tmp_path / "rm")
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    flags = sft_flags(tiny_model, pair_data, out)
    flags = [f for f in flags if f not in ("--data.input_key", "prompt", "--data.output_key", "response")]
    proc = run_python([str(script), "rm", *flags, "--data.prompt_key", "prompt", "--eval.dataset", pair_data])
    assert_ok(proc)
    accuracy = _pair_accuracy(out, pair_data)
    assert accuracy >= 0.85, accuracy
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["value_head_prefix"] == "score" and "mean" in config and "std" in config


def _pair_accuracy(model_dir: str, pair_path: str) -> float:
    """Share of pairs where OpenRLHF's loaded reward model scores chosen above rejected."""
    from openrlhf_irl import compat

    compat.activate()
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rm = get_llm_for_sequence_regression(model_dir, "reward", param_dtype="bf16", attn_implementation="eager").eval()
    wins = []
    with torch.no_grad():
        for line in open(pair_path):
            r = json.loads(line)
            scores = []
            for resp in (r["chosen"], r["rejected"]):
                ids = tok(r["prompt"] + resp + " " + tok.eos_token, return_tensors="pt", add_special_tokens=False)
                scores.append(float(rm(ids["input_ids"], attention_mask=ids["attention_mask"])))
            wins.append(scores[0] > scores[1])
    return sum(wins) / len(wins)


@pytest.mark.slow
@pytest.mark.parametrize("stage,nproc", [(0, 1), (1, 1), (3, 1), (2, 2), (3, 2)])
def test_openrlhf_sft_zero_stages_and_two_processes(tiny_model, sft_data, tmp_path, stage, nproc):
    out = str(tmp_path / "sft")
    flags = sft_flags(tiny_model, sft_data, out, "--train.max_epochs", "1")
    flags[flags.index("--ds.zero_stage") + 1] = str(stage)
    if nproc == 1:
        cmd = ["-m", "openrlhf_irl.cli.train_sft", "--trainer", "sft", *flags]
    else:
        flags[flags.index("--train.micro_batch_size") + 1] = "2"
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "openrlhf_irl.cli.train_sft",
               "--trainer", "sft", *flags]
    proc = run_python(cmd)
    assert_ok(proc)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.vocab_size == 300
