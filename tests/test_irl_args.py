"""``train_sft --trainer irl_iq`` refuses bad ``--irl.*`` values and bad datasets at parse time (issue 13): exit 2,
one ``error:`` line naming the flag (or file, record and field), before any model is loaded."""

from __future__ import annotations

import json

import pytest

from helpers import run_python, write_jsonl
from openrlhf_irl.cli.launcher import build_args

BASE = ["--trainer", "irl_iq", "--model.model_name_or_path", "unused", "--data.input_key", "prompt",
        "--data.output_key", "response"]


def parse(argv, data):
    return build_args("sft", [*BASE, "--data.dataset", str(data), *argv])


@pytest.fixture()
def good_data(tmp_path):
    return write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])


BAD_FLAGS = [
    (["--irl.td_weight", "-0.5"], "argument --irl.td_weight: must be in [0.0, inf), got -0.5"),
    (["--irl.td_weight", "nan"], "argument --irl.td_weight: expected a finite number, got 'nan'"),
    (["--irl.gamma", "1.5"], "argument --irl.gamma: must be in [0.0, 1.0], got 1.5"),
    (["--irl.gamma", "nan"], "argument --irl.gamma: expected a finite number"),
    (["--irl.gamma", "-0.1"], "argument --irl.gamma: must be in [0.0, 1.0]"),
    (["--irl.online_mix", "-0.1"], "argument --irl.online_mix: must be in [0.0, 1.0]"),
    (["--irl.online_mix", "inf"], "argument --irl.online_mix: expected a finite number"),
    (["--irl.mle_weight", "-1"], "argument --irl.mle_weight: must be in [0.0, inf)"),
    (["--irl.td_warmup_steps", "-3"], "argument --irl.td_warmup_steps: must be in [0, inf)"),
    (["--irl.td_warmup_steps", "1.5"], "argument --irl.td_warmup_steps: expected an integer"),
    (["--irl.fused_chunk_size", "0"], "argument --irl.fused_chunk_size: must be in [1, inf)"),
    (["--irl.online_refresh_steps", "0"], "argument --irl.online_refresh_steps: must be in [1, inf)"),
    (["--irl.n_samples", "0"], "argument --irl.n_samples: must be in [1, inf)"),
    (["--irl.max_new_tokens", "-1"], "argument --irl.max_new_tokens: must be in [1, inf)"),
    (["--irl.temperature", "0"], "argument --irl.temperature: must be in (0.0, inf)"),
    (["--irl.entropy_sample_tokens", "-1"], "argument --irl.entropy_sample_tokens: must be in [0, inf)"),
    (["--irl.vllm_gpu_memory_utilization", "1.5"], "argument --irl.vllm_gpu_memory_utilization: must be in (0.0, 1.0]"),
    (["--irl.vllm_num_engines", "0"], "argument --irl.vllm_num_engines: must be in [1, inf)"),
    (["--irl.truncation", "cut"], "argument --irl.truncation: invalid choice: 'cut'"),
    (["--irl.online_mix", "0.1", "--no-irl.chi2_on_policy"], "--irl.online_mix 0.1 does nothing here"),
    (["--irl.online_mix", "0.1", "--irl.td_weight", "0"], "--irl.td_weight is 0"),
    (["--irl.online_mix", "0.1", "--data.multiturn"], "--data.multiturn"),
    (["--ds.packing_samples"], "--ds.packing_samples"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_irl_flags_are_one_line_parse_errors(argv, message, good_data, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv, good_data)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_good_flags_parse(good_data):
    args = parse(["--irl.gamma", "0.9", "--irl.online_mix", "0.2", "--irl.truncation", "drop",
                  "--irl.skip_nonfinite"], good_data)
    assert args.irl.gamma == 0.9 and args.irl.online_mix == 0.2 and args.irl.truncation == "drop"
    assert args.irl.chi2_on_policy is True and args.irl.skip_nonfinite is True


BAD_DATA = [
    ([], "has no records"),
    (["{\"prompt\": \"a\", \"response\": \"b\"}", "{not json"], "bad.jsonl, line 2: invalid JSON"),
    ([{"prompt": "a"}], "bad.jsonl, line 1, field 'response': missing response"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": None}],
     "bad.jsonl, line 2, field 'response': response is null"),
    ([{"prompt": {"text": "a"}, "response": "b"}], "bad.jsonl, line 1, field 'prompt': expected a string, got dict"),
    ([{"prompt": "a", "response": 7}], "bad.jsonl, line 1, field 'response': expected a string, got int"),
    ([{"prompt": "a", "response": ""}], "bad.jsonl, line 1, field 'response': empty response"),
    ([{"response": "b"}], "bad.jsonl, line 1, field 'prompt': missing"),
    (["[1, 2]"], "bad.jsonl, line 1: expected a JSON object, got list"),
    ([{"prompt": "a", "response": "b", "id": 1}, {"prompt": "c", "response": "d", "id": "x2"}],
     "bad.jsonl, line 2, field 'id': a string here but a number at line 1"),
    (["", "  "], "has no records"),
]


@pytest.mark.parametrize("lines,message", BAD_DATA, ids=[m for _, m in BAD_DATA])
def test_bad_datasets_are_refused_with_file_record_and_field(lines, message, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(SystemExit) as exc:
        parse([], path)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_eval_dataset_output_key_and_chat_prompts(tmp_path, good_data, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit):
        parse(["--eval.dataset", str(empty)], good_data)
    assert "--eval.dataset: " + str(empty) + " has no records" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_args("sft", ["--trainer", "irl_iq", "--model.model_name_or_path", "x", "--data.dataset", str(good_data)])
    assert "needs --data.output_key" in capsys.readouterr().err
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "a"}], "response": "b"},
                                                  {"prompt": "plain", "response": "c"}])
    with pytest.raises(SystemExit):
        parse(["--data.apply_chat_template"], chat)
    assert "chat.jsonl, line 2, field 'prompt': a string here but a list at line 1" in capsys.readouterr().err
    multi = write_jsonl(tmp_path / "multi.jsonl", [{"prompt": [{"role": "user", "content": "a"},
                                                               {"role": "assistant", "content": "b"},
                                                               {"role": "user", "content": "c"}]}])
    with pytest.raises(SystemExit):
        build_args("sft", ["--trainer", "irl_iq", "--model.model_name_or_path", "x", "--data.dataset", str(multi),
                           "--data.input_key", "prompt", "--data.multiturn", "--data.apply_chat_template"])
    assert "must end with an assistant message" in capsys.readouterr().err


@pytest.mark.slow
def test_real_cli_refuses_before_loading_anything(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": None}])
    proc = run_python(["-m", "openrlhf_irl.cli.train_sft", *BASE, "--data.dataset", str(data),
                       "--irl.gamma", "0.5"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "d.jsonl, line 1, field 'response': response is null" in proc.stderr
    assert "Traceback" not in proc.stderr



def test_fused_single_pass_is_a_flag_that_reaches_the_loss_config(good_data):
    from openrlhf_irl import compat

    compat.activate()  # the CPU layer, before the loss module imports OpenRLHF's model utilities
    from openrlhf_irl.losses.iq_sft import IQConfig

    assert IQConfig.from_args(parse(["--irl.fused_loss"], good_data)).fused_single_pass is True  # the default
    two_pass = IQConfig.from_args(parse(["--irl.fused_loss", "--no-irl.fused_single_pass"], good_data))
    assert two_pass.fused_loss and two_pass.fused_single_pass is False
