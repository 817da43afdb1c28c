"""The demonstration/sample formatting leak (issue #20), closed at the datasets: a demonstration and a sample of the
same text, the sample from a policy trained with OpenRLHF's SFT convention (response + " " + EOS), reach the
pairs and labels datasets as the same tokens; and ``build_afd_dataset`` names a surface feature that separates its
two classes almost perfectly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import pytest

from openrlhf_irl.datasets.afd import LEAK_MIN_PER_CLASS, best_threshold_accuracy, build_afd_dataset

PROMPT = "add numbers to make 6\n"  # ends in a newline, as the demo joins prompt and answer: no token spans both


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def sampled_by_a_policy_trained_on(tok, prompt: str, demo: str) -> str:
    """The text our samplers return for a policy that emits exactly what OpenRLHF's SFTDataset trained it to emit
    after ``prompt`` (the tokens of ``demo + " " + EOS``), decoded as ``generation/hf.py`` and vLLM decode it:
    without special tokens, so without the final EOS."""
    from openrlhf.datasets.sft_dataset import SFTDataset

    args = SimpleNamespace(data=SimpleNamespace(input_key="prompt", output_key="response", apply_chat_template=False))
    sft = SFTDataset(datasets.Dataset.from_list([{"prompt": prompt, "response": demo}]), tok, 64,
                     SimpleNamespace(args=args, print=print), num_processors=1)
    input_ids, _, loss_mask = sft[0]
    start = int(loss_mask[0].nonzero()[0, 0]) + 1  # the first target: the response's first token
    assert input_ids[0][:start].tolist() == tok(prompt, add_special_tokens=False)["input_ids"]  # a clean boundary
    trained = input_ids[0][start:].tolist()  # the response tokens, then EOS
    assert trained[-1] == tok.eos_token_id
    return tok.decode(trained[:-1], skip_special_tokens=True)


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sample(prompt, response):
    return {"prompt": prompt, "response": response, "policy": "sft", "sample_index": 0, "finished": True,
            "logprob": -1.0}


def test_the_sft_convention_leaves_a_trailing_space_on_samples(tok):
    """The premise: without the fix the two sources differ in their last characters."""
    assert sampled_by_a_policy_trained_on(tok, PROMPT, "2 + 4 = 6") == "2 + 4 = 6 "


@pytest.mark.parametrize("fmt", ["pairs", "labels"])
def test_a_demonstration_and_a_sample_of_the_same_text_are_the_same_tokens(tok, tmp_path, fmt):
    """Two sft-demo datasets over one prompt: text A as the demonstration against sample B, then B as the
    demonstration against a sample of A. A as a demonstration and A as a sample must tokenise alike, through
    OpenRLHF's RewardDataset (pairs) and our LabeledRewardDataset (labels)."""
    from openrlhf.datasets.reward_dataset import RewardDataset

    from openrlhf_irl.datasets.labeled_reward import LabeledRewardDataset

    a, b = "2 + 4 = 6", "1 + 5 = 6"
    tokens = {}
    for demo, other in ((a, b), (b, a)):
        demos = write(tmp_path / "demos.jsonl", [{"prompt": PROMPT, "response": demo}])
        samples = write(tmp_path / "sft.jsonl", [sample(PROMPT, sampled_by_a_policy_trained_on(tok, PROMPT, other))])
        records, _ = build_afd_dataset("sft-demo", demos=demos, sft_samples=samples, fmt=fmt)
        data = SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                               response_key="response", label_key="label", apply_chat_template=False,
                               tokenizer_chat_template=None)
        strategy = SimpleNamespace(args=SimpleNamespace(data=data), print=lambda *x: None)
        if fmt == "pairs":
            ds = RewardDataset(datasets.Dataset.from_list(records), tok, 64, strategy, num_processors=1)
            chosen, _, rejected, _, _ = ds[0]
            tokens[(demo, "demo")], tokens[(other, "sample")] = chosen[0].tolist(), rejected[0].tolist()
        else:
            ds = LabeledRewardDataset(datasets.Dataset.from_list(records), tok, 64, strategy, num_processors=1)
            for i, rec in enumerate(records):
                ids = ds[i][0][0].tolist()
                tokens[(rec["response"] if rec["label"] else other, "demo" if rec["label"] else "sample")] = ids
    assert tokens[(a, "demo")] == tokens[(a, "sample")]
    assert tokens[(b, "demo")] == tokens[(b, "sample")]
    assert tokens[(a, "demo")] != tokens[(b, "demo")]  # the comparison can fail: different texts differ
    assert tokens[(a, "demo")].count(tok.eos_token_id) == 1


def test_a_sample_equal_to_its_demonstration_is_ambiguous_not_a_pair(tok, tmp_path):
    """A policy that reproduces a demonstration: before the fix "6" vs "6 " made it a positive and a negative."""
    demos = write(tmp_path / "demos.jsonl", [{"prompt": PROMPT, "response": r} for r in ("2 + 4 = 6", "3 + 3 = 6")])
    samples = write(tmp_path / "sft.jsonl", [sample(PROMPT, sampled_by_a_policy_trained_on(tok, PROMPT, "2 + 4 = 6")),
                                             sample(PROMPT, "1 + 5 = 6 ")])
    records, report = build_afd_dataset("sft-demo", demos=demos, sft_samples=samples, fmt="labels")
    assert report["dropped"]["ambiguous"] == 2  # the demonstration and its copy, from both sides
    assert records == [{"prompt": PROMPT, "response": "3 + 3 = 6", "label": 1},
                       {"prompt": PROMPT, "response": "1 + 5 = 6", "label": 0}]


def _labelled(tmp_path, pos, neg):
    n = len(pos)
    demos = write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": r} for i, r in enumerate(pos)])
    samples = write(tmp_path / "s.jsonl", [sample(f"p{i}", r) for i, r in enumerate(neg[:n])])
    return build_afd_dataset("sft-demo", demos=demos, sft_samples=samples, fmt="labels")[1]


def test_a_surface_feature_that_separates_the_classes_is_named(tmp_path):
    n = LEAK_MIN_PER_CLASS
    short = [f"{i} + {i} = {2 * i}" for i in range(n)]
    # negatives three times as long: length alone separates them
    report = _labelled(tmp_path, short, [f"{s} and {s} and {s}" for s in short[1:] + short[:1]])
    assert report["surface_features"]["length"] == 1.0
    assert any(w.startswith("length alone separates") for w in report["warnings"]), report["warnings"]
    # an EOS string left in every sample's text
    report = _labelled(tmp_path, short, [s + " </s>" for s in short[1:] + short[:1]])
    assert any(w.startswith("EOS count alone separates") for w in report["warnings"]), report["warnings"]
    # the SFT convention's trailing space on every sample: closed by the normalisation, so no warning
    report = _labelled(tmp_path, short, [s + " " for s in short[1:] + short[:1]])
    assert report["surface_features"]["trailing whitespace"] == 0.5
    assert report["warnings"] == []


def test_few_records_or_mixed_classes_give_no_warning(tmp_path):
    n = LEAK_MIN_PER_CLASS
    few = _labelled(tmp_path, ["a", "b"], ["a long one", "another long one"])
    assert few["surface_features"]["length"] == 1.0 and few["warnings"] == []
    mixed = _labelled(tmp_path, [f"{i} = {i}" * (1 + i % 3) for i in range(n)],
                      [f"{i} == {i}" * (1 + (i + 1) % 3) for i in range(n)])
    assert mixed["warnings"] == []


def test_best_threshold_accuracy_by_hand():
    assert best_threshold_accuracy([1, 2, 3], [4, 5, 6]) == 1.0  # either direction counts
    assert best_threshold_accuracy([5, 6], [1, 2]) == 1.0
    assert best_threshold_accuracy([1, 2], [1, 2]) == 0.5
    # [1, 5] vs [2, 6]: "x <= 1 is positive" gets 1 of 2 positives and both negatives: (0.5 + 1) / 2
    assert best_threshold_accuracy([1, 5], [2, 6]) == 0.75
