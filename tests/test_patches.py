"""The upstream patches in ``patches/``: they apply cleanly to OpenRLHF 0.11.2, and the patched OpenRLHF runs a
plug-in trainer through its own CLI on a machine without CUDA, with this package's compat layer switched off.

The installed ``openrlhf`` is copied to a temporary directory and patched there; the subprocesses put that copy
first on ``PYTHONPATH`` so that it shadows the installed package. Nothing is installed or downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers.openrlhf_checkout import LAUNCHER_VARS, PATCH_DIR, PATCHES, free_port, installed_openrlhf, run_git

EXPECTED_PATCHES = ["0001-cli-pluggable-trainers.patch", "0002-device-agnostic-cpu.patch",
                    "0003-rm-trainer-training-step.patch", "0006-checkpoint-rotation-write-then-retire.patch",
                    "0007-param-dtype-fp32.patch"]

def _load_patched_plugins(patched: Path):
    """The new ``openrlhf/utils/plugins.py`` of the patched copy, loaded on its own (no OpenRLHF imports)."""
    spec = importlib.util.spec_from_file_location("patched_openrlhf_plugins", patched / "openrlhf/utils/plugins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- fast tests


def test_patch_series_is_complete_and_in_git_format_patch_form():
    assert set(EXPECTED_PATCHES) <= {p.name for p in PATCHES}
    for patch in PATCHES:
        text = patch.read_text()
        n = int(patch.name[:4])  # numbered series; patches of other series may sit in between
        assert text.startswith("From ") and re.search(rf"Subject: \[PATCH {n}/\d+\]", text)
        assert "\n---\n" in text and "diff --git a/openrlhf/" in text
    assert (PATCH_DIR / "README.md").is_file()


def test_patches_apply_cleanly_and_plugins_helper_resolves_entry_points(patched_openrlhf, monkeypatch, capsys):
    from openrlhf_irl import compat
    from openrlhf_irl.trainers.plugins import IRL_IQ

    # parsing irl_iq's arguments imports the installed (unpatched) openrlhf.models in this process, which needs the
    # CPU layer where flash-attn has no CUDA build; run alone, no other test module has activated it yet
    compat.activate()

    plugins = _load_patched_plugins(patched_openrlhf)

    # Lazy flash-attn imports: none is left at module level of ring_attn_utils.
    ring = (patched_openrlhf / "openrlhf/models/ring_attn_utils.py").read_text()
    assert not re.search(r"^(from|import) flash_attn", ring, re.M)

    # Entry points of this package, filtered by task.
    sft = plugins.registered_trainers("sft")
    assert {"sft", "irl_iq"} <= set(sft) and not {"rm", "afd_rm"} & set(sft)
    assert {"rm", "afd_rm"} <= set(plugins.registered_trainers("rm"))
    assert plugins.get_trainer_plugin("irl_iq", "sft") == IRL_IQ
    assert plugins.get_trainer_plugin("sft", "sft") is None and plugins.get_trainer_plugin(None, "sft") is None
    with pytest.raises(ValueError, match=r"registered trainers: sft, .*irl_iq"):
        plugins.get_trainer_plugin("nope", "sft")
    with pytest.raises(ValueError, match="unknown trainer 'irl_iq' for train_rm"):
        plugins.get_trainer_plugin("irl_iq", "rm")

    # --trainer NAME pulls in the plug-in's own arguments before the final parse.
    monkeypatch.setattr(sys, "argv", ["train_sft", "--trainer", "irl_iq", "--irl.td_weight", "0.3"])
    parser = argparse.ArgumentParser()
    parser.add_argument("--train.seed", type=int, default=42)
    plugins.add_trainer_arguments(parser, "sft")
    args = parser.parse_args(sys.argv[1:])
    assert args.trainer == "irl_iq" and getattr(args, "irl.td_weight") == 0.3

    # An unknown name is a parser error listing the registered trainers of that CLI.
    monkeypatch.setattr(sys, "argv", ["train_sft", "--trainer", "nope"])
    with pytest.raises(SystemExit) as exit_info:
        plugins.add_trainer_arguments(argparse.ArgumentParser(prog="train_sft.py"), "sft")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown trainer 'nope'" in err and "sft" in err and "irl_iq" in err and "afd_rm" not in err

    # Without --trainer no entry point is even loaded, and the defaults are used.
    def no_entry_points(**kwargs):
        raise AssertionError("entry points loaded without --trainer")

    monkeypatch.setattr(plugins, "entry_points", no_entry_points)
    monkeypatch.setattr(sys, "argv", ["train_sft", "--train.seed", "1"])
    parser = argparse.ArgumentParser()
    parser.add_argument("--train.seed", type=int, default=42)
    plugins.add_trainer_arguments(parser, "sft")
    assert parser.parse_args(sys.argv[1:]).trainer == "sft"
    defaults = ("DefaultTrainer", "DefaultDataset")
    assert plugins.resolve_trainer(SimpleNamespace(trainer="sft"), "sft", *defaults) == defaults
    assert plugins.resolve_trainer(SimpleNamespace(), "sft", *defaults) == defaults

    # A plug-in's classes replace the defaults; None keeps them.
    fake = SimpleNamespace(task="sft", trainer_class=lambda: "PluginTrainer", dataset_class=lambda: None)
    monkeypatch.setattr(plugins, "registered_trainers", lambda task: {"fake": fake})
    assert plugins.resolve_trainer(SimpleNamespace(trainer="fake"), "sft", *defaults) == (
        "PluginTrainer", "DefaultDataset")


# --------------------------------------------------------------------- slow tests: the patched CLI itself


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory) -> SimpleNamespace:
    """A tiny Llama and a prompt/response JSONL dataset."""
    from openrlhf_irl.utils.tiny_model import write_tiny_llama

    root = tmp_path_factory.mktemp("patched_cli")
    model = write_tiny_llama(str(root / "model"))
    rng = random.Random(0)
    data = root / "sft.jsonl"
    with open(data, "w") as f:
        for _ in range(40):
            a = rng.randint(1, 60)
            f.write(json.dumps({"prompt": f"count from {a}", "response": " ".join(str(a + j) for j in range(4))}))
            f.write("\n")
    pairs, labels = root / "pairs.jsonl", root / "labels.jsonl"
    with open(pairs, "w") as fp, open(labels, "w") as fl:
        for _ in range(24):
            a = rng.randint(1, 60)
            good = " ".join(str(a + j) for j in range(4))
            bad = " ".join(str(rng.randint(100, 999)) for _ in range(4))
            fp.write(json.dumps({"prompt": f"count from {a}", "chosen": good, "rejected": bad}) + "\n")
            fl.write(json.dumps({"prompt": f"count from {a}", "response": good, "label": 1}) + "\n")
            fl.write(json.dumps({"prompt": f"count from {a}", "response": bad, "label": 0}) + "\n")
    return SimpleNamespace(root=root, model=model, data=str(data), pairs=str(pairs), labels=str(labels))


def _run_patched(patched: Path, inputs: SimpleNamespace, module: str, argv: list[str]):
    """``python -m module argv`` with the patched copy first on the path, compat off, no CUDA, one process."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and k != "DS_ACCELERATOR"}
    env.update(
        PYTHONPATH=os.pathsep.join([str(patched), *filter(None, [os.environ.get("PYTHONPATH")])]),
        OPENRLHF_IRL_COMPAT="0",  # the patched OpenRLHF must manage on its own
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # one process, as `torchrun --nproc_per_node 1` would set it up
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
    )
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=inputs.root,
                          env=env, capture_output=True, text=True, timeout=900)


def _common_flags(inputs: SimpleNamespace, out: Path, data: str) -> list[str]:
    return [
        "--model.model_name_or_path", inputs.model, "--data.dataset", data, "--data.max_len", "64",
        "--train.micro_batch_size", "4", "--train.batch_size", "8", "--train.max_epochs", "1",
        "--ds.zero_stage", "2", "--ds.attn_implementation", "eager", "--ds.param_dtype", "bf16",
        "--adam.lr", "1e-3", "--ckpt.output_dir", str(out), "--ckpt.path", str(out) + "_ckpt",
    ]


def _run_patched_train_sft(patched: Path, inputs: SimpleNamespace, out: Path | None, *extra: str,
                           module: str = "openrlhf.cli.train_sft"):
    flags = [] if out is None else [*_common_flags(inputs, out, inputs.data), "--data.input_key", "prompt",
                                    "--data.output_key", "response", "--data.max_samples", "32"]
    return _run_patched(patched, inputs, module, [*extra, *flags])


def _run_patched_train_rm(patched: Path, inputs: SimpleNamespace, out: Path, data: str, *extra: str):
    flags = [*_common_flags(inputs, out, data), "--data.prompt_key", "prompt", "--eval.dataset", data]
    return _run_patched(patched, inputs, "openrlhf.cli.train_rm", [*extra, *flags])


def _assert_trained_and_saved(proc, out: Path) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-8000:]}"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.model_type == "llama"
    return output


@pytest.mark.slow
def test_patched_cli_runs_plugin_trainer_on_cpu(patched_openrlhf, cli_inputs):
    out = cli_inputs.root / "out_irl_iq"
    proc = _run_patched_train_sft(patched_openrlhf, cli_inputs, out, "--trainer", "irl_iq", "--irl.td_weight", "0.1")
    output = _assert_trained_and_saved(proc, out)
    assert re.search(r"\biq_\w+=", output), "the irl_iq trainer's metrics are missing from the progress output"


def test_fp32_patch_applies_to_pristine_openrlhf_alone(tmp_path):
    """0007 does not depend on the CPU patches: it applies to OpenRLHF 0.11.2 as released."""
    shutil.copytree(installed_openrlhf(), tmp_path / "openrlhf", ignore=shutil.ignore_patterns("__pycache__"))
    check = run_git(["apply", "--check", "--verbose", str(PATCH_DIR / "0007-param-dtype-fp32.patch")], tmp_path)
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
def test_patched_train_sft_trains_in_fp32_without_the_compat_layer(patched_openrlhf, cli_inputs):
    """0007 (with 0002 for the CPU device): OpenRLHF's own train_sft takes ``--ds.param_dtype fp32``, trains with
    DeepSpeed's bf16/fp16 off and saves float32 weights, with this package's layer off."""
    from safetensors import safe_open

    out = cli_inputs.root / "out_fp32"
    flags = _common_flags(cli_inputs, out, cli_inputs.data)
    flags[flags.index("--ds.param_dtype") + 1] = "fp32"
    proc = _run_patched(patched_openrlhf, cli_inputs, "openrlhf.cli.train_sft",
                        [*flags, "--data.input_key", "prompt", "--data.output_key", "response",
                         "--data.max_samples", "32"])
    _assert_trained_and_saved(proc, out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert {str(h.get_tensor(k).dtype) for k in h.keys()} == {"torch.float32"}


@pytest.mark.slow
def test_patched_cli_rejects_unknown_trainer(patched_openrlhf, cli_inputs):
    proc = _run_patched_train_sft(patched_openrlhf, cli_inputs, None, "--trainer", "nope")
    assert proc.returncode != 0
    assert "unknown trainer 'nope'" in proc.stderr
    listed = re.search(r"registered trainers: (.*)", proc.stderr)
    assert listed and {"sft", "irl_iq"} <= set(listed.group(1).replace(",", " ").split()), proc.stderr[-4000:]


@pytest.mark.slow
def test_patched_cli_without_trainer_flag_trains_as_before(patched_openrlhf, cli_inputs):
    out = cli_inputs.root / "out_default"
    output = _assert_trained_and_saved(_run_patched_train_sft(patched_openrlhf, cli_inputs, out), out)
    assert "gpt_loss=" in output and not re.search(r"\biq_\w+=", output)


@pytest.mark.slow
def test_plugin_launcher_defers_to_a_patched_openrlhf(patched_openrlhf, cli_inputs):
    """The plug-in's own CLI must not add --trainer a second time when OpenRLHF already has it."""
    out = cli_inputs.root / "out_launcher"
    proc = _run_patched_train_sft(patched_openrlhf, cli_inputs, out, "--trainer", "irl_iq", "--irl.td_weight", "0.1",
                                  module="openrlhf_irl.cli.train_sft")
    output = _assert_trained_and_saved(proc, out)
    assert re.search(r"\biq_\w+=", output)


def _assert_reward_model_saved(proc, out: Path) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-8000:]}"
    config = json.loads((out / "config.json").read_text())
    assert config["value_head_prefix"] == "score" and "mean" in config and "std" in config
    return output


@pytest.mark.slow
def test_patched_train_rm_without_trainer_flag_trains_as_before(patched_openrlhf, cli_inputs):
    out = cli_inputs.root / "out_rm"
    output = _assert_reward_model_saved(_run_patched_train_rm(patched_openrlhf, cli_inputs, out, cli_inputs.pairs),
                                        out)
    assert "chosen_reward=" in output and "acc_mean" in output


@pytest.mark.slow
def test_patched_rm_trainer_runs_afd_classifier_through_its_own_fit(patched_openrlhf, cli_inputs):
    """With 0003, afd_rm keeps OpenRLHF's fit and only supplies training_step (no re-stated loop)."""
    out = cli_inputs.root / "out_afd_rm"
    proc = _run_patched_train_rm(patched_openrlhf, cli_inputs, out, cli_inputs.labels, "--trainer", "afd_rm")
    output = _assert_reward_model_saved(proc, out)
    assert "RewardModelTrainer.fit drives training_step" in output
    assert "pos_reward=" in output and "chosen_reward=" not in output
