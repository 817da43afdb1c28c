"""The plug-in's CLIs under bad input, reruns and faults (issue #13), each case through the real CLI in a subprocess.

Every refusal asserts: the exit code, one clear ``error`` line naming the file/record/field or the flag, no Python
traceback, and the case's directory byte-for-byte untouched (nothing written, nothing repaired, nothing deleted).
The slow cases run a few of them as subprocesses and check a whole Best-of-N run with a rerun under other settings
(``tests/test_sampling.py::test_cli_kill_and_resume`` covers a SIGKILLed sampling job: its Ray processes and the
resume).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from helpers import REPO, interruptible, sft_flags
from openrlhf_irl.utils.output_guard import mark_dir

PROMPTS = [{"prompt": "count from 3"}, {"prompt": "count from 7"}]
REC = {"response": " 1 2", "policy": "p", "finished": True, "logprob": -1.0}


def write(path: Path, rows, *, newline_at_end: bool = True) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_text(text if newline_at_end else text.rstrip("\n"))
    return str(path)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def run_cli(module: str, argv: list, env: dict | None = None, timeout: int = 300):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            **(env or {})}
    full.pop("RAY_ADDRESS", None)
    name = module if module.startswith("openrlhf_irl.") else f"openrlhf_irl.cli.{module}"
    return subprocess.run([sys.executable, "-m", name, *argv], capture_output=True,
                          text=True, timeout=timeout, env=full, cwd=str(REPO))


def run_in_process(module: str, argv: list, env: dict, capsys, monkeypatch):
    """``main(argv)`` of the CLI module in this process (its heavy imports paid once for the whole table); an
    uncaught exception fails the test as a traceback would."""
    import importlib

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    import logging

    for handler in logging.getLogger("vllm").handlers:  # bound to the captured stream of the test that imported
        if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):  # vLLM, closed
            handler.stream = sys.__stdout__  # since: each of its log lines would print "--- Logging error ---"
    try:
        if "PYTHONPATH" in env:  # a user module the CLI imports (a golden reward function)
            monkeypatch.syspath_prepend(env["PYTHONPATH"])
        name = module if module.startswith("openrlhf_irl.") else f"openrlhf_irl.cli.{module}"
        code = importlib.import_module(name).main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def sample_args(model: str, prompts: str, output: str, *extra: str) -> list:
    return ["--model", model, "--prompts", prompts, "--policy-name", "p", "--output", output,
            "--rollout.n_samples_per_prompt", "2", "--rollout.max_new_tokens", "8", "--backend", "hf", "--num-actors", "1", *extra]


def sign(argv: list, output: str) -> None:
    """The provenance sidecar the sample CLI writes for ``argv`` (as if it had produced ``output``)."""
    from openrlhf_irl.cli.sample import build_parser, provenance
    from openrlhf_irl.generation.hf import load_tokenizer
    from openrlhf_irl.utils.provenance import write_provenance

    args = build_parser().parse_args(argv)
    write_provenance(output, provenance(args, load_tokenizer(args.model)))


@dataclass
class Case:
    module: str
    setup: Callable  # (tmp: Path, models: dict) -> argv, or (argv, env)
    needle: str
    code: int = 2
    hold_lock: bool = False
    patch: Callable | None = None  # (monkeypatch) -> None, in-process only: a fault injected (Ctrl-C, full disk)


# ------------------------------------------------------------------------------------------- sample


def _prompts(t):
    return write(t / "prompts.jsonl", PROMPTS)


def s_output_is_prompts(t, m):
    # the prompts file has no final newline: a "torn tail" repair would have cut its last prompt
    p = write(t / "prompts.jsonl", PROMPTS, newline_at_end=False)
    return sample_args(m["llm"], p, p)


def s_foreign_output_with_torn_tail(t, m):
    out = write(t / "out.jsonl", [dict(REC, prompt="count from 3", sample_index=0), '{"prompt": "x", "resp'],
                newline_at_end=False)
    return sample_args(m["llm"], _prompts(t), out)


def _signed(t, m, records, *flags):
    argv = sample_args(m["llm"], _prompts(t), str(t / "out.jsonl"))
    write(t / "out.jsonl", records)
    sign(argv, str(t / "out.jsonl"))
    return argv + list(flags)


def s_other_temperature(t, m):
    return _signed(t, m, [dict(REC, prompt="count from 3", sample_index=0)], "--rollout.temperature", "0.7")


def s_other_seed(t, m):
    return _signed(t, m, [dict(REC, prompt="count from 3", sample_index=0)], "--seed", "5")


def s_other_model(t, m):
    argv = _signed(t, m, [dict(REC, prompt="count from 3", sample_index=0)])
    argv[argv.index("--model") + 1] = m["llm2"]
    return argv


def s_other_template(t, m):
    return _signed(t, m, [dict(REC, prompt="count from 3", sample_index=0)], "--data.input_template", "Q: {}\nA:")


def s_duplicate_keys(t, m):
    return _signed(t, m, [dict(REC, prompt="count from 3", sample_index=0), dict(REC, prompt="count from 7",
                                                                                 sample_index=0),
                          dict(REC, prompt="count from 3", sample_index=0)])


def s_bad_record_then_torn_tail(t, m):
    argv = _signed(t, m, [dict(REC, prompt="count from 3", sample_index=0, finished="no")])
    with open(t / "out.jsonl", "a") as f:
        f.write('{"prompt": "count fr')
    return argv


def s_corrupt_sidecar(t, m):
    argv = _signed(t, m, [dict(REC, prompt="count from 3", sample_index=0)])
    (t / "out.jsonl.provenance.json").write_text("{not json")
    return argv


def s_locked(t, m):
    return sample_args(m["llm"], _prompts(t), str(t / "out.jsonl"))


def s_prompt_too_long(t, m):
    p = write(t / "prompts.jsonl", PROMPTS + [{"prompt": " ".join(["count"] * 400)}])
    return sample_args(m["llm"], p, str(t / "out.jsonl"))


def s_not_a_model(t, m):
    (t / "empty_model").mkdir()
    return sample_args(str(t / "empty_model"), _prompts(t), str(t / "out.jsonl"))


def s_missing_model(t, m):
    return sample_args(str(t / "no_such_model"), _prompts(t), str(t / "out.jsonl"))


def s_model_is_a_file(t, m):
    (t / "model.bin").write_text("x")
    return sample_args(str(t / "model.bin"), _prompts(t), str(t / "out.jsonl"))


def s_hub_name_offline(t, m):
    return sample_args("some-org/some-model-not-cached", _prompts(t), str(t / "out.jsonl"))


def s_hub_name_no_network(t, m):
    argv = sample_args("some-org/some-model-not-cached", _prompts(t), str(t / "out.jsonl"))
    return argv, {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "https://127.0.0.1:9"}


def s_no_eos(t, m):
    model = t / "no_eos"
    shutil.copytree(m["llm"], model)
    for name, keys in (("tokenizer_config.json", ("eos_token",)), ("config.json", ("eos_token_id",)),
                       ("generation_config.json", ("eos_token_id",))):
        cfg = json.loads((model / name).read_text())
        for key in keys:
            cfg[key] = None
        (model / name).write_text(json.dumps(cfg))
    return sample_args(str(model), _prompts(t), str(t / "out.jsonl"))


def s_output_dir_is_a_file(t, m):
    (t / "afile").write_text("x")
    return sample_args(m["llm"], _prompts(t), str(t / "afile" / "out.jsonl"))


def s_output_is_a_dir(t, m):
    (t / "adir").mkdir()
    return sample_args(m["llm"], _prompts(t), str(t / "adir"))


def s_read_only_output_dir(t, m):
    return sample_args(m["llm"], _prompts(t), "/proc/out.jsonl")  # read-only even for root


def s_flag(*flags):
    def setup(t, m):
        return sample_args(m["llm"], _prompts(t), str(t / "out.jsonl"), *flags)
    return setup


def s_lora_not_adapter(t, m):
    (t / "lora").mkdir()
    return sample_args(m["llm"], _prompts(t), str(t / "out.jsonl"), "--lora", str(t / "lora"))


# ------------------------------------------------------------------------------------------- build_afd_dataset


def _samples(t, name, policy):
    return write(t / name, [dict(REC, prompt=p["prompt"], policy=policy, sample_index=0) for p in PROMPTS])


def b_output_is(which):
    def setup(t, m):
        init, sft = _samples(t, "init.jsonl", "init"), _samples(t, "sft.jsonl", "sft")
        return ["--init-samples", init, "--sft-samples", sft, "--output", init if which == "init" else sft]
    return setup


def b_output_dir_is_a_file(t, m):
    (t / "afile").write_text("x")
    return ["--init-samples", _samples(t, "init.jsonl", "init"), "--sft-samples", _samples(t, "sft.jsonl", "sft"),
            "--output", str(t / "afile" / "o.jsonl")]


def b_flag(*flags):
    def setup(t, m):
        return ["--init-samples", _samples(t, "init.jsonl", "init"), "--sft-samples",
                _samples(t, "sft.jsonl", "sft"), "--output", str(t / "o.jsonl"), *flags]
    return setup


# ------------------------------------------------------------------------------------------- best_of_n


def n_args(t, m, *extra):
    return ["--policy", m["llm"], "--prompts", _prompts(t), "--output-dir", str(t / "bon"), "--backend", "hf",
            "--num-actors", "1", "--rollout.max_new_tokens", "8", "--n", "1,2", *extra]


def n_setup(*extra, log_ratio=True):
    def setup(t, m):
        flags = [x.format(llm=m["llm"], t=t) for x in extra]
        return n_args(t, m, *(["--log-ratio-init", m["llm"]] if log_ratio else []), *flags)
    return setup


def n_samples_signed(records_fn, *flags):
    def setup(t, m):
        argv = n_args(t, m, "--log-ratio-init", m["llm"])
        out = str(t / "bon" / "samples.jsonl")
        sample_argv = ["--model", m["llm"], "--prompts", _prompts(t), "--data.input_key", "prompt",
                       "--rollout.n_samples_per_prompt", "2", "--rollout.temperature", "1.0", "--rollout.top_p", "0.95",
                       "--rollout.max_new_tokens", "8", "--num-actors", "1",
                       "--backend", "hf", "--policy-name", "policy", "--output", out, "--seed", "0",
                       "--batch-size", "8"]
        write(Path(out), records_fn())
        sign(sample_argv, out)
        mark_dir(str(t / "bon"), "openrlhf_irl.cli.best_of_n")  # as an earlier run of best_of_n left it
        return argv + [x.format(llm2=m["llm2"]) for x in flags]
    return setup


def _dup_records():
    return [dict(REC, policy="policy", prompt="count from 3", sample_index=0),
            dict(REC, policy="policy", prompt="count from 3", sample_index=0)]


def _one_record():
    return [dict(REC, policy="policy", prompt="count from 3", sample_index=0)]


def n_output_dir_is_a_file(t, m):
    (t / "bon").write_text("x")
    return n_args(t, m, "--log-ratio-init", m["llm"])


# ------------------------------------------------------------------------------------------- prepare_hh_rlhf

HH = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}


def h_empty(t, m):
    (t / "hh.jsonl").write_text("")
    return ["--input", str(t / "hh.jsonl"), "--output-dir", str(t / "out")]


def h_flag(*flags):
    def setup(t, m):
        return ["--input", write(t / "hh.jsonl", [HH]), "--output-dir", str(t / "out"), *flags]
    return setup


def h_missing_input(t, m):
    return ["--input", str(t / "nope.jsonl"), "--output-dir", str(t / "out")]


def h_output_dir_is_a_file(t, m):
    (t / "out").write_text("x")
    return ["--input", write(t / "hh.jsonl", [HH]), "--output-dir", str(t / "out")]


def h_output_is_input(t, m):
    return ["--input", write(t / "demos.jsonl", [HH]), "--output-dir", str(t)]


# ------------------------------------------------------------------------------------------- train_rm


def r_few_records(t, m):
    rows = [{"prompt": f"count from {i}", "response": "1 2", "label": i % 2} for i in range(60)]
    data = write(t / "labels.jsonl", rows)
    return ["--trainer", "afd_rm", "--model.model_name_or_path", m["llm"], "--data.dataset", data,
            "--data.prompt_key", "prompt", "--ckpt.output_dir", str(t / "rm")]


CASES = {
    # sample: data loss, stale results, silent results, tracebacks
    "sample/output-is-the-prompts-file": Case("sample", s_output_is_prompts, "is the same file as --prompts"),
    "sample/foreign-output-torn-tail-not-repaired": Case("sample", s_foreign_output_with_torn_tail,
                                                         "no out.jsonl.provenance.json"),
    "sample/rerun-other-temperature": Case("sample", s_other_temperature, "sampling.temperature: 1.0 before, 0.7 now"),
    "sample/rerun-other-seed": Case("sample", s_other_seed, "sampling.seed: 0 before, 5 now"),
    "sample/rerun-other-model": Case("sample", s_other_model, "model.weights"),
    "sample/rerun-other-template": Case("sample", s_other_template, "prompt_format.input_template"),
    "sample/duplicate-keys": Case("sample", s_duplicate_keys, "out.jsonl, line 3, field 'sample_index': repeated"),
    "sample/bad-record-torn-tail-not-repaired": Case("sample", s_bad_record_then_torn_tail,
                                                     "out.jsonl, line 1, field 'finished'"),
    "sample/corrupt-provenance": Case("sample", s_corrupt_sidecar, "provenance.json: not valid JSON"),
    "sample/second-writer": Case("sample", s_locked, "another job is writing this file", hold_lock=True),
    "sample/prompt-longer-than-context": Case("sample", s_prompt_too_long,
                                              "prompts.jsonl, line 3, field 'prompt': 401 prompt tokens + "
                                              "--rollout.max_new_tokens 8 exceed the model's context of 256 tokens"),
    "sample/model-dir-not-a-model": Case("sample", s_not_a_model, "not a model directory (no config.json)"),
    "sample/missing-model": Case("sample", s_missing_model, "no such model directory"),
    "sample/model-is-a-file": Case("sample", s_model_is_a_file, "is a file, expected a model directory"),
    "sample/hub-name-offline": Case("sample", s_hub_name_offline, "HF_HUB_OFFLINE is set"),
    "sample/hub-name-no-network": Case("sample", s_hub_name_no_network, "hub is not reachable"),
    "sample/tokenizer-without-eos": Case("sample", s_no_eos, "defines an EOS token"),
    "sample/output-dir-is-a-file": Case("sample", s_output_dir_is_a_file, "exists and is not a directory"),
    "sample/output-is-a-dir": Case("sample", s_output_is_a_dir, "is a directory, expected a file path"),
    "sample/read-only-output-dir": Case("sample", s_read_only_output_dir, "directory is not writable"),
    "sample/batch-size-0": Case("sample", s_flag("--batch-size", "0"), "--batch-size: must be >= 1, got 0"),
    "sample/max-prompts-0": Case("sample", s_flag("--max-prompts", "0"), "--max-prompts: must be >= 1, got 0"),
    "sample/n-samples-negative": Case("sample", s_flag("--rollout.n_samples_per_prompt", "-1"),
                                      "--rollout.n_samples_per_prompt: must be >= 1, got -1"),
    "sample/max-new-tokens-beyond-context": Case("sample", s_flag("--rollout.max_new_tokens", "300"),
                                                 "leaves no room for a prompt"),
    "sample/lora-not-an-adapter": Case("sample", s_lora_not_adapter, "not a PEFT adapter"),
    # build_afd_dataset
    "build/output-is-init-samples": Case("build_afd_dataset", b_output_is("init"),
                                         "is the same file as --init-samples"),
    "build/output-is-sft-samples": Case("build_afd_dataset", b_output_is("sft"), "is the same file as --sft-samples"),
    "build/output-dir-is-a-file": Case("build_afd_dataset", b_output_dir_is_a_file, "exists and is not a directory"),
    "build/max-pairs-0": Case("build_afd_dataset", b_flag("--max-pairs-per-prompt", "0"), "must be >= 1, got 0"),
    "build/max-prompt-len-negative": Case("build_afd_dataset", b_flag("--tokenizer", "x", "--max-prompt-len", "-1"),
                                          "must be >= 1, got -1"),
    # best_of_n: every check before sampling (no samples.jsonl appears)
    "bon/bad-golden-module": Case("best_of_n", n_setup("--golden", "no_such_module_xyz:f"), "--golden"),
    "bon/golden-dir-not-a-reward-model": Case("best_of_n", n_setup("--golden", "{llm}"), "--golden"),
    "bon/missing-reward-model": Case("best_of_n", n_setup("--reward-model", "{t}/nope", log_ratio=False),
                                     "--reward-model"),
    "bon/reward-model-is-a-causal-lm": Case("best_of_n", n_setup("--reward-model", "{llm}", log_ratio=False),
                                            "not a reward model"),
    "bon/missing-log-ratio-init": Case("best_of_n", n_setup("--log-ratio-init", "{t}/nope", log_ratio=False),
                                       "--log-ratio-init"),
    "bon/max-prompts-0": Case("best_of_n", n_setup("--max-prompts", "0"), "--max-prompts: must be >= 1, got 0"),
    "bon/batch-size-0": Case("best_of_n", n_setup("--batch-size", "0"), "--batch-size: must be >= 1, got 0"),
    "bon/n-0": Case("best_of_n", n_setup("--n", "0,2"), "--n expects positive integers"),
    "bon/output-dir-is-a-file": Case("best_of_n", n_output_dir_is_a_file, "exists and is not a directory"),
    "bon/duplicate-candidate-keys": Case("best_of_n", n_samples_signed(_dup_records), "repeated (prompt"),
    "bon/stale-samples-other-temperature": Case("best_of_n",
                                                n_samples_signed(_one_record, "--rollout.temperature", "0.5"),
                                                "sampling.temperature: 1.0 before, 0.5 now"),
    "bon/stale-samples-other-policy": Case("best_of_n", n_samples_signed(_one_record, "--policy", "{llm2}"),
                                           "model.path"),
    # prepare_hh_rlhf
    "hh/empty-input": Case("prepare_hh_rlhf", h_empty, "no usable records"),
    "hh/max-records-0": Case("prepare_hh_rlhf", h_flag("--max-records", "0"), "--max-records: must be >= 1, got 0"),
    "hh/max-records-negative": Case("prepare_hh_rlhf", h_flag("--max-records", "-1"),
                                    "--max-records: must be >= 1, got -1"),
    "hh/missing-input": Case("prepare_hh_rlhf", h_missing_input, "no such file"),
    "hh/output-dir-is-a-file": Case("prepare_hh_rlhf", h_output_dir_is_a_file, "exists and is not a directory"),
    "hh/output-overwrites-input": Case("prepare_hh_rlhf", h_output_is_input, "is the same file as --input"),
    # train_rm
    "train_rm/afd-rm-few-records-no-eval": Case("train_rm", r_few_records, "pass --eval.dataset"),
}


# ------------------------------------------------------------------------------------------- issue 23, classes 1 and 2
# Class 1: an output that is, or lies inside, an input, or something this package did not write (a marker says
# what it wrote); class 2: numbers that cannot be right.


def _model_copy(t, m, name="model"):
    """A copy of the tiny model inside the case directory, so the snapshot covers it."""
    shutil.copytree(m["llm"], t / name)
    return str(t / name)


def _foreign_dir(t, name):
    (t / name).mkdir(parents=True)
    (t / name / "notes.txt").write_text("the user's own file\n")
    return str(t / name)


def _foreign_file(t, name):
    (t / name).write_text("the user's own file\n")
    return str(t / name)


def _link_to_foreign(t, name):
    target = _foreign_file(t, "target_" + name)
    os.symlink(target, t / name)
    return str(t / name)


def s_output(kind):
    def setup(t, m):
        out = {"empty": "", "inside-model": str(Path(_model_copy(t, m)) / "out.jsonl")}[kind]
        model = str(t / "model") if kind == "inside-model" else m["llm"]
        return sample_args(model, _prompts(t), out)
    return setup


def b_output(kind):
    def setup(t, m):
        init, sft = _samples(t, "init.jsonl", "init"), _samples(t, "sft.jsonl", "sft")
        extra = []
        if kind == "unused-demos":
            out = write(t / "demos.jsonl", [{"prompt": "count from 3", "response": " 1 2"}])
            extra = ["--demos", out]  # init-sft does not read --demos: still the user's file
        else:
            out = {"empty": lambda: "", "foreign": lambda: _foreign_file(t, "o.jsonl"),
                   "symlink": lambda: _link_to_foreign(t, "o.jsonl")}[kind]()
        return ["--init-samples", init, "--sft-samples", sft, "--output", out, *extra]
    return setup


def n_output(kind):
    def setup(t, m):
        if kind == "policy":
            model = _model_copy(t, m)
            argv = n_args(t, m, "--log-ratio-init", m["llm"])
            argv[argv.index("--policy") + 1] = model
            argv[argv.index("--output-dir") + 1] = model
            return argv
        if kind == "inside-log-ratio-init":
            argv = n_args(t, m, "--log-ratio-init", _model_copy(t, m, "init"))
            argv[argv.index("--output-dir") + 1] = str(t / "init" / "bon")
            return argv
        out = {"empty": lambda: "", "foreign": lambda: _foreign_dir(t, "bon")}[kind]()
        argv = n_args(t, m, "--log-ratio-init", m["llm"])
        argv[argv.index("--output-dir") + 1] = out
        return argv
    return setup


def n_golden_nan(t, m):
    mods = t.parent / "mods"  # outside the case directory (its __pycache__ is not the CLI's doing)
    mods.mkdir(exist_ok=True)
    name = f"golden_nan_{abs(hash(str(t))) % 10**8}"
    (mods / f"{name}.py").write_text("def reward(prompt, response):\n    return float('nan')\n")
    return n_args(t, m, "--log-ratio-init", m["llm"], "--golden", f"{name}:reward"), {"PYTHONPATH": str(mods)}


def _extract_data(t, response=" 1 2"):
    return write(t / "data.jsonl", [{"prompt": "count from 3", "response": response}])


def e_case(kind):
    def setup(t, m):
        data, model, extra = _extract_data(t), m["llm"], []
        out = str(t / "rewards.jsonl")
        if kind == "inside-model":
            model = _model_copy(t, m)
            out = str(Path(model) / "rewards.jsonl")
        elif kind == "foreign":
            out = _foreign_file(t, "rewards.jsonl")
        elif kind == "symlink":
            out = _link_to_foreign(t, "rewards.jsonl")
        elif kind == "empty":
            out = ""
        elif kind == "report-is-output":
            extra = ["--report", out]
        elif kind == "beyond-context":
            data = _extract_data(t, " " + " ".join(str(i % 10) for i in range(400)))
            extra = ["--data.max_len", "1000"]
        return ["--model", model, "--data", data, "--output", out, "--device", "cpu", *extra]
    return setup


def h_output(kind):
    def setup(t, m):
        out = {"empty": lambda: "", "foreign": lambda: _foreign_dir(t, "out"),
               "symlink": lambda: (os.symlink(_foreign_dir(t, "theirs"), t / "out"), str(t / "out"))[1]}[kind]()
        return ["--input", write(t / "hh.jsonl", [HH]), "--output-dir", out]
    return setup


def _sft_data(t):
    return write(t / "sft.jsonl", [{"prompt": f"count from {i}", "response": " 1 2"} for i in range(4)])


def _train_argv(task, t, m, model):
    if task == "train_sft":
        return ["--trainer", "irl_iq", "--model.model_name_or_path", model, "--data.dataset", _sft_data(t),
                "--data.input_key", "prompt", "--data.output_key", "response", "--ckpt.output_dir", str(t / "out")]
    rows = [{"prompt": f"count from {i}", "response": "1 2", "label": i % 2} for i in range(4)]
    data = write(t / "labels.jsonl", rows)
    return ["--trainer", "afd_rm", "--model.model_name_or_path", model, "--data.dataset", data,
            "--eval.dataset", data, "--data.prompt_key", "prompt", "--ckpt.output_dir", str(t / "out")]


def t_case(task, kind, *flags):
    def setup(t, m):
        model = _model_copy(t, m) if kind in ("is-model", "inside-model") else m["llm"]
        argv = _train_argv(task, t, m, model)
        out = argv.index("--ckpt.output_dir") + 1
        if kind == "is-model":
            argv[out] = model
        elif kind == "inside-model":
            argv[out] = str(Path(model) / "sft")
        elif kind == "is-dataset":
            argv[out] = argv[argv.index("--data.dataset") + 1]
        elif kind == "foreign":
            argv[out] = _foreign_dir(t, "out")
        elif kind == "empty":
            argv[out] = ""
        elif kind == "ckpt-path-foreign":
            argv += ["--ckpt.path", _foreign_dir(t, "ckpts"), "--ckpt.save_steps", "1"]
        return argv + list(flags)
    return setup


def p_case(kind, *flags):
    def setup(t, m):
        model = _model_copy(t, m) if kind == "is-actor" else m["llm"]
        prompts = write(t / "prompts.jsonl", PROMPTS)
        argv = ["--actor.model_name_or_path", model, "--data.prompt_dataset", prompts, "--data.input_key", "prompt",
                "--reward.remote_url", str(REPO / "openrlhf_irl" / "afd" / "ppo_reward_func.py"),
                "--ckpt.output_dir", model if kind == "is-actor" else str(t / "out")]
        return argv + list(flags)
    return setup


def d_case(command, kind):
    def setup(t, m):
        extra = ["--quick"] if command == "demo" else ["--scale", "quick", "--seeds", "1"]
        if kind == "empty":
            out = ""
        elif kind == "foreign":
            out = _foreign_dir(t, "outputs")
        else:  # a seed_0/ folder the experiment did not write, in a folder it did
            out = str(t / "outputs")
            mark_dir(out, "openrlhf-irl")
            _foreign_dir(t, "outputs/seed_0")
        return [command, "--output-dir", out, *extra]
    return setup


NOT_OURS = "so it was not written by this tool and is left as it is"
CASES_23 = {
    # class 1
    "sample/output-empty": Case("sample", s_output("empty"), "--output: empty path"),
    "sample/output-inside-the-model": Case("sample", s_output("inside-model"), "lies inside --model"),
    "build/output-is-an-unused-input": Case("build_afd_dataset", b_output("unused-demos"),
                                            "is the same file as --demos"),
    "build/output-empty": Case("build_afd_dataset", b_output("empty"), "--output: empty path"),
    "build/output-foreign-file": Case("build_afd_dataset", b_output("foreign"), NOT_OURS),
    "build/output-symlink-to-a-foreign-file": Case("build_afd_dataset", b_output("symlink"), NOT_OURS),
    "bon/output-dir-foreign": Case("best_of_n", n_output("foreign"), NOT_OURS),
    "bon/output-dir-empty": Case("best_of_n", n_output("empty"), "--output-dir: empty path"),
    "bon/output-dir-is-the-policy": Case("best_of_n", n_output("policy"), "is the same file as --policy"),
    "bon/output-dir-inside-log-ratio-init": Case("best_of_n", n_output("inside-log-ratio-init"),
                                                 "lies inside --log-ratio-init"),
    "extract/output-inside-the-model": Case("extract_reward", e_case("inside-model"), "lies inside --model"),
    "extract/output-foreign-file": Case("extract_reward", e_case("foreign"), NOT_OURS),
    "extract/output-symlink-to-a-foreign-file": Case("extract_reward", e_case("symlink"), NOT_OURS),
    "extract/output-empty": Case("extract_reward", e_case("empty"), "--output: empty path"),
    "extract/report-is-the-output": Case("extract_reward", e_case("report-is-output"), "are the same path"),
    "hh/output-dir-foreign": Case("prepare_hh_rlhf", h_output("foreign"), NOT_OURS),
    "hh/output-dir-empty": Case("prepare_hh_rlhf", h_output("empty"), "--output-dir: empty path"),
    "hh/output-dir-symlink-to-a-foreign-dir": Case("prepare_hh_rlhf", h_output("symlink"), NOT_OURS),
    "train_sft/output-dir-is-the-model": Case("train_sft", t_case("train_sft", "is-model"),
                                              "is the same file as --model.model_name_or_path"),
    "train_sft/output-dir-inside-the-model": Case("train_sft", t_case("train_sft", "inside-model"),
                                                  "lies inside --model.model_name_or_path"),
    "train_sft/output-dir-is-the-dataset": Case("train_sft", t_case("train_sft", "is-dataset"),
                                                "is the same file as --data.dataset"),
    "train_sft/output-dir-foreign": Case("train_sft", t_case("train_sft", "foreign"), NOT_OURS),
    "train_sft/output-dir-empty": Case("train_sft", t_case("train_sft", "empty"), "--ckpt.output_dir: empty path"),
    "train_sft/ckpt-path-foreign": Case("train_sft", t_case("train_sft", "ckpt-path-foreign"),
                                        "neither .openrlhf-irl-output.json nor DeepSpeed's 'latest'"),
    "train_rm/output-dir-is-the-model": Case("train_rm", t_case("train_rm", "is-model"),
                                             "is the same file as --model.model_name_or_path"),
    "train_rm/output-dir-foreign": Case("train_rm", t_case("train_rm", "foreign"), NOT_OURS),
    "train_ppo/output-dir-is-the-actor": Case("train_ppo", p_case("is-actor"),
                                              "is the same file as --actor.model_name_or_path"),
    "demo/output-dir-foreign": Case("openrlhf_irl.__main__", d_case("demo", "foreign"), NOT_OURS),
    "demo/output-dir-empty": Case("openrlhf_irl.__main__", d_case("demo", "empty"), "--output-dir: empty path"),
    "experiment/output-dir-foreign": Case("openrlhf_irl.__main__", d_case("experiment", "foreign"), NOT_OURS),
    "size-task/output-dir-foreign": Case("openrlhf_irl.__main__", lambda t, m: [
        "size-task", "--task", "sort", "--quick", "--output-dir", _foreign_dir(t, "outputs")], NOT_OURS),
    "experiment/seed-dir-it-did-not-write": Case("openrlhf_irl.__main__", d_case("experiment", "seed"),
                                                 "--output-dir's seed_0/"),
    # class 2
    "demo/expert-habit-on-sort": Case("openrlhf_irl.__main__", lambda t, m: [
        "demo", "--quick", "--task", "sort", "--expert-habit", "--output-dir", str(t / "out")],
        "--expert-habit: only the bigram task has an expert habit, not --task sort"),
    "bon/golden-returns-nan": Case("best_of_n", n_golden_nan, "returned nan for record 0"),
    "extract/row-beyond-the-context": Case("extract_reward", e_case("beyond-context"),
                                           "data.jsonl, line 1, field 'response': 451 tokens, beyond the model's "
                                           "context of 256"),
    "train_sft/adam-lr-inf": Case("train_sft", t_case("train_sft", "ok", "--adam.lr", "inf"),
                                  "--adam.lr: must be a finite number, got inf"),
    "train_sft/batch-size-0": Case("train_sft", t_case("train_sft", "ok", "--train.batch_size", "0"),
                                   "--train.batch_size: must be in [1, inf), got 0"),
    "train_sft/lr-warmup-ratio-2": Case("train_sft", t_case("train_sft", "ok", "--lr_warmup_ratio", "2"),
                                        "--lr_warmup_ratio: must be in [0, 1], got 2.0"),
    "train_rm/adam-lr-nan": Case("train_rm", t_case("train_rm", "ok", "--adam.lr", "nan"),
                                 "--adam.lr: must be a finite number, got nan"),
    "train_rm/micro-batch-size-0": Case("train_rm", t_case("train_rm", "ok", "--train.micro_batch_size", "0"),
                                        "--train.micro_batch_size: must be in [1, inf), got 0"),
    "train_ppo/rollout-temperature-inf": Case("train_ppo", p_case("ok", "--rollout.temperature", "inf"),
                                              "--rollout.temperature: must be a finite number, got inf"),
    "train_ppo/rollout-top-p-1.5": Case("train_ppo", p_case("ok", "--rollout.top_p", "1.5"),
                                        "--rollout.top_p: must be in (0, 1], got 1.5"),
}
CASES.update(CASES_23)

# Sampling numbers out of range (class 2), in sample and best_of_n alike: (flag, value, the error after the flag)
SAMPLING_RANGES = [
    ("--rollout.temperature", "nan", "must be a finite number in [0, 100], got nan"),
    ("--rollout.temperature", "inf", "must be a finite number in [0, 100], got inf"),
    ("--rollout.temperature", "1e-45", "must be 0 (greedy) or at least 0.001, got 1e-45"),
    ("--rollout.top_p", "0", "must be a finite number in (0, 1], got 0"),
    ("--rollout.top_p", "1.5", "must be a finite number in (0, 1], got 1.5"),
]
for _flag, _value, _says in SAMPLING_RANGES:
    _name = f"{_flag.rsplit('.', 1)[-1].replace('_', '-')}-{_value}"
    CASES[f"sample/{_name}"] = Case("sample", s_flag(_flag, _value), f"{_flag}: {_says}")
    CASES[f"bon/{_name}"] = Case("best_of_n", n_setup(_flag, _value), f"{_flag}: {_says}")


# ------------------------------------------------------------------------------------------- issue 23, classes 4 and 6
# Class 4: inputs found wrong only after the expensive part (records contradicting their flag, truncated models, a
# tokenizer larger than its model), refused up front. Class 6: a user's mistake found late, a full disk or a Ctrl-C
# end in one line (Ctrl-C: ``interrupted: ...``, exit 130), never a traceback.


def _truncated_model(t, m, name="model"):
    """A copy of the tiny model whose model.safetensors lost its second half (an interrupted copy)."""
    path = Path(_model_copy(t, m, name))
    weights = path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return str(path)


def _variant_model(t, m, name, **config_changes):
    """A fresh model of the tiny model's config with ``config_changes``, saved with the tiny model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(m["llm"])
    for key, value in config_changes.items():
        setattr(config, key, value)
    AutoModelForCausalLM.from_config(config).save_pretrained(t / name)
    for f in os.listdir(m["llm"]):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(m["llm"], f), t / name / f)
    return str(t / name)


def _small_vocab_model(t, m, name="model"):
    """A model with 100 embedding rows beside the tiny model's 300-token tokenizer (they do not belong together)."""
    return _variant_model(t, m, name, vocab_size=100)


def _model_without_config(t, m, name="model"):
    path = Path(_model_copy(t, m, name))
    (path / "config.json").unlink()
    return str(path)


def _head_dim_16_model(t, m, name="model"):
    """A whole model with heads of 16 dimensions: transformers runs it, vLLM's CPU attention cannot (>= 32)."""
    from transformers import AutoConfig

    heads = AutoConfig.from_pretrained(m["llm"]).hidden_size // 16
    return _variant_model(t, m, name, num_attention_heads=heads, num_key_value_heads=heads, head_dim=16)


MODEL_KINDS = {"truncated": _truncated_model, "small-vocab": _small_vocab_model, "no-config": _model_without_config,
               "head-dim-16": _head_dim_16_model}


def s_model(kind):
    def setup(t, m):
        return sample_args(MODEL_KINDS[kind](t, m), _prompts(t), str(t / "out.jsonl"))
    return setup


def e_model(kind):
    def setup(t, m):
        return ["--model", MODEL_KINDS[kind](t, m), "--data", _extract_data(t), "--output", str(t / "rewards.jsonl"),
                "--device", "cpu"]
    return setup


def s_lora_truncated(t, m):
    """A LoRA adapter whose adapter_model.safetensors stops inside its header (an interrupted copy)."""
    (t / "lora").mkdir()
    (t / "lora" / "adapter_config.json").write_text("{}")
    (t / "lora" / "adapter_model.safetensors").write_bytes((400).to_bytes(8, "little") + b'{"base_model.')
    return sample_args(m["llm"], _prompts(t), str(t / "out.jsonl"), "--lora", str(t / "lora"))


def n_log_ratio_init_truncated(t, m):
    return n_args(t, m, "--log-ratio-init", _truncated_model(t, m, "init"))


def t_model(task, kind):
    def setup(t, m):
        return _train_argv(task, t, m, MODEL_KINDS[kind](t, m))
    return setup


def p_actor(kind, *flags):
    def setup(t, m):
        argv = p_case("ok", *flags)(t, m)
        argv[argv.index("--actor.model_name_or_path") + 1] = MODEL_KINDS[kind](t, m, "actor")
        return argv
    return setup


def b_policies(init_policy, sft_policy, mixed=False):
    def setup(t, m):
        init = write(t / "init.jsonl", [dict(REC, prompt=p["prompt"], policy=init_policy, sample_index=0)
                                        for p in PROMPTS])
        sft_rows = [dict(REC, prompt=p["prompt"], policy=sft_policy, sample_index=0) for p in PROMPTS]
        if mixed:
            sft_rows[1]["policy"] = "sft-other"
        sft = write(t / "sft.jsonl", sft_rows)
        return ["--init-samples", init, "--sft-samples", sft, "--output", str(t / "o.jsonl")]
    return setup


def r_data(trainer, kind):
    """train_rm on a file of the wrong shape for ``trainer``: labels given as strings, pairs for labels, labels for
    pairs."""
    def setup(t, m):
        if kind == "pairs":
            rows = [{"prompt": f"count from {i}", "chosen": " 1 2", "rejected": " 9 9"} for i in range(4)]
        else:
            label = (lambda i: str(i % 2)) if kind == "string-labels" else (lambda i: i % 2)
            rows = [{"prompt": f"count from {i}", "response": " 1 2", "label": label(i)} for i in range(4)]
        data = write(t / "data.jsonl", rows)
        return ["--trainer", trainer, "--model.model_name_or_path", m["llm"], "--data.dataset", data,
                "--eval.dataset", data, "--data.prompt_key", "prompt", "--ckpt.output_dir", str(t / "out")]
    return setup


def t_output_under_a_file(task):
    def setup(t, m):
        argv = _train_argv(task, t, m, m["llm"])
        argv[argv.index("--ckpt.output_dir") + 1] = str(Path(_foreign_file(t, "afile")) / "out")
        return argv
    return setup


def _raise(exc):
    def raiser(*args, **kwargs):
        raise exc
    return raiser


def ctrl_c_in(target):
    """Ctrl-C (KeyboardInterrupt) raised where ``target`` is called: the CLI's expensive part."""
    def patch(monkeypatch):
        monkeypatch.setattr(target, _raise(KeyboardInterrupt()))
    return patch


def disk_full_in(target, file_name):
    def patch(monkeypatch):
        monkeypatch.setattr(target, _raise(OSError(28, "No space left on device", file_name)))
    return patch


def _sample_pool_interrupted(monkeypatch):
    import openrlhf_irl.generation.ray_pool as ray_pool

    monkeypatch.setattr(ray_pool, "GenerationPool", _raise(KeyboardInterrupt()))


class _FakePool:
    """A generation pool that yields one finished sample per request at once (no Ray, no model)."""
    backend, _started_ray = "fake", False

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def generate_stream(self, formatted, params, skip):
        from types import SimpleNamespace

        yield [SimpleNamespace(prompt_index=i, sample_index=s, text=" 1 2", finished=True, logprob=-1.0)
               for i in range(len(formatted)) for s in range(params.n) if (i, s) not in skip]


def _sample_disk_full(monkeypatch):
    import openrlhf_irl.generation.ray_pool as ray_pool

    monkeypatch.setattr(ray_pool, "GenerationPool", _FakePool)
    monkeypatch.setattr("openrlhf_irl.cli.sample.append_jsonl",
                        _raise(OSError(28, "No space left on device", "out.jsonl")))


def _extract_args(t, m):
    return ["--model", m["llm"], "--data", _extract_data(t), "--output", str(t / "rewards.jsonl"), "--device", "cpu"]


INTERRUPTED = "stopped by Ctrl-C"
TRUNCATED = "model.safetensors is truncated"
VOCAB = "its tokenizer has 300 tokens but the model only 100"
CASES_23_4_6 = {
    # class 4: records that contradict their flag
    "build/init-and-sft-samples-swapped": Case("build_afd_dataset", b_policies("sft", "init"),
                                               "init.jsonl, line 1, field 'policy': 'sft' samples given as "
                                               "--init-samples"),
    "build/both-files-one-policy": Case("build_afd_dataset", b_policies("p", "p"),
                                        "sft.jsonl, line 1, field 'policy': 'p', the same policy as --init-samples"),
    "build/sft-file-mixes-policies": Case("build_afd_dataset", b_policies("init", "sft", mixed=True),
                                          "sft.jsonl, line 2, field 'policy': 'sft-other', but line 1 has 'sft'"),
    # class 4: every model whole and agreeing with its tokenizer, before work
    "sample/truncated-model": Case("sample", s_model("truncated"), TRUNCATED),
    "sample/tokenizer-larger-than-the-model": Case("sample", s_model("small-vocab"), VOCAB),
    "sample/lora-truncated": Case("sample", s_lora_truncated, "lora: adapter_model.safetensors is truncated"),
    "bon/log-ratio-init-truncated": Case("best_of_n", n_log_ratio_init_truncated,
                                         "init: " + TRUNCATED),
    "extract/truncated-model": Case("extract_reward", e_model("truncated"), TRUNCATED),
    "extract/tokenizer-larger-than-the-model": Case("extract_reward", e_model("small-vocab"), VOCAB),
    "train_sft/truncated-model": Case("train_sft", t_model("train_sft", "truncated"),
                                      "model: " + TRUNCATED),
    "train_rm/tokenizer-larger-than-the-model": Case("train_rm", t_model("train_rm", "small-vocab"), VOCAB),
    "train_ppo/actor-truncated": Case("train_ppo", p_actor("truncated"), "actor: " + TRUNCATED),
    # was: the engine failed after 81 s with "EngineCore encountered an issue"
    "train_ppo/actor-head-dim-16": Case("train_ppo", p_actor("head-dim-16", "--vllm.num_engines", "1"),
                                        "head_dim 16 (config.json hidden_size / num_attention_heads) is below the 32"),
    # class 6: a user's mistake that used to surface after the model loaded
    "train_sft/model-without-config": Case("train_sft", t_model("train_sft", "no-config"), "no config.json"),
    "train_rm/afd-rm-labels-as-strings": Case("train_rm", r_data("afd_rm", "string-labels"),
                                              "data.jsonl, line 1, field 'label': expected the number 0 or 1, "
                                              "got '0' (a string)"),
    "train_rm/afd-rm-given-pairs": Case("train_rm", r_data("afd_rm", "pairs"), "this is a pairs record"),
    "train_rm/rm-given-labels": Case("train_rm", r_data("rm", "labels"), "this is a labels record"),
    "train_sft/output-dir-under-a-file": Case("train_sft", t_output_under_a_file("train_sft"),
                                              "afile is a file, not a directory"),
    "extract/disk-full": Case("extract_reward", _extract_args, "rewards.jsonl: No space left on device", code=1,
                              patch=disk_full_in("openrlhf_irl.cli.extract_reward.atomic_write_jsonl",
                                                 "rewards.jsonl")),
    "sample/disk-full": Case("sample", s_flag(), "out.jsonl: No space left on device", code=1,
                             patch=_sample_disk_full),
    "train_sft/disk-full": Case("train_sft", t_case("train_sft", "ok"), ".json: No space left on device", code=1,
                                patch=disk_full_in("openrlhf_irl.cli.train_checks.claim_outputs",
                                                   "out/.openrlhf-irl-output.json")),
    # class 6: Ctrl-C in the expensive part of each CLI: exit 130, one line
    "sample/ctrl-c": Case("sample", s_flag(), INTERRUPTED, code=130, patch=_sample_pool_interrupted),
    "build/ctrl-c": Case("build_afd_dataset", b_flag(), INTERRUPTED, code=130,
                         patch=ctrl_c_in("openrlhf_irl.cli.build_afd_dataset.build_afd_dataset")),
    "extract/ctrl-c": Case("extract_reward", _extract_args, INTERRUPTED, code=130,
                           patch=ctrl_c_in("openrlhf_irl.cli.extract_reward.score_batch")),
    "train_sft/ctrl-c": Case("train_sft", t_case("train_sft", "ok"), INTERRUPTED, code=130,
                             patch=ctrl_c_in("openrlhf_irl.cli.train_checks.claim_outputs")),
    "train_rm/ctrl-c": Case("train_rm", t_case("train_rm", "ok"), INTERRUPTED, code=130,
                            patch=ctrl_c_in("openrlhf_irl.cli.train_checks.claim_outputs")),
    "train_ppo/ctrl-c": Case("train_ppo", p_case("ok", "--vllm.num_engines", "1"), INTERRUPTED, code=130,
                             patch=ctrl_c_in("openrlhf_irl.cli.train_ppo.check_resources")),
}
CASES.update(CASES_23_4_6)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model):
    """The session's tiny Llama and a copy with other weights (same tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    other = str(tmp_path_factory.mktemp("llm2") / "m")
    shutil.copytree(tiny_model, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    model.save_pretrained(other)
    return {"llm": tiny_model, "llm2": other}


def _hold_lock(path: Path):
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
                               str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("name", list(CASES))
def test_cli_fault(name, models, tmp_path, capsys, monkeypatch):
    """Each case in this process (fast)."""
    if CASES[name].patch is not None:
        CASES[name].patch(monkeypatch)
    check_case(CASES[name], models, tmp_path, lambda module, argv, env: run_in_process(module, argv, env, capsys,
                                                                                        monkeypatch))


SUBPROCESS_CASES = ["sample/foreign-output-torn-tail-not-repaired", "sample/hub-name-offline",
                    "sample/tokenizer-without-eos", "sample/batch-size-0", "build/output-is-init-samples",
                    "bon/bad-golden-module", "hh/empty-input", "train_rm/afd-rm-few-records-no-eval",
                    "train_sft/output-dir-is-the-model", "train_sft/adam-lr-inf",
                    "experiment/seed-dir-it-did-not-write"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_cli_fault_subprocess(name, models, tmp_path):
    """Cases of each CLI as ``python -m openrlhf_irl.cli.<module>``: the exit code and stderr a user sees."""
    check_case(CASES[name], models, tmp_path, run_cli)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["sample", "build_afd_dataset", "best_of_n"])
def test_ctrl_c_subprocess(module, models, tmp_path):
    """A real SIGINT while the CLI reads its input (a FIFO that the test opens and never writes, so the CLI is
    blocked in read() when the signal comes): exit 130, one ``interrupted:`` line, no traceback, nothing written."""
    import signal
    import threading

    case = tmp_path / "case"
    case.mkdir()
    fifo = case / "input.jsonl"
    os.mkfifo(fifo)
    if module == "sample":
        argv = sample_args(models["llm"], str(fifo), str(case / "out.jsonl"))
    elif module == "best_of_n":
        argv = n_args(case, models, "--log-ratio-init", models["llm"])
        argv[argv.index("--prompts") + 1] = str(fifo)
        os.unlink(case / "prompts.jsonl")
    else:
        argv = ["--init-samples", str(fifo), "--sft-samples", _samples(case, "sft.jsonl", "sft"),
                "--output", str(case / "o.jsonl")]
    before = snapshot(case)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", f"openrlhf_irl.cli.{module}", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO), preexec_fn=interruptible)
    writer: list = []
    opened = threading.Event()

    def open_for_writing():
        writer.append(os.open(fifo, os.O_WRONLY))  # returns once the CLI has opened the FIFO to read it
        opened.set()

    threading.Thread(target=open_for_writing, daemon=True).start()
    try:
        if not opened.wait(120):
            proc.kill()
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # frees the writer thread
            pytest.fail(f"the CLI never opened its input: {proc.communicate()[1][-3000:]}")
        time.sleep(1.0)  # now blocked in read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for fd in writer:
            os.close(fd)
    assert proc.returncode == 130, f"exit {proc.returncode}\nSTDOUT:\n{out[-2000:]}\nSTDERR:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error" in line.lower() or line.startswith("interrupted")]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted: {module} stopped by Ctrl-C"), err[-3000:]
    assert snapshot(case) == before


def test_ctrl_c_outside_cli_main_is_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    """The hook common.py installs under ``python -m openrlhf_irl...``: a KeyboardInterrupt no cli_main caught
    (Ctrl-C while torch imports) prints one line; any other uncaught exception still prints its traceback."""
    import types

    from openrlhf_irl.cli import common

    fake_main = types.ModuleType("__main__")
    fake_main.__spec__ = types.SimpleNamespace(name="openrlhf_irl.cli.extract_reward")
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    common._install_startup_interrupt_hook()
    assert sys.excepthook is not sys.__excepthook__
    capsys.readouterr()
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err.strip() == "interrupted: extract_reward stopped by Ctrl-C"
    try:
        raise RuntimeError("a bug")
    except RuntimeError as err:
        sys.excepthook(RuntimeError, err, err.__traceback__)
    assert "Traceback" in capsys.readouterr().err


def test_cli_main_keeps_tracebacks_for_bugs():
    """cli_main turns only a user's mistakes and Ctrl-C into one line: a bug (any other exception, an OSError
    that is not about the user's files) propagates with its traceback."""
    import errno

    from openrlhf_irl.cli.common import UsageError, cli_main

    def failing(exc):
        @cli_main("x")
        def main(argv=None):
            raise exc
        return main

    with pytest.raises(KeyError):
        failing(KeyError("bug"))()
    with pytest.raises(ConnectionResetError):
        failing(ConnectionResetError(errno.ECONNRESET, "reset"))()
    for exc, code in ((UsageError("--x: bad"), 2), (OSError(errno.ENOSPC, "No space left on device", "f"), 1),
                      (KeyboardInterrupt(), 130)):
        with pytest.raises(SystemExit) as exit_:
            failing(exc)()
        assert exit_.value.code == code


def check_case(case: Case, models: dict, tmp_path: Path, runner) -> None:
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    made = case.setup(case_dir, models)
    argv, env = made if isinstance(made, tuple) else (made, {})
    holder = _hold_lock(case_dir / "out.jsonl") if case.hold_lock else None
    before = snapshot(case_dir)
    try:
        start = time.time()
        proc = runner(case.module, argv, env)
        elapsed = time.time() - start
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    err = proc.stderr
    assert proc.returncode == case.code, (f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-2000:]}\n"
                                          f"STDERR:\n{err[-3000:]}")
    assert "Traceback" not in err, err[-3000:]
    error_lines = [line for line in err.splitlines() if "error" in line.lower() or line.startswith("interrupted")]
    assert len(error_lines) == 1, err[-3000:]
    assert case.needle in error_lines[0], error_lines[0]
    assert snapshot(case_dir) == before, "the CLI changed files although it refused"
    assert elapsed < 90, f"{elapsed:.0f} s to refuse"


# ------------------------------------------------------------------------------------------- complete outputs (slow)


@pytest.mark.slow
def test_best_of_n_run_reports_se_and_unfinished_and_refuses_stale_samples(models, tmp_path):
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    golden = tmp_path / "golden"
    config = AutoConfig.from_pretrained(models["llm"])
    config.num_labels = 1
    torch.manual_seed(2)
    LlamaForSequenceClassification(config).save_pretrained(golden)
    AutoTokenizer.from_pretrained(models["llm"]).save_pretrained(golden)

    argv = n_args(tmp_path, models, "--log-ratio-init", models["llm2"], "--golden", f"hf:{golden}", "--n-max", "3",
                  "--n", "1,2,4")
    first = run_cli("best_of_n", argv)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "bon" / "best_of_n.json").read_text())
    assert result["ns"] == [1, 2, 3] and result["n_max"] == 3 and result["n_candidates"] == 6
    for name in ("log_ratio", "oracle (golden)"):
        for n in ("1", "2", "3"):
            stats = result["stats"][name][n]
            assert stats["se"] is not None and stats["se"] >= 0 and 0 <= stats["unfinished"] <= 2
    assert result["stats"]["oracle (golden)"]["3"]["mean"] >= result["stats"]["oracle (golden)"]["1"]["mean"]
    scored = [json.loads(line) for line in (tmp_path / "bon" / "scored.jsonl").read_text().splitlines()]
    assert sum(not r["finished"] for r in scored) == result["unfinished_candidates"]

    before = snapshot(tmp_path / "bon")
    stale = run_cli("best_of_n", argv + ["--rollout.temperature", "0.5"])
    assert stale.returncode == 2 and "sampling.temperature: 1.0 before, 0.5 now" in stale.stderr
    assert "--overwrite" in stale.stderr and snapshot(tmp_path / "bon") == before
    fresh = run_cli("best_of_n", argv + ["--rollout.temperature", "0.5", "--overwrite"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    side = json.loads((tmp_path / "bon" / "samples.jsonl.provenance.json").read_text())
    assert side["sampling"]["temperature"] == 0.5
    assert len((tmp_path / "bon" / "samples.jsonl").read_text().splitlines()) == 6


# ------------------------------------------------------------------------------------------- saves (issue 23)


def _bare_strategy(monkeypatch, ppo_worker=False):
    """OpenRLHF's DeepspeedStrategy with only what ``save_model`` reads (one process, ZeRO-2), under the plug-in's
    :func:`safe_save_model` (``ppo_worker``: under the class patch a PPO actor's process gets instead)."""
    from types import SimpleNamespace

    from openrlhf_irl import compat

    compat.activate()
    import openrlhf.utils.deepspeed.deepspeed as ds_module

    from openrlhf_irl.utils.checkpoint import safe_save_model

    monkeypatch.setattr(ds_module, "torch_dist_barrier_and_cuda_sync", lambda: None)
    strategy = ds_module.DeepspeedStrategy.__new__(ds_module.DeepspeedStrategy)
    strategy.args = SimpleNamespace(ds=SimpleNamespace(zero_stage=2, tensor_parallel_size=1))
    strategy.stage, strategy.ds_tensor_parallel_size = 2, 1
    strategy.is_rank_0 = lambda: True
    if ppo_worker:
        from openrlhf_irl.compat import ray_ppo

        monkeypatch.setattr(ds_module.DeepspeedStrategy, "save_model", ds_module.DeepspeedStrategy.save_model)
        monkeypatch.setattr(ds_module.DeepspeedStrategy, "_openrlhf_irl_safe_save", False, raising=False)
        ray_ppo.patch_strategy_save(ds_module)
    else:
        safe_save_model(strategy)
    return strategy


def _model_and_tokenizer(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_a_failed_final_save_leaves_the_earlier_model_whole(models, tmp_path, monkeypatch):
    """OpenRLHF's save_model writes the weights, then config.json, then the tokenizer: a failure at the tokenizer
    (a full disk) used to leave new weights and config beside the old tokenizer. Staged, the earlier model stays."""
    import torch

    strategy = _bare_strategy(monkeypatch)
    out = tmp_path / "out"
    model, tokenizer = _model_and_tokenizer(models["llm"])
    strategy.save_model(model, tokenizer, str(out))
    before = snapshot(out)
    assert "config.json" in before and "model.safetensors" in before

    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    model.config.irl_note = "second save"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        strategy.save_model(model, tokenizer, str(out))
    assert snapshot(out) == before, "the failed save changed the earlier model"

    monkeypatch.undo()
    strategy = _bare_strategy(monkeypatch)
    strategy.save_model(model, tokenizer, str(out))
    after = snapshot(out)
    assert set(after) == set(before)  # nothing staged is left behind
    assert after["model.safetensors"] != before["model.safetensors"]
    assert json.loads(after["config.json"])["irl_note"] == "second save"


@pytest.mark.parametrize("where", ["train_sft", "ppo_actor"])
def test_nan_weights_are_never_saved(models, tmp_path, monkeypatch, where):
    """The last optimizer step is never checked by the loss (it runs on the next forward): the save checks, in the
    training CLIs and in PPO's actors (a CPU PPO run's Ray workers get the class patch of compat.ray_ppo)."""
    import torch

    from openrlhf_irl.utils.checkpoint import NonFiniteWeightsError

    strategy = _bare_strategy(monkeypatch, ppo_worker=where == "ppo_actor")
    out = tmp_path / "out"
    model, tokenizer = _model_and_tokenizer(models["llm"])
    strategy.save_model(model, tokenizer, str(out))
    before = snapshot(out)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="NaN/inf"):
        strategy.save_model(model, tokenizer, str(out))
    assert snapshot(out) == before


def test_json_is_written_strictly(tmp_path):
    """NaN and inf are not JSON: the writers refuse them, naming the file, line and field, and write nothing."""
    from openrlhf_irl.utils.jsonl import DataError, append_jsonl, atomic_write_json, atomic_write_jsonl

    with pytest.raises(DataError, match=r"r\.json, field 'stats\.golden\.1': nan is not a finite number"):
        atomic_write_json(tmp_path / "r.json", {"stats": {"golden": {"1": float("nan")}}})
    with pytest.raises(DataError, match=r"s\.jsonl, line 2, field 'reward': inf"):
        atomic_write_jsonl(tmp_path / "s.jsonl", [{"reward": 1.0}, {"reward": float("inf")}])
    with pytest.raises(DataError, match="field 'logprob'"):
        append_jsonl(tmp_path / "a.jsonl", [{"logprob": float("-inf")}])
    assert list(tmp_path.iterdir()) == []


def test_overwrite_writes_through_a_symlink(tmp_path, capsys):
    """With --overwrite a symlinked output's target gets the new content; the link stays a link."""
    from openrlhf_irl.cli.build_afd_dataset import main

    init = write(tmp_path / "init.jsonl", [dict(REC, prompt=p["prompt"], policy="init", response=" 9", sample_index=0)
                                           for p in PROMPTS])
    sft = _samples(tmp_path, "sft.jsonl", "sft")
    link = _link_to_foreign(tmp_path, "o.jsonl")
    assert main(["--init-samples", init, "--sft-samples", sft, "--output", link, "--overwrite"]) == 0
    assert os.path.islink(link)
    target = tmp_path / "target_o.jsonl"
    assert len(target.read_text().splitlines()) == 2 and os.path.isfile(f"{target}.provenance.json")
    assert main(["--init-samples", init, "--sft-samples", sft, "--output", link]) == 0  # now ours: a rerun works



def test_train_ppo_with_cuda_checks_before_openrlhf_runs(models, tmp_path, capsys, monkeypatch):
    """The CUDA path (OpenRLHF's module unchanged) refuses the same outputs and numbers first."""
    monkeypatch.setattr("openrlhf_irl.compat.ray_ppo.needed", lambda: False)
    monkeypatch.setattr("openrlhf_irl.cli.train_ppo._run_openrlhf", lambda argv: pytest.fail("OpenRLHF ran"))
    for case in (CASES["train_ppo/output-dir-is-the-actor"], CASES["train_ppo/rollout-top-p-1.5"]):
        case_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        case_dir.mkdir()
        check_case(case, models, case_dir, lambda module, argv, env: run_in_process(module, argv, env, capsys,
                                                                                      monkeypatch))


def test_every_score_must_be_one_finite_number_per_record():
    """A golden reward or scorer returning NaN (or too few values) for candidates sampled after the up-front call:
    an error naming it and the record, where NaN curves and invalid JSON were written before."""
    from openrlhf_irl.afd.best_of_n import ScoreError, score_and_select

    recs = [{"prompt": "p", "response": r, "sample_index": i, "finished": True} for i, r in enumerate("ab")]
    with pytest.raises(ScoreError, match="golden: returned nan for record 1"):
        score_and_select(recs, {"s": lambda r: [1.0, 2.0]}, [1, 2], lambda p, r: [0.5, float("nan")])
    with pytest.raises(ScoreError, match="s: returned 1 scores for 2 records"):
        score_and_select(recs, {"s": lambda r: [1.0]}, [1], None)


# issue 21: a flag that means what an OpenRLHF flag means takes OpenRLHF's spelling; the old spelling still works for
# one release, with one deprecation line. (cli, old, new, a value unlike the default or None for a switch)
RENAMED = [
    *[(cli, old, new, value) for cli in ("sample", "best_of_n") for old, new, value in (
        ("--input-key", "--data.input_key", "q"), ("--apply-chat-template", "--data.apply_chat_template", None),
        ("--input-template", "--data.input_template", "Q: {}"), ("--temperature", "--rollout.temperature", "0.5"),
        ("--top-p", "--rollout.top_p", "0.5"), ("--max-new-tokens", "--rollout.max_new_tokens", "7"))],
    ("sample", "--n-samples", "--rollout.n_samples_per_prompt", "3"),
    ("build_afd_dataset", "--input-key", "--data.input_key", "q"),
    ("build_afd_dataset", "--output-key", "--data.output_key", "r"),
    ("extract_reward", "--input-key", "--data.input_key", "q"),
    ("extract_reward", "--output-key", "--data.output_key", "r"),
    ("extract_reward", "--apply-chat-template", "--data.apply_chat_template", None),
    ("extract_reward", "--tokenizer-chat-template", "--data.tokenizer_chat_template", "{{ messages }}"),
    ("extract_reward", "--input-template", "--data.input_template", "Q: {}"),
    ("extract_reward", "--multiturn", "--data.multiturn", None),
    ("extract_reward", "--max-len", "--data.max_len", "99"),
]
REQUIRED = {"sample": ["--model", "m", "--prompts", "p", "--policy-name", "x", "--output", "o"],
            "best_of_n": ["--policy", "m", "--prompts", "p", "--output-dir", "o"],
            "build_afd_dataset": ["--output", "o"], "extract_reward": ["--model", "m", "--data", "d", "--output", "o"]}


@pytest.mark.parametrize("cli,old,new,value", RENAMED, ids=[f"{c}/{o}" for c, o, _, _ in RENAMED])
def test_old_flag_spelling_works_with_one_deprecation_line(cli, old, new, value, capsys, monkeypatch):
    import importlib

    monkeypatch.setenv("COLUMNS", "250")  # --help on one line per flag
    parser = importlib.import_module(f"openrlhf_irl.cli.{cli}").build_parser()
    given = [] if value is None else [value]
    capsys.readouterr()
    via_old = parser.parse_args(REQUIRED[cli] + [old, *given])
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {old} is deprecated, use {new}; the old spelling goes in the next release"]
    via_new = parser.parse_args(REQUIRED[cli] + [new, *given])
    assert capsys.readouterr().err == ""
    assert vars(via_old) == vars(via_new) != vars(parser.parse_args(REQUIRED[cli]))
    help_text = parser.format_help()
    assert f"{new} " in help_text and f"(deprecated: {old})" in help_text
    assert f"{old} " not in help_text.replace(f"(deprecated: {old})", "")  # the old spelling is not a listed flag


def test_train_ppo_in_process_leaves_no_run_tag_in_the_environment(models, tmp_path, capsys, monkeypatch):
    """A PPO run tags its processes (``OPENRLHF_IRL_PPO_RUN``) and kills what carries the tag at its end: left in
    the caller's environment, the tag would be inherited by the caller's next jobs, and a later run would reuse it."""
    from openrlhf_irl.utils.reaper import RUN_TAG_ENV

    monkeypatch.delenv(RUN_TAG_ENV, raising=False)
    tagged = []

    def interrupted_once_tagged(*args, **kwargs):  # after the run tagged its environment, before Ray starts
        tagged.append(os.environ.get(RUN_TAG_ENV))
        raise KeyboardInterrupt

    for check in ("check_resources", "check_reward_func"):  # the defaults' sizes; the reward models' variables
        monkeypatch.setattr(f"openrlhf_irl.cli.train_ppo.{check}", lambda *args: None)
    monkeypatch.setattr("openrlhf_irl.compat.ray_ppo.ray_init_kwargs", interrupted_once_tagged)
    tmp_path.joinpath("case").mkdir()
    proc = run_in_process("train_ppo", p_case("ok", "--vllm.num_engines", "1")(tmp_path / "case", models), {},
                          capsys, monkeypatch)
    assert proc.returncode == 130 and "interrupted: train_ppo stopped" in proc.stderr, proc.stderr[-2000:]
    assert tagged and tagged[0], "the run never tagged its environment: nothing was checked"
    assert RUN_TAG_ENV not in os.environ


# ------------------------------------------------------------------------------------- class 5: nothing left behind
# Each CLI run to the end (train_ppo: refused after its imports) as a subprocess with a TMPDIR and a HOME of its own:
# both are empty afterwards. (/dev/shm after vLLM engines: tests/test_reaper.py.)
def _leaves_nothing_argv(cli, t, m):
    if cli == "sample":
        return sample_args(m["llm"], _prompts(t), str(t / "out.jsonl"))
    if cli == "build_afd_dataset":
        init = write(t / "init.jsonl", [dict(REC, prompt=p["prompt"], response=" 9 9", policy="init", sample_index=0)
                                        for p in PROMPTS])
        return ["--init-samples", init, "--sft-samples", _samples(t, "sft.jsonl", "sft"), "--output",
                str(t / "pairs.jsonl")]
    if cli == "extract_reward":
        return ["--model", m["llm"], "--data", _extract_data(t), "--output", str(t / "rewards.jsonl"), "--device", "cpu"]
    if cli == "prepare_hh_rlhf":
        return ["--input", write(t / "hh.jsonl", [HH]), "--output-dir", str(t / "hh")]
    if cli == "best_of_n":
        return n_args(t, m, "--log-ratio-init", m["llm"])
    if cli == "train_sft":
        data = write(t / "sft.jsonl", [{"prompt": f"count from {i}", "response": " 1 2"} for i in range(8)])
        return sft_flags(m["llm"], data, str(t / "sft"), "--trainer", "irl_iq", "--train.max_epochs", "1")
    return p_case("ok")(t, m)  # train_ppo: too many processes for the cores, refused once everything is imported


@pytest.mark.slow
@pytest.mark.parametrize("cli", ["sample", "build_afd_dataset", "extract_reward", "prepare_hh_rlhf", "best_of_n",
                                 "train_sft", "train_ppo"])
def test_cli_leaves_nothing_behind(cli, models, tmp_path):
    import tempfile

    case = tmp_path / "case"
    case.mkdir()
    root = Path(tempfile.mkdtemp(prefix="c5_", dir="/tmp"))  # short: Ray's socket paths live under TMPDIR
    tmp, home = root / "tmp", root / "home"
    tmp.mkdir()
    home.mkdir()
    try:
        argv = _leaves_nothing_argv(cli, case, models)
        proc = run_cli(cli, argv, env={"TMPDIR": str(tmp), "HOME": str(home)}, timeout=600)
        assert proc.returncode == (2 if cli == "train_ppo" else 0), proc.stderr[-3000:]
        left = sorted(str(p.relative_to(root)) for d in (tmp, home) for p in d.rglob("*"))
        assert left == [], f"{cli} left {left}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
