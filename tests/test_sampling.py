"""Generation backends, teacher-forced scoring and the resumable sampling CLI (CPU, tiny models, no downloads)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from openrlhf_irl.cli.sample import main  # noqa: E402
from openrlhf_irl.generation import (  # noqa: E402
    Completion,
    HFGenerator,
    LogRatioScorer,
    SamplingParams,
    format_prompt,
    sequence_logprobs,
)
from openrlhf_irl.generation.hf import load_causal_lm, load_tokenizer  # noqa: E402
from openrlhf_irl.utils.tiny_model import write_tiny_llama  # noqa: E402

RECORD_KEYS = {"prompt", "response", "policy", "sample_index", "finished", "logprob"}
PROMPTS = ["the model counts", "a student writes a list", "my cat imitates", "the robot ranks every token"]


# ------------------------------------------------------------------------------------------ fixtures


def bias_towards_eos(model_dir, eos_logit=3.0):
    """Give the EOS token a steady logit so that a random tiny model ends some responses within a few tokens.

    Residual dimension 0 is made a constant (every embedding has it, no layer writes to it), only EOS reads it.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.02
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0
            layer.mlp.down_proj.weight[0, :] = 0
        model.lm_head.weight[:, 0] = 0
        model.lm_head.weight[eos, :] = 0
        model.lm_head.weight[eos, 0] = eos_logit
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(init, sft): the same tokenizer; "sft" is the init model biased towards EOS."""
    root = tmp_path_factory.mktemp("models")
    init = write_tiny_llama(str(root / "init"))
    sft = str(root / "sft")
    shutil.copytree(init, sft)
    bias_towards_eos(sft)
    return init, sft


@pytest.fixture(scope="module")
def generator(models):
    return HFGenerator(models[1], batch_size=4)


def teacher_forced(model, prompt_ids, response_ids):
    """Independent reference: one unpadded forward pass, sum of log_softmax(logits) at the chosen tokens."""
    ids = list(prompt_ids) + list(response_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def read_records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------ format_prompt


def test_format_prompt_conventions(generator):
    tok = generator.tokenizer
    assert format_prompt(tok, "hi there") == "hi there"
    assert format_prompt(tok, "hi", input_template="Q: {}\nA: ") == "Q: hi\nA: "
    chat = format_prompt(tok, "hi", apply_chat_template=True)
    assert chat == "User: hi\nAssistant: "
    assert chat == tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    # as in OpenRLHF's preprocess_data, the chat template wins over an input template
    assert format_prompt(tok, "hi", apply_chat_template=True, input_template="Q: {}") == chat
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert format_prompt(tok, messages, apply_chat_template=True) == "be brief\nUser: hi\nAssistant: "
    with pytest.raises(ValueError, match="must be a string"):
        format_prompt(tok, messages)


def test_format_prompt_without_chat_template(generator):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        format_prompt(NoTemplate(), "hi", apply_chat_template=True)


def test_sampling_params_validation():
    assert SamplingParams() == SamplingParams(n=1, temperature=1.0, top_p=1.0, max_new_tokens=128, seed=0)
    for bad in (dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ------------------------------------------------------------------------------------------ HFGenerator


def test_hf_generator_samples_and_logprobs(generator):
    tok, model = generator.tokenizer, generator.model
    prompts = [format_prompt(tok, p, apply_chat_template=True) for p in PROMPTS[:3]]
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=3)
    rng_before = torch.random.get_rng_state()
    completions = generator.generate(prompts, params)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "the caller's RNG must be left alone"

    assert [(c.prompt_index, c.sample_index) for c in completions] == [(i, s) for i in range(3) for s in range(4)]
    eos = tok.eos_token_id
    for c in completions:
        assert isinstance(c, Completion)
        assert 1 <= len(c.token_ids) <= params.max_new_tokens
        assert eos not in c.token_ids[:-1]
        if c.finished:
            assert c.token_ids[-1] == eos
        else:
            assert len(c.token_ids) == params.max_new_tokens and c.token_ids[-1] != eos
        body = c.token_ids[:-1] if c.finished else c.token_ids
        assert c.text == tok.decode(body, skip_special_tokens=True)
        prompt_ids = tok(prompts[c.prompt_index], add_special_tokens=False)["input_ids"]
        assert c.logprob == pytest.approx(teacher_forced(model, prompt_ids, c.token_ids), abs=1e-4)
        assert c.logprob < 0
    assert {c.finished for c in completions} == {True, False}, "the EOS-biased model should give both kinds"

    # deterministic under a seed; another seed gives other samples
    assert generator.generate(prompts, params) == completions
    other = generator.generate(prompts, SamplingParams(n=4, top_p=0.95, max_new_tokens=8, seed=4))
    assert [c.token_ids for c in other] != [c.token_ids for c in completions]


def test_hf_generator_subsets_and_greedy(generator):
    prompts = [format_prompt(generator.tokenizer, p, apply_chat_template=True) for p in PROMPTS]
    params = SamplingParams(n=3, max_new_tokens=6, seed=1)
    got = generator.generate(prompts[:2], params, prompt_indices=[7, 9], sample_indices=[[2], [0, 1]])
    assert [(c.prompt_index, c.sample_index) for c in got] == [(7, 2), (9, 0), (9, 1)]

    greedy = generator.generate(prompts[:2], SamplingParams(n=3, temperature=0.0, max_new_tokens=6))
    for i in range(2):
        rows = [c for c in greedy if c.prompt_index == i]
        assert len({tuple(c.token_ids) for c in rows}) == 1
        # greedy = the argmax of the model at every step
        ids = generator.tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
        expected = []
        with torch.no_grad():
            for _ in range(len(rows[0].token_ids)):
                nxt = int(generator.model(torch.tensor([ids + expected])).logits[0, -1].argmax())
                expected.append(nxt)
        assert rows[0].token_ids == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU attention limit")
def test_vllm_backend_refuses_a_model_it_cannot_serve_before_starting_engines(tmp_path, capsys, vllm_ready):
    """vLLM's CPU attention needs head_dim >= 32: a head_dim-16 model is refused up front, naming the model, the
    setting and the fix (vLLM itself would start and then fail at the first generate)."""
    from openrlhf_irl.generation import VLLMGenerator

    narrow = write_tiny_llama(str(tmp_path / "narrow"), hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="head_dim 16 .* below the 32"):
        VLLMGenerator(narrow)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    code, _, err = run_main(capsys, ["--model", narrow, "--prompts", prompts, "--backend", "vllm",
                                     "--policy-name", "sft", "--output", str(tmp_path / "o.jsonl")])
    assert code == 2 and "head_dim 16" in err and "backend 'hf'" in err
    out = tmp_path / "o.jsonl"
    assert not out.exists() or not out.read_text().strip()  # no samples


# ------------------------------------------------------------------------------------------ scoring


def test_sequence_logprobs_matches_hand_loop(models):
    tok = load_tokenizer(models[1])
    model = load_causal_lm(models[1])
    prompts = [format_prompt(tok, p, apply_chat_template=True) for p in PROMPTS] + ["x"]
    responses = ["12 34", "a list.", "", "every token 7 8 9 10", "y"]
    for add_eos in (True, False, [True, False, True, False, True]):
        flags = add_eos if isinstance(add_eos, list) else [add_eos] * len(prompts)
        got = sequence_logprobs(model, tok, prompts, responses, batch_size=2, add_eos=add_eos)
        for p, r, eos, value in zip(prompts, responses, flags, got):
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            r_ids = tok(r, add_special_tokens=False)["input_ids"] if r else []
            if eos:
                r_ids = r_ids + [tok.eos_token_id]
            assert value == pytest.approx(teacher_forced(model, p_ids, r_ids), abs=1e-4)
        if not flags[2]:
            assert got[2] == 0.0  # empty response, nothing to score


def test_log_ratio_scorer(models):
    init, sft = models
    raw = PROMPTS[:3]
    responses = ["12 34", "a list.", "every token"]
    scorer = LogRatioScorer(sft, init, apply_chat_template=True, batch_size=2)
    sft_lp, init_lp = scorer.logprobs(raw, responses)
    rewards = scorer.score(raw, responses)
    assert rewards == pytest.approx([a - b for a, b in zip(sft_lp, init_lp)])
    tok = load_tokenizer(sft)
    formatted = [format_prompt(tok, p, apply_chat_template=True) for p in raw]
    assert sft_lp == pytest.approx(sequence_logprobs(load_causal_lm(sft), tok, formatted, responses), abs=1e-4)
    assert init_lp == pytest.approx(sequence_logprobs(load_causal_lm(init), tok, formatted, responses), abs=1e-4)
    # the EOS-biased "SFT" model likes ending: a positive reward for the EOS step
    assert all(r > 0 for r in rewards)
    same = LogRatioScorer(sft, sft, apply_chat_template=True)
    assert same.score(raw, responses) == pytest.approx([0.0] * 3, abs=1e-6)


# ------------------------------------------------------------------------------------------ CLI: bad input (no Ray)


def run_main(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_bad_inputs_exit_2(models, tmp_path, capsys):
    base = ["--model", models[1], "--rollout.n_samples_per_prompt", "2", "--policy-name", "sft",
            "--output", str(tmp_path / "o.jsonl")]
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "a"}, {"question": "b"}])
    code, _, err = run_main(capsys, base + ["--prompts", missing])
    assert code == 2 and "missing.jsonl, line 2, field 'prompt': missing" in err

    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n')
    code, _, err = run_main(capsys, base + ["--prompts", str(bad_utf8)])
    assert code == 2 and "bad.jsonl, line 2" in err and "UTF-8" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_main(capsys, base + ["--prompts", str(empty)])
    assert code == 2 and "empty.jsonl" in err and "no prompts" in err

    other_key = write_jsonl(tmp_path / "q.jsonl", [{"question": "a"}])
    code, _, err = run_main(capsys, base + ["--prompts", other_key, "--data.input_key", "prompt"])
    assert code == 2 and "field 'prompt'" in err

    with pytest.raises(SystemExit) as e:
        main(base + ["--prompts", missing, "--data.input_template", "no slot"])
    assert e.value.code == 2


def sign(argv, path):
    """Write the provenance sidecar the CLI would write for ``argv`` (as if this tool had produced ``path``)."""
    from openrlhf_irl.cli.sample import build_parser, provenance
    from openrlhf_irl.utils.provenance import write_provenance

    args = build_parser().parse_args(argv)
    write_provenance(str(path), provenance(args, load_tokenizer(args.model)))


def test_cli_resume_checks_and_nothing_to_do(models, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}])
    out = tmp_path / "o.jsonl"
    argv = ["--model", models[1], "--prompts", prompts, "--rollout.n_samples_per_prompt", "2", "--policy-name", "sft",
            "--output", str(out)]
    rec = {"response": "r", "policy": "sft", "finished": True, "logprob": -1.0}
    done = [dict(rec, prompt=p, sample_index=s) for p in "ab" for s in range(2)]
    write_jsonl(out, done)
    with open(out, "ab") as f:
        f.write(b'{"prompt": "a", "resp')  # a torn write
    before = out.read_bytes()
    # not written by this tool (no provenance): refused, and the torn line is NOT cut
    code, _, err = run_main(capsys, argv)
    assert code == 2 and "no o.jsonl.provenance.json" in err and "--overwrite" in err
    assert out.read_bytes() == before

    sign(argv, out)
    code, stdout, _ = run_main(capsys, argv)
    assert code == 0
    assert "2 unique (1 duplicates dropped)" in stdout
    assert "dropped a partial last line" in stdout and "nothing to do" in stdout
    assert read_records(out) == done  # the torn line was cut off

    # other settings than the file's: refused, naming the setting and the flag
    code, _, err = run_main(capsys, argv + ["--rollout.temperature", "0.5"])
    assert code == 2 and "sampling.temperature: 1.0 before, 0.5 now" in err and "--overwrite" in err
    code, _, err = run_main(capsys, [*argv[:1], models[0], *argv[2:]])
    assert code == 2 and "model.path" in err and "model.weights" in err
    assert read_records(out) == done

    # a bad complete line is reported and the torn tail after it left alone
    write_jsonl(out, [dict(rec, prompt="a", sample_index=0, policy="init")])
    code, _, err = run_main(capsys, argv)
    assert code == 2 and "line 1, field 'policy'" in err

    write_jsonl(out, [dict(rec, prompt="a", sample_index="0")])
    with open(out, "ab") as f:
        f.write(b'{"prompt": "a", "resp')
    before = out.read_bytes()
    code, _, err = run_main(capsys, argv)
    assert code == 2 and "field 'sample_index'" in err
    assert out.read_bytes() == before

    write_jsonl(out, [dict(rec, prompt="a", sample_index=0), dict(rec, prompt="b", sample_index=0),
                      dict(rec, prompt="a", sample_index=0)])
    code, _, err = run_main(capsys, argv)
    assert code == 2 and "line 3" in err and "repeated (prompt, sample_index)" in err and "first at line 1" in err


def test_cli_output_lock_refuses_a_second_writer(models, tmp_path, capsys):
    from openrlhf_irl.cli.sample import OutputLock

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    out = tmp_path / "o.jsonl"
    argv = ["--model", models[1], "--prompts", prompts, "--policy-name", "sft", "--output", str(out)]
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_main(capsys, argv)
        assert code == 2 and "another job is writing this file" in err
    finally:
        holder.kill()
        holder.wait()
    lock = OutputLock(str(out))  # free again once the other writer is gone
    lock.release()


def test_cli_prompt_longer_than_context(models, tmp_path, capsys):
    long_prompt = " ".join(["token"] * 400)  # the tiny model's context is 256
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "short"}, {"prompt": long_prompt}])
    out = tmp_path / "o.jsonl"
    argv = ["--model", models[1], "--prompts", prompts, "--policy-name", "sft", "--output", str(out),
            "--rollout.max_new_tokens", "8"]
    code, _, err = run_main(capsys, argv)
    assert code == 2 and "p.jsonl, line 2, field 'prompt'" in err and "context of 256 tokens" in err
    assert not out.exists()

    # --skip-long-prompts: the long prompt is skipped and counted; the short one's samples are all there already
    write_jsonl(out, [{"prompt": "short", "response": "r", "policy": "sft", "sample_index": 0, "finished": True,
                       "logprob": -1.0}])
    sign(argv + ["--skip-long-prompts"], out)
    code, stdout, _ = run_main(capsys, argv + ["--skip-long-prompts"])
    assert code == 0 and "skipped 1 prompts longer" in stdout and "nothing to do: all 1 samples" in stdout

    only_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_prompt}])
    code, _, err = run_main(capsys, [*argv[:3], only_long, *argv[4:], "--skip-long-prompts"])
    assert code == 2 and "every prompt leaves less than --rollout.max_new_tokens" in err


# ------------------------------------------------------------------------------------------ CLI with Ray (slow)


def cli_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    return env


def cli_cmd(model, prompts, output, *extra):
    return [sys.executable, "-m", "openrlhf_irl.cli.sample", "--model", model, "--prompts", prompts,
            "--rollout.max_new_tokens", "8", "--num-actors", "2", "--backend", "hf", "--policy-name", "sft",
            "--output", output, *extra]


@pytest.mark.slow
def test_cli_ray_pool_writes_all_samples(models, tmp_path):
    rows = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)] + [{"prompt": PROMPTS[1]}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "samples.jsonl"
    cmd = cli_cmd(models[1], prompts, str(out), "--rollout.n_samples_per_prompt", "3", "--data.apply_chat_template",
                  "--rollout.top_p", "0.95")
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 unique (1 duplicates dropped)" in proc.stdout
    records = read_records(out)
    assert len(records) == 12
    assert {(r["prompt"], r["sample_index"]) for r in records} == {(p, s) for p in PROMPTS for s in range(3)}
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["prompt"] in PROMPTS  # raw, not templated
        assert r["policy"] == "sft" and isinstance(r["response"], str)
        assert isinstance(r["finished"], bool) and isinstance(r["logprob"], float) and r["logprob"] < 0
    # a rerun finds everything done
    again = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert len(read_records(out)) == 12


@pytest.mark.slow
def test_cli_kill_and_resume(models, tmp_path):
    prompts_list = [f"the model counts {i}" for i in range(60)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts_list])
    out = tmp_path / "samples.jsonl"
    cmd = cli_cmd(models[1], prompts, str(out), "--rollout.n_samples_per_prompt", "3", "--batch-size", "1")
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and b"\n" in out.read_bytes():
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        import psutil

        ray_procs = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "ray_watchdog" not in " ".join(p.cmdline())]
        assert ray_procs, "expected the job's Ray processes"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as an OOM killer would
        proc.wait()
    _, alive = psutil.wait_procs(ray_procs, timeout=30)  # the job's watchdog shuts its Ray down
    assert not alive, [" ".join(p.cmdline())[:80] for p in alive]
    first = out.read_bytes()
    kept = first[: first.rfind(b"\n") + 1]
    n_first = kept.count(b"\n")
    assert 1 <= n_first < 180
    with open(out, "ab") as f:
        f.write(b'{"prompt": "garbage", "respo')  # a torn write

    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dropped a partial last line" in done.stdout
    assert f"resume: {n_first} of 180 samples already" in done.stdout
    data = out.read_bytes()
    assert data.startswith(kept)  # the first run's records are kept as they were
    assert b"garbage" not in data and data.endswith(b"\n")
    records = read_records(out)
    keys = [(r["prompt"], r["sample_index"]) for r in records]
    assert len(keys) == len(set(keys)) == 180
    assert set(keys) == {(p, s) for p in prompts_list for s in range(3)}
    assert all(set(r) == RECORD_KEYS for r in records)
