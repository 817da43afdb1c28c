"""Best-of-N: the all-subsets estimator against brute-force enumeration, unfinished candidates, golden reward
conventions (a third-party sequence classifier against a direct transformers call), and the CLI's checks."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from openrlhf_irl.afd.best_of_n import (best_of_n_curve, best_of_n_rows, best_of_n_stats, group_by_prompt,
                                        load_golden, oracle_curve, parse_ns, resolve_golden, score_and_select)
from openrlhf_irl.cli.best_of_n import main

GROUPS = [
    # prompt A: the scorer prefers sample 1 (golden .9), then sample 3 (golden .2) is never better by score
    [{"s": 0.1, "golden": 0.5}, {"s": 0.7, "golden": 0.9}, {"s": 0.3, "golden": 1.0}, {"s": 0.2, "golden": 0.2}],
    # prompt B: the best by score appears only at N=4
    [{"s": 0.0, "golden": 0.1}, {"s": -1.0, "golden": 0.8}, {"s": -2.0, "golden": 0.3}, {"s": 5.0, "golden": 0.6}],
]


def brute_force(cands, n, score="s", value="golden", unfinished_last=True):
    """Mean over every N-subset (itertools) of the value of its best member: finished first (if asked), then the
    highest score, ties to the earliest sample - a plain loop, independent of the estimator's weights."""
    total, count = 0.0, 0
    for subset in itertools.combinations(range(len(cands)), n):
        best = subset[0]
        for j in subset[1:]:
            a, b = cands[j], cands[best]
            fa = a.get("finished", True) or not unfinished_last
            fb = b.get("finished", True) or not unfinished_last
            if (fa, a[score]) > (fb, b[score]):
                best = j
        total += cands[best][value]
        count += 1
    return total / count


def test_report_rows_are_the_all_subsets_distribution_with_unfinished_last():
    """The demo's Best-of-N rows: per prompt, weights over candidates whose weighted golden is the brute-force mean
    over every N-subset; the oracle too ranks unfinished candidates last (a high-golden unfinished sample is picked
    only from subsets without a finished one)."""
    groups = [[dict(c, prompt="A", response=f"a{i}", sample_index=i, finished=i != 2) for i, c in enumerate(GROUPS[0])],
              [dict(c, prompt="B", response=f"b{i}", sample_index=i) for i, c in enumerate(GROUPS[1])]]
    records = [c for g in groups for c in g]
    result = score_and_select(records, {"s": lambda recs: [r["s"] for r in recs]}, [1, 2, 4])
    rows = best_of_n_rows(result, [1, 2, 4])
    assert set(rows) == {f"bon:{s}:{n}" for s in ("s", "oracle") for n in (1, 2, 4)}
    for name, key in (("s", "s"), ("oracle", "golden")):
        for n in (1, 2, 4):
            row = rows[f"bon:{name}:{n}"]
            for g in groups:
                p = g[0]["prompt"]
                assert sum(row["weights"][p]) == pytest.approx(1.0)
                got = sum(w * x for w, x in zip(row["weights"][p], row["golden"][p]))
                assert got == pytest.approx(brute_force(g, n, score=key)), (name, n, p)
    # prompt A's sample 2 (golden 1.0) is unfinished: the oracle's Best-of-4 takes the best finished one (0.9)
    assert rows["bon:oracle:4"]["golden"]["A"] == [0.9] and rows["bon:oracle:4"]["weights"]["A"] == [1.0]
    assert rows["bon:s:2"]["responses"]["A"] == ["a1"]  # the concrete pick of the first two samples


def test_first_n_estimator_is_kept_as_an_option():
    assert best_of_n_curve(GROUPS, [1, 2, 4], "s", estimator="first") == pytest.approx(
        {1: (0.5 + 0.1) / 2, 2: (0.9 + 0.1) / 2, 4: (0.9 + 0.6) / 2})
    with pytest.raises(ValueError, match="fewer than 8"):
        best_of_n_curve(GROUPS, [8], "s")


def test_all_subsets_estimator_matches_enumeration():
    # hand case, prompt A, N=2: 6 pairs; best-by-score golden values: (0,1)->.9 (0,2)->1 (0,3)->.2 (1,2)->.9
    # (1,3)->.9 (2,3)->1  => 4.9 / 6
    assert best_of_n_curve(GROUPS[:1], [2], "s")[2] == pytest.approx(4.9 / 6)
    import random

    rng = random.Random(0)
    for trial in range(20):
        m = rng.randint(1, 7)
        cands = [{"s": rng.choice([0.0, 0.5, 1.0, rng.random()]), "golden": rng.gauss(0, 1),
                  "finished": rng.random() < 0.6} for _ in range(m)]
        for n in range(1, m + 1):
            for last in (True, False):
                got = best_of_n_curve([cands], [n], "s", unfinished="last" if last else "score")[n]
                assert got == pytest.approx(brute_force(cands, n, unfinished_last=last), abs=1e-12), (trial, n)
    # N = N_max: every subset is the whole set, the estimate is the best candidate's value
    assert oracle_curve(GROUPS, [4]) == pytest.approx({4: (1.0 + 0.8) / 2})


def test_standard_error_over_prompts():
    stats = best_of_n_stats(GROUPS, [1, 2], "s")
    per_prompt = [[brute_force(g, n) for g in GROUPS] for n in (1, 2)]
    for n, values in zip((1, 2), per_prompt):
        mean = sum(values) / 2
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / 1 / 2)
        assert stats[n]["mean"] == pytest.approx(mean) and stats[n]["se"] == pytest.approx(se)
    assert best_of_n_stats(GROUPS[:1], [1], "s")[1]["se"] is None


def test_unfinished_candidates_rank_last_for_every_scorer_and_are_counted():
    # the unfinished sample has the highest score and the highest golden reward; ranked last it is never picked
    group = [{"prompt": "p", "sample_index": 0, "response": "a", "finished": True},
             {"prompt": "p", "sample_index": 1, "response": "b", "finished": False},
             {"prompt": "p", "sample_index": 2, "response": "c", "finished": True}]
    scores = {"a": 0.0, "b": 9.0, "c": 1.0}
    golden_values = {"a": 0.2, "b": 5.0, "c": 0.4}
    scorers = {"rm": lambda recs: [scores[r["response"]] for r in recs],
               "log_ratio": lambda recs: [scores[r["response"]] for r in recs]}
    golden = lambda prompts, responses: [golden_values[r] for r in responses]  # noqa: E731
    out = score_and_select([dict(r) for r in group], scorers, [1, 2, 3], golden)
    assert out["unfinished_candidates"] == 1
    for name in ("rm", "log_ratio", "oracle (golden)"):
        stats = out["stats"][name]
        # N=3: the finished best (c, 0.4); N=1: mean golden of all three (each drawn alone)
        assert stats[3]["mean"] == pytest.approx(0.4)
        assert stats[1]["mean"] == pytest.approx((0.2 + 5.0 + 0.4) / 3)
        assert stats[1]["unfinished"] == pytest.approx(1 / 3)  # the pick is unfinished iff b is drawn alone
        assert stats[2]["unfinished"] == pytest.approx(0.0)
    assert [r["response"] for r in out["selected"]["rm"][2]] == ["a"]  # first two: a (finished) beats b
    scored = score_and_select([dict(r) for r in group], scorers, [3], golden, unfinished="score")
    assert scored["stats"]["rm"][3]["mean"] == pytest.approx(5.0) and scored["stats"]["rm"][3]["unfinished"] == 1


def test_repeated_candidate_keys_are_refused():
    recs = [{"prompt": "p", "sample_index": 0}, {"prompt": "q", "sample_index": 0}, {"prompt": "p", "sample_index": 0}]
    with pytest.raises(ValueError, match="repeated candidate"):
        group_by_prompt(recs)


def test_golden_from_module_function_and_bad_spec():
    golden = load_golden("openrlhf_irl.demo.task:golden_reward")
    assert golden(["add 2 numbers to make 5"], ["1 + 4 = 5"]) == [pytest.approx(1.0)]
    with pytest.raises(ValueError, match="module:function"):
        load_golden("not-a-dir-nor-function")
    with pytest.raises(ValueError, match="cannot import"):
        load_golden("no_such_module_xyz:f")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model):
    """A tiny third-party-style reward model: LlamaForSequenceClassification built from a config, 1 label."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    out = str(tmp_path_factory.mktemp("golden_cls"))
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_labels = 1
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def test_golden_sequence_classifier_is_scored_its_own_way(classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = ["\n\nHuman: how do I count?\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:", "count from 3"]
    responses = [" one two three", " hello there, friend", " 3 4 5 6"]
    tok = AutoTokenizer.from_pretrained(classifier)
    model = AutoModelForSequenceClassification.from_pretrained(classifier, dtype=torch.float32).eval()
    with torch.no_grad():
        direct = [float(model(**tok(p + r, return_tensors="pt")).logits[0, 0]) for p, r in zip(prompts, responses)]
    assert resolve_golden(classifier) == ("hf", classifier)  # a bare directory: detected from its config
    for spec in (classifier, f"hf:{classifier}"):
        for batch in (1, 2):
            assert load_golden(spec, batch_size=batch)(prompts, responses) == pytest.approx(direct, abs=1e-5)
    # OpenRLHF's convention (" " + EOS appended, no special tokens) scores other text: a different number
    ours = load_golden(f"openrlhf:{classifier}")(prompts, responses)
    assert all(abs(a - b) > 1e-4 for a, b in zip(ours, direct))


def test_parse_ns_and_n_max():
    assert parse_ns("8,1, 2,2") == [1, 2, 8]
    assert parse_ns("1,2,4,8,16", n_max=12) == [1, 2, 4, 8, 12]
    assert parse_ns("1,2", n_max=6) == [1, 2, 6]
    for bad in ("0,2", "a,b", ""):
        with pytest.raises(ValueError):
            parse_ns(bad)


def test_cli_requires_a_scorer(tmp_path, capsys):
    assert main(["--policy", "p", "--prompts", "x", "--output-dir", str(tmp_path)]) == 2
    assert "at least one scorer" in capsys.readouterr().err


def test_cli_checks_every_path_before_sampling(tiny_model, classifier, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "count from 3"}) + "\n")
    out = tmp_path / "out"
    base = ["--policy", tiny_model, "--prompts", str(prompts), "--output-dir", str(out), "--backend", "hf"]
    cases = [
        (["--log-ratio-init", str(tmp_path / "nope")], "--log-ratio-init"),
        (["--reward-model", str(tmp_path / "nope")], "--reward-model"),
        (["--reward-model", tiny_model], "not a reward model"),
        (["--log-ratio-init", tiny_model, "--golden", "no_such_module_xyz:f"], "--golden"),
        (["--log-ratio-init", tiny_model, "--golden", str(tmp_path)], "--golden"),
    ]
    for extra, needle in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert not (out / "samples.jsonl").exists()
    with pytest.raises(SystemExit) as e:
        main(base + ["--log-ratio-init", tiny_model, "--max-prompts", "0"])
    assert e.value.code == 2 and "--max-prompts: must be >= 1" in capsys.readouterr().err
