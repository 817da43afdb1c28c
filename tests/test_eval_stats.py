"""Estimators of the evaluation (openrlhf_irl.eval.stats) on hand-built cases, and the held-out split."""

import itertools
import math
import random

import numpy as np
import pytest

from openrlhf_irl.demo import task as T
from openrlhf_irl.eval import stats as S


# --------------------------------------------------------------------------- win rate


def test_win_rate_hand_cases():
    # pairs (1, .5) (1, .5) win, (.5, .5) (.5, .5) tie: (2 + 0.5 * 2) / 4
    assert S.win_rate([1.0, 0.5], [0.5, 0.5]) == 0.75
    assert S.win_rate([0.0], [1.0]) == 0.0
    assert S.win_rate([1.0], [0.0]) == 1.0
    assert S.win_rate([0.3], [0.3]) == 0.5
    # 3 x 2 pairs by a plain loop
    a, b = [0.2, 0.7, 0.7], [0.7, 0.1]
    expected = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b) / 6
    assert S.win_rate(a, b) == pytest.approx(expected) == pytest.approx(4 / 6)  # (.2,.1) win; (.7,.7) x2 tie; (.7,.1) x2 win
    # float noise within tol is a tie, beyond it is not
    assert S.win_rate([0.1 + 0.2], [0.3]) == 0.5
    assert S.win_rate([0.31], [0.3]) == 1.0
    # a sample set against itself: every win has a matching loss
    x = [random.Random(0).random() for _ in range(7)] + [0.5, 0.5]
    assert S.win_rate(x, x) == 0.5
    with pytest.raises(ValueError):
        S.win_rate([], [1.0])


def test_prompt_win_rates_pair_by_prompt():
    cands = {"p": [1.0], "q": [0.0, 1.0]}
    refs = {"p": [0.0, 1.0], "q": [0.5], "r": [0.9]}
    assert S.prompt_win_rates(cands, refs) == {"p": 0.75, "q": 0.5}
    with pytest.raises(ValueError, match="no reference"):
        S.prompt_win_rates({"z": [1.0]}, refs)


# --------------------------------------------------------------------------- nested mean and bootstrap


def test_nested_mean_weighs_seeds_equally():
    assert S.nested_mean([[1, 2, 3], [10]]) == 6.0  # not the pooled mean 4.0
    with pytest.raises(ValueError):
        S.nested_mean([[1.0], []])
    with pytest.raises(ValueError):
        S.nested_mean([[float("nan")]])


def _exact_distribution(groups):
    """Every equally likely two-stage resample, enumerated with plain loops: value -> probability."""
    k = len(groups)
    dist = {}
    for seeds in itertools.product(range(k), repeat=k):
        per_slot = []
        for s in seeds:
            g = groups[s]
            per_slot.append([sum(g[i] for i in idx) / len(g) for idx in itertools.product(range(len(g)), repeat=len(g))])
        for combo in itertools.product(*per_slot):
            v = round(sum(combo) / k, 9)
            dist[v] = dist.get(v, 0.0) + (1 / k ** k) * (1 / np.prod([len(groups[s]) ** len(groups[s]) for s in seeds]))
    return dist


def test_bootstrap_matches_exact_enumeration():
    groups = [[0.0, 1.0], [2.0], [0.5, 0.5, 3.0]]
    dist = _exact_distribution(groups)
    assert sum(dist.values()) == pytest.approx(1.0)
    mean = sum(v * p for v, p in dist.items())
    var = sum((v - mean) ** 2 * p for v, p in dist.items())
    reps = S.hierarchical_bootstrap(groups, n_boot=40000, seed=1)
    assert set(np.round(reps, 9)) <= set(dist)  # only values a real resample can take
    assert reps.mean() == pytest.approx(mean, abs=0.01)
    assert reps.var() == pytest.approx(var, rel=0.03)
    # the percentile interval: quantiles of the exact distribution
    values = sorted(dist)
    cdf = np.cumsum([dist[v] for v in values])
    exact_lo = values[int(np.searchsorted(cdf, 0.025))]
    exact_hi = values[int(np.searchsorted(cdf, 0.975))]
    s = S.summarize(groups, n_boot=40000, seed=1, method="bootstrap")
    assert s["mean"] == pytest.approx((0.5 + 2.0 + 4 / 3) / 3)
    assert abs(s["lo"] - exact_lo) < 0.06 and abs(s["hi"] - exact_hi) < 0.06
    assert s["n_seeds"] == 3 and s["n_prompts"] == 6


def test_bootstrap_degenerate_and_single_seed():
    s = S.summarize([[0.4, 0.4, 0.4]], n_boot=200)
    assert s["mean"] == s["lo"] == s["hi"] == pytest.approx(0.4)
    # one seed: a plain bootstrap over prompts; its spread is the standard error of the prompt mean
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    reps = S.hierarchical_bootstrap([x], n_boot=4000, seed=2)
    assert reps.std() == pytest.approx(x.std() / np.sqrt(x.size), rel=0.08)
    # the seed stage: two seeds with constant prompts -> means 0, .5, .5, 1 (probabilities 1/4, 1/2, 1/4)
    reps = S.hierarchical_bootstrap([[0.0, 0.0], [1.0, 1.0]], n_boot=8000, seed=3)
    assert set(np.round(reps, 9)) == {0.0, 0.5, 1.0}
    assert np.mean(reps == 0.5) == pytest.approx(0.5, abs=0.03)
    s = S.summarize([[0.0, 0.0], [1.0, 1.0]], n_boot=8000, method="bootstrap")
    assert (s["lo"], s["hi"]) == (0.0, 1.0)
    # the default with 2+ seeds, by hand: seed means 0 and 1, sd 0.7071, t_{1, 0.975} = 12.706
    s = S.summarize([[0.0, 0.0], [1.0, 1.0]])
    assert s["method"] == "t" and s["lo"] == pytest.approx(0.5 - 12.7062 * 0.5, abs=1e-3)
    assert s["hi"] == pytest.approx(0.5 + 12.7062 * 0.5, abs=1e-3)
    assert S.summarize([[0.4, 0.2]])["method"] == "bootstrap"  # one seed: prompts only


def test_seed_t_interval_by_a_plain_loop():
    groups = [[0.1, 0.3], [0.6], [0.2, 0.2, 0.8]]
    means = [0.2, 0.6, 0.4]
    m = sum(means) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in means) / 2)
    half = 4.302652729749462 * sd / math.sqrt(3)  # t_{2, 0.975}
    assert S.seed_t_interval(groups) == pytest.approx((m - half, m + half))


@pytest.mark.parametrize("k", [3, 4, 5, 6, 8, 10])
def test_seed_interval_covers_the_truth_with_few_seeds(k):
    """Seed variation dominates (seed sd 1, prompt sd 0.1, 20 prompts): the default interval covers the true mean in
    at least 93% of 2000 simulated experiments for every K in 3..10; the percentile bootstrap over seeds does not at
    K = 3 (the reason it is no longer the default)."""
    rng = np.random.default_rng(100 + k)
    trials, hits = 2000, 0
    for _ in range(trials):
        groups = [rng.normal(m, 0.1, size=20) for m in rng.normal(0.0, 1.0, size=k)]
        s = S.summarize(groups)
        hits += s["lo"] <= 0.0 <= s["hi"]
    assert hits / trials >= 0.93, hits / trials
    if k == 3:
        boot_hits = 0
        for t in range(300):
            groups = [rng.normal(m, 0.1, size=20) for m in rng.normal(0.0, 1.0, size=k)]
            s = S.summarize(groups, n_boot=400, seed=t, method="bootstrap")
            boot_hits += s["lo"] <= 0.0 <= s["hi"]
        assert boot_hits / 300 < 0.85, boot_hits / 300


def test_bootstrap_covers_the_true_mean_with_seed_variation():
    """Data with a seed effect: the two-stage interval covers the truth about 95% of the time; a bootstrap over
    pooled prompts (ignoring seeds) covers far less, so the seed stage is doing real work."""
    rng = np.random.default_rng(5)
    hits = pooled_hits = 0
    trials = 150
    for t in range(trials):
        seed_means = rng.normal(0.0, 0.2, size=6)
        groups = [rng.normal(m, 0.2, size=20) for m in seed_means]
        s = S.summarize(groups, n_boot=600, seed=t)
        hits += s["lo"] <= 0.0 <= s["hi"]
        p = S.summarize([np.concatenate(groups)], n_boot=600, seed=t)
        pooled_hits += p["lo"] <= 0.0 <= p["hi"]
    assert 0.82 <= hits / trials <= 0.99
    assert pooled_hits / trials < 0.7


def test_paired_difference():
    a = [{"p": 0.9, "q": 0.5, "x": 1.0}, {"r": 0.2}]
    b = [{"p": 0.4, "q": 0.5}, {"r": 0.3}]
    d = S.difference(a, b)
    assert d == [[pytest.approx(0.5), 0.0], [pytest.approx(-0.1)]]
    with pytest.raises(ValueError):
        S.difference(a, b[:1])
    assert S.fmt_ci({"mean": 0.5123, "lo": 0.47, "hi": 0.551}) == "0.512 [0.47, 0.55]"


# --------------------------------------------------------------------------- held-out split


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_held_out_prompts_are_disjoint_from_every_training_prompt(seed):
    train_pool, held = T.split_prompts(seed, 0.25)
    assert set(train_pool).isdisjoint(held)
    assert sorted(train_pool + held) == sorted(T.all_prompts())
    # a quarter of each k's targets, at least one
    for k in range(T.K_RANGE[0], T.K_RANGE[1] + 1):
        lo, hi = T.target_range(k)
        n_k = sum(T.parse_prompt(p)[0] == k for p in held)
        assert n_k == int(0.25 * (hi - lo + 1) + 0.5) >= 1
    cfg = T.TaskConfig(seed=seed, n_train_prompts=2000, n_eval_prompts=300, n_pretrain=3000)
    task = T.build_task(cfg)
    train = set(task["train_prompts"]) | {d["prompt"] for d in task["demonstrations"]}
    assert set(task["eval_prompts"]) <= set(held) == set(task["held_out_prompts"])
    assert train <= set(train_pool) and train.isdisjoint(held)
    assert set(task["eval_prompts"]) == set(held)  # 300 draws reach every held-out prompt
    # the pre-training text never shows a held-out prompt either
    corpus_prompts = {T.format_prompt(*T.parse_prompt(line)) for line in T.pretrain_corpus(cfg)
                      if T.parse_prompt(line)}
    assert corpus_prompts and corpus_prompts.isdisjoint(held)
    # the split depends on the seed
    assert T.split_prompts(seed + 1, 0.25)[1] != held


def test_held_out_fraction_zero_keeps_the_old_draws():
    cfg = T.TaskConfig(seed=4, n_train_prompts=30, n_eval_prompts=10, held_out_fraction=0.0)
    task = T.build_task(cfg)
    rng = random.Random(4)
    assert task["train_prompts"] == T.make_prompts(30, random.Random(rng.getrandbits(64)))
    assert task["held_out_prompts"] == []
    with pytest.raises(ValueError):
        T.split_prompts(0, 1.0)


# --------------------------------------------------------------------------- per-token entropy


def test_entropy_sums_match_a_per_prefix_loop(tiny_model):
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from openrlhf_irl.eval.diversity import entropy_sums, prompt_text_diversity

    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    prompts = [[5, 6, 7], [8], [9, 10]]
    responses = [[11, 12], [13, 14, 15, 16], []]
    for temp in (1.0, 0.5):
        got = entropy_sums(model, prompts, responses, temperature=temp, batch_size=2, pad_token_id=0)
        for (h, n), p, r in zip(got, prompts, responses):
            assert n == len(r)
            want = 0.0
            for t in range(len(r)):  # one unpadded forward per prefix, entropy by a plain sum
                with torch.no_grad():
                    last = model(input_ids=torch.tensor([p + r[:t]])).logits[0, -1].double() / temp
                probs = torch.softmax(last, -1).tolist()
                want += -sum(q * math.log(q) for q in probs if q > 0)
            assert h == pytest.approx(want, rel=1e-4, abs=1e-6)
    # a sharper distribution has less entropy
    hot = entropy_sums(model, prompts[:1], responses[:1], temperature=2.0)[0][0]
    cold = entropy_sums(model, prompts[:1], responses[:1], temperature=0.5)[0][0]
    assert cold < hot
    d = prompt_text_diversity(["1 + 2 = 3", "1 + 2 = 3"])
    assert d["distinct_1"] == 0.5 and d["self_bleu"] == pytest.approx(1.0)
