"""The golden-pref comparator's pairs (:mod:`openrlhf_irl.datasets.golden_pref`) against a hand-built case."""

from __future__ import annotations

from openrlhf_irl.datasets.golden_pref import golden_preference_pairs


def _golden(prompt: str, response: str) -> float:
    return float(response.split()[0])  # the response's first word is its worth


def test_pairs_are_disjoint_ordered_by_golden_and_skip_ties():
    samples = [{"prompt": "p", "response": f"{g} answer {i} "} for i, g in enumerate((0.2, 0.9, 0.5, 0.5, 0.1))]
    samples += [{"prompt": "q", "response": "0.3 x"}, {"prompt": "q", "response": "0.3 y\n"}]
    records, counts = golden_preference_pairs(samples, _golden, seed=3)
    assert counts == {"samples": 7, "prompts": 2, "pairs": len(records), "ties": counts["ties"]}
    # p: 5 samples -> 2 disjoint pairs (one sample unpaired); q: one pair, tied -> left out
    assert counts["pairs"] + counts["ties"] == 3 and all(r["prompt"] == "p" for r in records)
    used = [r[k] for r in records for k in ("chosen", "rejected")]
    assert len(used) == len(set(used))  # every sample in one pair at most
    for r in records:
        assert _golden("p", r["chosen"]) > _golden("p", r["rejected"])  # the better one chosen, never the reverse
        assert r["chosen"] == r["chosen"].rstrip() and r["rejected"] == r["rejected"].rstrip()  # stored normalised


def test_pairing_is_deterministic_per_seed_and_independent_of_other_prompts():
    base = [{"prompt": "p", "response": f"{g} r{i}"} for i, g in enumerate((0.1, 0.2, 0.3, 0.4, 0.5, 0.6))]
    other = [{"prompt": "z", "response": f"{g} s{i}"} for i, g in enumerate((0.7, 0.8))]
    a, _ = golden_preference_pairs(base, _golden, seed=1)
    b, _ = golden_preference_pairs(other + base, _golden, seed=1)
    assert a == [r for r in b if r["prompt"] == "p"] and a == golden_preference_pairs(base, _golden, seed=1)[0]
    pairings = {frozenset(frozenset((r["chosen"], r["rejected"])) for r in golden_preference_pairs(base, _golden,
                                                                                                 seed=s)[0])
                for s in range(8)}
    assert len(pairings) > 1  # the seed shuffles who meets whom
