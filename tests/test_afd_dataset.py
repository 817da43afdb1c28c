"""Tests for the JSONL utilities and the AfD demo-vs-sample dataset builder (CPU, no downloads)."""

import json
import os
from collections import Counter

import pytest

from openrlhf_irl.cli.build_afd_dataset import main
from openrlhf_irl.datasets.afd import DROP_REASONS, build_afd_dataset, format_report
from openrlhf_irl.utils import jsonl
from openrlhf_irl.utils.jsonl import (
    DataError,
    append_jsonl,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_writer,
    read_jsonl,
    read_jsonl_tolerant_tail,
)

# ------------------------------------------------------------------------------------------ helpers


def write_lines(path, lines):
    """Write raw lines (str, bytes or JSON-able objects) to ``path``."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            if isinstance(line, str):
                line = line.encode("utf-8")
            f.write(line + b"\n")
    return str(path)


def sample(prompt, response, finished=True, policy="init", index=0):
    return {
        "prompt": prompt,
        "response": response,
        "policy": policy,
        "sample_index": index,
        "finished": finished,
        "logprob": -1.5,
    }


def demo(prompt, response):
    return {"prompt": prompt, "response": response}


def by_prompt_then_text(records):
    return sorted(records, key=lambda r: json.dumps(r, sort_keys=True))


def assert_counts_balance(report):
    for role in ("positive", "negative"):
        dropped = sum(report["dropped_by_side"][role].values())
        assert report["read"][role] == report["kept"][role] + dropped


@pytest.fixture
def files(tmp_path):
    """A small consistent triple of inputs over prompts p1, p2."""
    init = write_lines(
        tmp_path / "init.jsonl",
        [sample("p1", "i1a"), sample("p1", "i1b", index=1), sample("p2", "i2a")],
    )
    sft = write_lines(
        tmp_path / "sft.jsonl",
        [sample("p1", "s1a", policy="sft"), sample("p2", "s2a", policy="sft")],
    )
    demos = write_lines(tmp_path / "demos.jsonl", [demo("p1", "d1"), demo("p2", "d2")])
    return {"init": init, "sft": sft, "demos": demos, "dir": tmp_path}


# ------------------------------------------------------------------------------------- read_jsonl


def test_read_jsonl_line_numbers_and_blank_lines(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [{"x": "1"}, "", "   ", {"x": "2"}])
    assert list(read_jsonl(path, required=("x",))) == [(1, {"x": "1"}), (4, {"x": "2"})]


@pytest.mark.parametrize(
    "line, reason, needle",
    [
        (b"\xff\xfe{}", "non_utf8", "not valid UTF-8"),
        ("{not json", "invalid_json", "invalid JSON"),
        ("[1, 2]", "not_object", "expected a JSON object, got list"),
        ({"y": "1"}, "missing_field", "field 'x': missing"),
        ({"x": 3}, "non_string_field", "field 'x': expected a string, got int"),
    ],
)
def test_read_jsonl_errors_name_file_line_field(tmp_path, line, reason, needle):
    path = write_lines(tmp_path / "bad.jsonl", [{"x": "ok"}, line])
    with pytest.raises(DataError) as exc:
        list(read_jsonl(path, required=("x",)))
    assert str(exc.value).startswith(f"{path}, line 2")
    assert needle in str(exc.value)
    assert exc.value.reason == reason and exc.value.line_no == 2
    skipped = Counter()
    assert list(read_jsonl(path, required=("x",), lenient=True, skipped=skipped)) == [(1, {"x": "ok"})]
    assert skipped == Counter({reason: 1})


# ------------------------------------------------------------------------------------- atomic IO


def test_atomic_write_jsonl_roundtrip_and_permissions(tmp_path):
    target = tmp_path / "out.jsonl"
    assert atomic_write_jsonl(target, [{"a": "é"}, {"b": 2}]) == 2
    assert target.read_text(encoding="utf-8") == '{"a": "é"}\n{"b": 2}\n'
    os.chmod(target, 0o640)
    atomic_write_jsonl(target, [{"c": 3}])
    assert os.stat(target).st_mode & 0o777 == 0o640
    assert [r for _, r in read_jsonl(target)] == [{"c": 3}]
    atomic_write_json(tmp_path / "r.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"k": [1, 2]}
    with atomic_writer(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "out.jsonl", "r.json"]


def test_atomic_write_failure_mid_write_keeps_target(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")

    def records():
        yield {"a": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write_jsonl(target, records())
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_atomic_write_failure_at_replace_keeps_target(tmp_path, monkeypatch):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(jsonl.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_jsonl(target, [{"a": 1}])
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_append_and_tolerant_tail(tmp_path):
    path = tmp_path / "samples.jsonl"
    assert read_jsonl_tolerant_tail(path) == []
    assert append_jsonl(path, [{"i": 0}, {"i": 1}]) == 2
    with open(path, "ab") as f:  # a crash in the middle of the next append
        f.write(b'{"i": 2, "resp')
    with pytest.raises(DataError, match="incomplete"):
        append_jsonl(path, [{"i": 9}])
    skipped = Counter()
    assert read_jsonl_tolerant_tail(path, skipped=skipped) == [{"i": 0}, {"i": 1}]
    assert skipped == Counter({"partial_tail": 1})
    assert path.read_bytes() == b'{"i": 0}\n{"i": 1}\n'
    append_jsonl(path, [{"i": 2}])
    assert read_jsonl_tolerant_tail(path) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_tolerant_tail_without_truncate_and_bad_complete_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": 1}')  # complete JSON but no newline: not acknowledged
    assert read_jsonl_tolerant_tail(path, truncate=False) == [{"i": 0}]
    assert path.read_bytes() == b'{"i": 0}\n{"i": 1}'
    path.write_bytes(b'{"i": 0}\n{bad\n{"i": 2}\n')
    with pytest.raises(DataError, match=r"line 2: invalid JSON"):
        read_jsonl_tolerant_tail(path)


# ------------------------------------------------------------------------------------- variants


def test_init_sft_pairs_exact(files):
    records, report = build_afd_dataset("init-sft", init_samples=files["init"], sft_samples=files["sft"])
    assert by_prompt_then_text(records) == [
        {"prompt": "p1", "chosen": "s1a", "rejected": "i1a"},
        {"prompt": "p1", "chosen": "s1a", "rejected": "i1b"},
        {"prompt": "p2", "chosen": "s2a", "rejected": "i2a"},
    ]
    assert [r["prompt"] for r in records] == ["p1", "p1", "p2"]
    assert report["kept"] == {"positive": 2, "negative": 3}
    assert report["sources"] == {"positive": "sft", "negative": "init"}
    assert report["records"] == 3 and report["prompts"] == 2
    assert report["dropped"] == dict.fromkeys(DROP_REASONS, 0)
    assert_counts_balance(report)


def test_init_sft_does_not_read_demos(files):
    records, _ = build_afd_dataset(
        "init-sft", demos=str(files["dir"] / "missing.jsonl"), init_samples=files["init"], sft_samples=files["sft"]
    )
    assert len(records) == 3


def test_init_demo_pairs_exact_with_custom_keys(files, tmp_path):
    demos = write_lines(tmp_path / "d.jsonl", [{"q": "p1", "a": "d1"}, {"q": "p2", "a": "d2"}])
    records, report = build_afd_dataset(
        "init-demo", demos=demos, init_samples=files["init"], input_key="q", output_key="a"
    )
    assert by_prompt_then_text(records) == [
        {"prompt": "p1", "chosen": "d1", "rejected": "i1a"},
        {"prompt": "p1", "chosen": "d1", "rejected": "i1b"},
        {"prompt": "p2", "chosen": "d2", "rejected": "i2a"},
    ]
    assert report["sources"] == {"positive": "demo", "negative": "init"}


# (variant, its two sources, the labelled records in order: prompt, response, label, ...)
LABELS_EXACT = [
    ("sft-demo", ("demos", "sft"), ["p1", "d1", 1, "p1", "s1a", 0, "p2", "d2", 1, "p2", "s2a", 0]),
    ("init-sft", ("init", "sft"), ["p1", "s1a", 1, "p1", "i1a", 0, "p1", "i1b", 0, "p2", "s2a", 1, "p2", "i2a", 0]),
]


@pytest.mark.parametrize("variant,sources,flat", LABELS_EXACT, ids=[v[0] for v in LABELS_EXACT])
def test_labels_exact(files, variant, sources, flat):
    flags = {"demos": "demos", "sft": "sft_samples", "init": "init_samples"}
    records, report = build_afd_dataset(variant, fmt="labels", **{flags[s]: files[s] for s in sources})
    assert records == [{"prompt": p, "response": r, "label": y} for p, r, y in zip(flat[::3], flat[1::3], flat[2::3])]
    positives = sum(flat[2::3])
    assert report["kept"] == {"positive": positives, "negative": len(records) - positives}
    assert report["records"] == len(records)


def test_missing_input_for_variant(files):
    with pytest.raises(ValueError, match="needs demos"):
        build_afd_dataset("init-demo", init_samples=files["init"])
    with pytest.raises(ValueError, match="unknown variant"):
        build_afd_dataset("demo-demo", demos=files["demos"])


# -------------------------------------------------------------------------------------- pairing


def test_pairing_cycles_shorter_side_and_is_deterministic(tmp_path):
    init = write_lines(tmp_path / "i.jsonl", [sample("p", f"n{k}") for k in range(5)])
    sft = write_lines(tmp_path / "s.jsonl", [sample("p", "y0"), sample("p", "y1")])
    records, _ = build_afd_dataset("init-sft", init_samples=init, sft_samples=sft, seed=3)
    assert sorted(r["rejected"] for r in records) == [f"n{k}" for k in range(5)]
    assert sorted(Counter(r["chosen"] for r in records).values()) == [2, 3]
    again, _ = build_afd_dataset("init-sft", init_samples=init, sft_samples=sft, seed=3)
    assert again == records
    orders = {
        tuple(r["rejected"] for r in build_afd_dataset("init-sft", init_samples=init, sft_samples=sft, seed=s)[0])
        for s in range(10)
    }
    assert len(orders) > 1  # the seed does shuffle

    capped, report = build_afd_dataset("init-sft", init_samples=init, sft_samples=sft, max_pairs_per_prompt=2)
    assert len(capped) == 2 and report["capped_pairs"] == 3
    assert len({r["chosen"] for r in capped}) == 2 and len({r["rejected"] for r in capped}) == 2
    with pytest.raises(ValueError, match="only to the 'pairs' format"):
        build_afd_dataset("init-sft", init_samples=init, sft_samples=sft, fmt="labels", max_pairs_per_prompt=2)


# ------------------------------------------------------------------------------------- cleaning


def test_cleaning_counts(tmp_path):
    init = write_lines(
        tmp_path / "i.jsonl",
        [
            sample("p", "n0"),
            sample("p", "  \n", index=1),  # empty
            sample("p", "n2", finished=False, index=2),  # truncated
            sample("p", "n0", index=3),  # duplicate
            sample("p", "", finished=False, index=4),  # empty (first reason wins)
        ],
    )
    sft = write_lines(tmp_path / "s.jsonl", [sample("p", "y0"), sample("p", "y0"), sample("p", "y1", finished=False)])
    records, report = build_afd_dataset("init-sft", init_samples=init, sft_samples=sft, fmt="labels")
    assert records == [{"prompt": "p", "response": "y0", "label": 1}, {"prompt": "p", "response": "n0", "label": 0}]
    assert report["dropped_by_side"]["negative"] == {**dict.fromkeys(DROP_REASONS, 0), "empty": 2, "truncated": 1,
                                                     "duplicate": 1}
    assert report["dropped_by_side"]["positive"] == {**dict.fromkeys(DROP_REASONS, 0), "truncated": 1,
                                                     "duplicate": 1}
    assert report["dropped"]["truncated"] == 2 and report["dropped"]["empty"] == 2
    assert_counts_balance(report)
    text = format_report(report)
    assert "empty 2" in text and "truncated 2" in text and "duplicate 2" in text

    kept, report = build_afd_dataset(
        "init-sft", init_samples=init, sft_samples=sft, fmt="labels", keep_truncated=True, keep_empty=True
    )
    # "  \n" and "" are one response once trailing whitespace is removed (as a demonstration's would be)
    assert report["kept"] == {"positive": 2, "negative": 3}
    assert report["dropped"]["duplicate"] == 3


def test_truncation_check_needs_finished_field(tmp_path):
    init = write_lines(tmp_path / "i.jsonl", [sample("p", "n0"), {"prompt": "p", "response": "n1"}])
    sft = write_lines(tmp_path / "s.jsonl", [sample("p", "y0")])
    with pytest.raises(DataError, match=r"i\.jsonl, line 2, field 'finished': missing"):
        build_afd_dataset("init-sft", init_samples=init, sft_samples=sft)
    records, _ = build_afd_dataset("init-sft", init_samples=init, sft_samples=sft, keep_truncated=True)
    assert len(records) == 2
    _, report = build_afd_dataset("init-sft", init_samples=init, sft_samples=sft, lenient=True)
    assert report["bad_lines"] == {"missing_field": 1} and report["dropped"]["bad_line"] == 1


def test_ambiguous_responses_dropped_from_both_sides(tmp_path):
    init = write_lines(tmp_path / "i.jsonl", [sample("p1", "same"), sample("p1", "n1"), sample("p2", "only")])
    sft = write_lines(tmp_path / "s.jsonl", [sample("p1", "same"), sample("p1", "y1"), sample("p2", "only")])
    records, report = build_afd_dataset("init-sft", init_samples=init, sft_samples=sft)
    assert records == [{"prompt": "p1", "chosen": "y1", "rejected": "n1"}]
    assert report["dropped_by_side"]["positive"]["ambiguous"] == 2
    assert report["dropped_by_side"]["negative"]["ambiguous"] == 2
    assert report["prompts"] == 1
    assert_counts_balance(report)


def test_orphaned_prompt_after_cleaning(tmp_path):
    init = write_lines(tmp_path / "i.jsonl", [sample("p1", "n1"), sample("p2", "n2", finished=False)])
    sft = write_lines(tmp_path / "s.jsonl", [sample("p1", "y1"), sample("p2", "y2")])
    records, report = build_afd_dataset("init-sft", init_samples=init, sft_samples=sft)
    assert records == [{"prompt": "p1", "chosen": "y1", "rejected": "n1"}]
    assert report["dropped"]["truncated"] == 1 and report["dropped"]["orphaned"] == 1


def test_nothing_left_is_an_error(tmp_path):
    init = write_lines(tmp_path / "i.jsonl", [sample("p", "x")])
    sft = write_lines(tmp_path / "s.jsonl", [sample("p", "x")])
    with pytest.raises(DataError, match="no records left") as exc:
        build_afd_dataset("init-sft", init_samples=init, sft_samples=sft)
    assert "ambiguous 2" in str(exc.value)


# ------------------------------------------------------------------------------ matching / errors


def test_unmatched_prompt_error_names_file_line_field_prompt(files, tmp_path):
    init = write_lines(tmp_path / "init2.jsonl", [sample("p1", "a"), sample("p2", "b"), sample("p3 extra", "c")])
    with pytest.raises(DataError) as exc:
        build_afd_dataset("init-sft", init_samples=init, sft_samples=files["sft"])
    msg = str(exc.value)
    assert msg.startswith(f"{init}, line 3, field 'prompt':")
    assert "'p3 extra'" in msg and "init-policy samples" in msg and files["sft"] in msg

    records, report = build_afd_dataset("init-sft", init_samples=init, sft_samples=files["sft"], lenient=True)
    assert {r["prompt"] for r in records} == {"p1", "p2"}
    assert report["unmatched_prompts"] == 1
    assert report["dropped_by_side"]["negative"]["unmatched_prompt"] == 1
    assert "one side only" in format_report(report)


def test_unmatched_prompt_on_positive_side_and_no_overlap_hint(tmp_path):
    init = write_lines(tmp_path / "i.jsonl", [sample("USER: p1", "a")])
    demos = write_lines(tmp_path / "d.jsonl", [demo("p1", "d")])
    with pytest.raises(DataError) as exc:
        build_afd_dataset("init-demo", demos=demos, init_samples=init)
    assert str(exc.value).startswith(f"{demos}, line 1, field 'prompt':")
    assert "No prompt occurs in both files" in str(exc.value)


def test_non_utf8_line_in_samples(files, tmp_path):
    init = write_lines(tmp_path / "i.jsonl", [sample("p1", "a"), b'{"prompt": "p2", "response": "\xe9"}'])
    with pytest.raises(DataError, match=r"i\.jsonl, line 2: not valid UTF-8"):
        build_afd_dataset("init-sft", init_samples=init, sft_samples=files["sft"])
    _, report = build_afd_dataset("init-sft", init_samples=init, sft_samples=files["sft"], lenient=True)
    assert report["bad_lines"] == {"non_utf8": 1}
    assert report["dropped_by_side"]["positive"]["unmatched_prompt"] == 1  # p2 lost its only init sample


def test_missing_key_in_demos(files, tmp_path):
    demos = write_lines(tmp_path / "d.jsonl", [demo("p1", "d1"), {"prompt": "p2", "answer": "d2"}])
    with pytest.raises(DataError, match=r"d\.jsonl, line 2, field 'response': missing"):
        build_afd_dataset("sft-demo", demos=demos, sft_samples=files["sft"])
    with pytest.raises(DataError, match=r"d\.jsonl, line 1, field 'answer': missing"):
        build_afd_dataset("sft-demo", demos=demos, sft_samples=files["sft"], output_key="answer")


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_empty_demos_file(files, tmp_path, lines):
    demos = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=r"d\.jsonl: the demonstrations file has no records"):
        build_afd_dataset("init-demo", demos=demos, init_samples=files["init"])


def test_all_bad_lines_is_empty_in_lenient_mode(files, tmp_path):
    demos = write_lines(tmp_path / "d.jsonl", ["nope", "[]"])
    with pytest.raises(DataError, match=r"has no records \(2 bad lines skipped\)"):
        build_afd_dataset("init-demo", demos=demos, init_samples=files["init"], lenient=True)


# ------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<eos>", "p1", "p2", "long", "prompt", "with", "many", "words"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", pad_token="<eos>")


def test_prompt_too_long(tmp_path, tiny_tokenizer):
    long = "long prompt with many words"
    init = write_lines(tmp_path / "i.jsonl", [sample("p1", "a"), sample(long, "b")])
    sft = write_lines(tmp_path / "s.jsonl", [sample("p1", "y"), sample(long, "z")])
    kw = dict(init_samples=init, sft_samples=sft, tokenizer=tiny_tokenizer, max_prompt_len=4)
    with pytest.raises(DataError) as exc:
        build_afd_dataset("init-sft", **kw)
    assert str(exc.value).startswith(f"{sft}, line 2, field 'prompt': 5 tokens")
    records, report = build_afd_dataset("init-sft", lenient=True, **kw)
    assert records == [{"prompt": "p1", "chosen": "y", "rejected": "a"}]
    assert report["dropped"]["prompt_too_long"] == 2
    assert_counts_balance(report)
    records, _ = build_afd_dataset("init-sft", **{**kw, "max_prompt_len": 5})
    assert len(records) == 2
    with pytest.raises(ValueError, match="together"):
        build_afd_dataset("init-sft", init_samples=init, sft_samples=sft, max_prompt_len=4)


def test_pairs_readable_by_openrlhf_reward_dataset(files, tiny_tokenizer):
    """The default output works with RewardDataset given only --data.prompt_key prompt."""
    reward_dataset = pytest.importorskip("openrlhf.datasets.reward_dataset")
    from types import SimpleNamespace

    import datasets

    records, _ = build_afd_dataset("init-sft", init_samples=files["init"], sft_samples=files["sft"])
    data_args = SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected")
    strategy = SimpleNamespace(args=SimpleNamespace(data=data_args))
    ds = reward_dataset.RewardDataset(
        datasets.Dataset.from_list(records), tiny_tokenizer, 16, strategy, num_processors=1
    )
    assert len(ds) == 3
    assert (ds.prompts[0], ds.chosens[0]) == ("p1", "s1a")
    chosen_ids, _, reject_ids, _, _ = ds[0]
    assert chosen_ids[0, -1].item() == tiny_tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------- CLI


def test_cli_writes_output_and_report(files, tmp_path, capsys):
    out = tmp_path / "out" / "pairs.jsonl"
    out.parent.mkdir()
    code = main(["--init-samples", files["init"], "--sft-samples", files["sft"], "--output", str(out)])
    assert code == 0
    assert len(out.read_text().splitlines()) == 3
    captured = capsys.readouterr()
    assert "3 records over 2 prompts" in captured.out and "wrote 3 records" in captured.out

    code = main(["--variant", "sft-demo", "--demos", files["demos"], "--sft-samples", files["sft"],
                 "--init-samples", files["init"], "--format", "labels", "--output", str(out)])
    assert code == 0
    assert [json.loads(line)["label"] for line in out.read_text().splitlines()] == [1, 0, 1, 0]
    assert "--init-samples is not used" in capsys.readouterr().err


def test_cli_tokenizer_path(files, tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "o.jsonl"
    argv = ["--init-samples", files["init"], "--sft-samples", files["sft"], "--output", str(out),
            "--tokenizer", str(tmp_path / "tok"), "--max-prompt-len", "1"]
    assert main(argv) == 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--variant", "init-demo", "--init-samples", "i.jsonl"], "--demos is required for --variant init-demo"),
        (["--sft-samples", "s.jsonl"], "--init-samples is required for --variant init-sft"),
        (["--init-samples", "i", "--sft-samples", "s", "--max-prompt-len", "3"], "must be given together"),
        (["--init-samples", "i", "--sft-samples", "s", "--format", "labels", "--max-pairs-per-prompt", "2"],
         "only to --format pairs"),
        (["--init-samples", "i", "--sft-samples", "s", "--max-pairs-per-prompt", "0"], "must be >= 1"),
    ],
)
def test_cli_argument_errors(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--output", str(tmp_path / "o.jsonl")])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_cli_data_error_exit_code_and_target_untouched(files, tmp_path, capsys):
    from openrlhf_irl.utils.output_guard import mark_file

    out = tmp_path / "o.jsonl"
    out.write_text("previous\n")
    mark_file(str(out), "openrlhf_irl.cli.build_afd_dataset")  # an earlier run's output: it may be replaced
    bad = write_lines(tmp_path / "bad.jsonl", [sample("p1", "a"), "{oops"])
    code = main(["--init-samples", bad, "--sft-samples", files["sft"], "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {bad}, line 2: invalid JSON") and "Traceback" not in err
    assert out.read_text() == "previous\n"

    code = main(["--init-samples", str(tmp_path / "nope.jsonl"), "--sft-samples", files["sft"], "--output", str(out)])
    assert code == 1 and "nope.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["init", "sft"])
def test_cli_refuses_an_output_that_is_an_input(files, tmp_path, capsys, which):
    import shutil

    (tmp_path / "copy").mkdir()
    inputs = {k: str(shutil.copy(files[k], tmp_path / "copy" / f"{k}.jsonl")) for k in ("init", "sft")}
    before = {k: open(p, "rb").read() for k, p in inputs.items()}
    code = main(["--init-samples", inputs["init"], "--sft-samples", inputs["sft"], "--output", inputs[which]])
    err = capsys.readouterr().err
    flag = "--init-samples" if which == "init" else "--sft-samples"
    assert code == 2 and f"is the same file as {flag}" in err and err.count("\n") == 1
    assert {k: open(p, "rb").read() for k, p in inputs.items()} == before
