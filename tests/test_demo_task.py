"""The synthetic demo task (openrlhf_irl.demo.task) and the diversity metrics."""

import importlib
import math
import random
import statistics

import pytest

from openrlhf_irl.demo import task as T
from openrlhf_irl.utils.metrics import distinct_n, rankdata, self_bleu, spearman

P4 = "add 4 numbers to make 17"


# --------------------------------------------------------------------------- prompts


def test_prompt_roundtrip_and_space():
    assert T.format_prompt(4, 17) == P4
    assert T.parse_prompt(P4) == (4, 17)
    # searched anywhere: chat-templated prompts still parse
    assert T.parse_prompt("User: add 3 numbers to make 9\nAssistant:") == (3, 9)
    assert T.parse_prompt("hello") is None
    assert T.parse_prompt(None) is None
    everything = T.all_prompts()
    assert len(everything) == len(set(everything)) == 55
    drawn = set(T.make_prompts(2000, random.Random(0)))
    assert drawn <= set(everything) and len(drawn) == 55


def test_texts_are_short():
    task = T.build_task(T.TaskConfig(seed=3, n_train_prompts=300, n_eval_prompts=10))
    assert max(len(p.split()) for p in task["train_prompts"]) <= 6
    assert max(len(d["response"].split()) for d in task["demonstrations"]) <= 13
    rng = random.Random(0)
    assert max(len(T.random_response(P4, rng).split()) for _ in range(300)) <= 15


# --------------------------------------------------------------------------- reward


def test_best_response_scores_one_on_every_prompt():
    for p in T.all_prompts():
        assert T.golden_reward(p, T.best_response(p)) == 1.0, p
    assert T.best_response(P4) == "1 + 2 + 3 + 11 = 17"


@pytest.mark.parametrize(
    "response,expected",
    [
        ("1 + 2 + 4 + 10 = 17", 1.0),
        # one stray number: s_len = exp(-1/2); style still 1
        ("1 + 2 + 3 + 4 + 7 = 17", math.exp(-0.5)),
        # did not stop after "= 17": s_end = 0.75
        ("1 + 2 + 4 + 10 = 17 add 4", 0.75),
        # no closing "= 17": s_end = 0.5
        ("1 + 2 + 4 + 10", 0.5),
        # sum off by one: s_sum = exp(-1/3)
        ("1 + 2 + 4 + 11 = 17", math.exp(-1 / 3)),
        # repeats: distinct 2/4, ascending pairs (4,5) only: 1/3
        # style = 0.4*0.5 + 0.4/3 + 0.2 -> reward = 0.3 + 0.7 * style
        ("4 + 4 + 4 + 5 = 17", 0.3 + 0.7 * (0.2 + 0.4 / 3 + 0.2)),
        # descending: order 0 -> 0.3 + 0.7 * (0.4 + 0.2)
        ("10 + 4 + 2 + 1 = 17", 0.72),
        # no "+" signs: style loses its 0.2 format part -> 0.3 + 0.7 * 0.8
        ("1 2 4 10 = 17", 0.86),
    ],
)
def test_golden_reward_hand_cases(response, expected):
    assert T.golden_reward(P4, response) == pytest.approx(expected, abs=1e-9)


def test_golden_reward_shortcuts_and_garbage_score_low():
    # "T = T": exact sum but 1 number of 4 (s_len = exp(-3/2)), distinct 1/4, order 0
    assert T.golden_reward(P4, "17 = 17") == pytest.approx(
        math.exp(-1.5) * (0.3 + 0.7 * (0.4 * 0.25 + 0.2))
    )
    assert T.golden_reward(P4, "17 = 17") < 0.15
    garbage = ["", "   ", "hello world", "= = =", "+ + +", "\U0001f600", "17 17 17 17 17 17 17",
               "9" * 5000, "1 + " * 3000 + "1 = 17", "nan", "-inf", "\x00\x01", "add 4 numbers"]
    for g in garbage:
        r = T.golden_reward(P4, g)
        assert 0.0 <= r < 0.1, (g[:30], r)
    assert T.golden_reward(P4, None) == 0.0
    assert T.golden_reward("not a task prompt", "1 + 2 + 4 + 10 = 17") == 0.0
    assert T.golden_reward(None, None) == 0.0


def test_golden_reward_never_raises_and_is_bounded():
    rng = random.Random(1)
    alphabet = "0123456789+= abc\n\t-.,\u00e9"
    prompts = T.make_prompts(20, rng) + ["", "x", "add 0 numbers to make 0"]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        r = T.golden_reward(rng.choice(prompts), s)
        assert isinstance(r, float) and 0.0 <= r <= 1.0


def test_response_repeating_the_prompt_is_tolerated():
    assert T.golden_reward(P4, P4 + " 1 + 2 + 4 + 10 = 17") == 1.0


def test_golden_alias_is_a_module_function_target():
    mod, fn = "openrlhf_irl.demo.task:golden_reward".split(":")
    f = getattr(importlib.import_module(mod), fn)
    assert f is T.golden_reward and T.golden is T.golden_reward
    assert T.golden_reward_batch([P4, P4], ["1 + 2 + 4 + 10 = 17", ""]) == [1.0, 0.0]


def test_expert_random_best_bands():
    rng = random.Random(0)
    prompts = T.make_prompts(200, rng)
    expert = [T.golden_reward(p, T.expert_response(p, rng)) for p in prompts]
    rand = [T.golden_reward(p, T.random_response(p, rng)) for p in prompts]
    e, r = statistics.mean(expert), statistics.mean(rand)
    assert 0.6 <= e <= 0.78, e  # good but clearly not the best (1.0)
    assert r < 0.15 and r < e - 0.45, (r, e)
    # the expert is not perfect on most prompts: room for extrapolation
    assert sum(x < 0.99 for x in expert) > 100
    # all demonstrations end with the closing "= T" (the stop point)
    for p in prompts[:50]:
        k, t = T.parse_prompt(p)
        assert T.expert_response(p, rng).endswith(f"= {t}")
    # noise orders the expert: less noise, better demonstrations
    means = []
    for noise in (0.0, 0.4, 0.8):
        g = random.Random(5)
        means.append(statistics.mean(T.golden_reward(p, T.expert_response(p, g, noise)) for p in prompts))
    assert means[0] > means[1] > means[2]


def test_every_term_orders_random_below_expert():
    rng = random.Random(2)
    prompts = T.make_prompts(300, rng)
    terms = ["sum", "len", "end", "distinct", "order"]
    ex = {k: [] for k in terms}
    ra = {k: [] for k in terms}
    for p in prompts:
        ce = T.reward_components(p, T.expert_response(p, rng))
        cr = T.reward_components(p, T.random_response(p, rng))
        for k in terms:
            ex[k].append(ce[k])
            ra[k].append(cr[k])
    for k in terms:
        assert statistics.mean(ra[k]) < statistics.mean(ex[k]) < 1.0 or k == "end", k
    assert statistics.mean(ex["end"]) == 1.0


def test_build_task_deterministic_by_seed():
    cfg = T.TaskConfig(seed=7, n_train_prompts=50, n_eval_prompts=20, n_pretrain=100)
    a, b = T.build_task(cfg), T.build_task(cfg)
    assert a["train_prompts"] == b["train_prompts"]
    assert a["eval_prompts"] == b["eval_prompts"]
    assert a["demonstrations"] == b["demonstrations"]
    assert len(a["train_prompts"]) == 50 and len(a["eval_prompts"]) == 20
    assert len(a["demonstrations"]) == 50
    assert all(set(d) == {"prompt", "response"} for d in a["demonstrations"])
    assert [d["prompt"] for d in a["demonstrations"]] == a["train_prompts"]
    c = T.build_task(T.TaskConfig(seed=8, n_train_prompts=50, n_eval_prompts=20))
    assert c["demonstrations"] != a["demonstrations"]
    two = T.build_task(T.TaskConfig(seed=7, n_train_prompts=10, demos_per_prompt=2))
    assert len(two["demonstrations"]) == 20
    # seeded helpers accept an int seed or a Random
    assert T.make_prompts(5, 3) == T.make_prompts(5, random.Random(3))
    assert T.expert_response(P4, 3) == T.expert_response(P4, random.Random(3))
    assert T.random_response(P4, 3) == T.random_response(P4, random.Random(3))


def test_pretrain_corpus_is_fluent_but_bad():
    cfg = T.TaskConfig(seed=1, n_pretrain=400)
    corpus = T.pretrain_corpus(cfg)
    assert corpus == T.pretrain_corpus(cfg) and len(corpus) == 400
    assert corpus != T.pretrain_corpus(T.TaskConfig(seed=2, n_pretrain=400))
    with_prompt = [line for line in corpus if line.startswith("add ")]
    assert len(with_prompt) >= 300
    scores = []
    for line in with_prompt:
        k, t = T.parse_prompt(line)
        prompt = T.format_prompt(k, t)
        assert line.startswith(prompt + " ")
        scores.append(T.golden_reward(prompt, line[len(prompt) + 1 :]))
    assert statistics.mean(scores) < 0.15
    # the vocabulary of the demonstrations is covered by the corpus
    vocab = {w for line in corpus for w in line.split()}
    demos = T.build_task(T.TaskConfig(seed=1, n_train_prompts=300))["demonstrations"]
    for d in demos:
        assert set(d["prompt"].split()) <= vocab
        assert set(d["response"].split()) <= vocab | {str(i) for i in range(T.MAX_TARGET + 3)}


# --------------------------------------------------------------------------- metrics


def test_distinct_n_hand_cases():
    texts = ["a b a", "a b c"]
    # unigrams: a b a a b c -> 6 total, {a, b, c} unique -> 3/6
    assert distinct_n(texts, 1) == 0.5
    # bigrams: (a b) (b a) | (a b) (b c) -> 4 total, 3 unique
    assert distinct_n(texts, 2) == 0.75
    # trigrams: (a b a) | (a b c) -> 2/2; n-grams never cross texts
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(texts, 4) == 0.0  # no 4-gram at all
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "  "], 1) == 0.0
    assert distinct_n(["x x x x"], 1) == 0.25


def test_self_bleu_hand_cases():
    # identical texts: every precision 1, BP 1
    assert self_bleu(["a b c d", "a b c d"]) == pytest.approx(1.0)
    # no shared unigram: p1 = 0 -> 0
    assert self_bleu(["a b", "c d"]) == 0.0
    # "a b c" vs "a b d" (and back): p1 = 2/3; p2 = (1 + 1) / (2 + 1) = 2/3; BP 1
    # -> sqrt(2/3 * 2/3) = 2/3 both ways
    assert self_bleu(["a b c", "a b d"], max_n=2) == pytest.approx(2 / 3)
    # brevity: "a b" vs "a b c d": p1 = 1, p2 = (1+1)/(1+1) = 1, BP = exp(1 - 4/2) = e^-1
    #          "a b c d" vs "a b": p1 = 2/4, p2 = (1+1)/(3+1) = 1/2 -> 1/2, BP 1 (c > r)
    assert self_bleu(["a b", "a b c d"], max_n=2) == pytest.approx((math.exp(-1) + 0.5) / 2)
    # clipping: "a a a a" vs "a b": clipped a = min(4, 1) = 1 -> p1 = 1/4, BP 1
    #           "a b" vs "a a a a": p1 = 1/2, BP = exp(1 - 4/2) -> 0.5/e
    assert self_bleu(["a a a a", "a b"], max_n=1) == pytest.approx((0.25 + 0.5 / math.e) / 2)
    # several references: counts are clipped by the best single reference, so
    # "a b" vs {"a c", "b c"} matches both words -> every text scores 1
    assert self_bleu(["a b", "a c", "b c"], max_n=1) == pytest.approx(1.0)
    # closest reference length, ties -> shorter: "a b c" vs {"a b", "a b c d"}: r = 2, BP 1,
    # p1 = 1 -> 1; "a b" vs {"a b c", "a b c d"}: r = 3, BP = e^(1-3/2), p1 = 1;
    # "a b c d" vs {"a b", "a b c"}: r = 3 < 4 -> BP 1, p1 = 3/4
    expected = (1.0 + math.exp(-0.5) + 0.75) / 3
    assert self_bleu(["a b c", "a b", "a b c d"], max_n=1) == pytest.approx(expected)
    # empty hypothesis scores 0; fewer than 2 texts -> 0
    assert self_bleu(["", "a b"], max_n=1) == pytest.approx((0.0 + 0.0) / 2)
    assert self_bleu(["a b c"]) == 0.0
    # diverse sets score lower than repetitive ones
    same = ["1 + 2 + 3 = 6"] * 5
    varied = ["1 + 5 = 6", "2 + 4 = 6", "6 = 6", "1 + 2 + 3 = 6", "3 + 3 = 6"]
    assert self_bleu(varied) < self_bleu(same)


def test_spearman_hand_case_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], ranks y = [1, 3, 2, 4] (means 2.5)
    # sxy = 2.25 + 0 + 0 + 2.25 = 4.5, sxx = 4.5, syy = 2.25 + .25 + .25 + 2.25 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert rankdata([1, 2, 2, 3]) == [1.0, 2.5, 2.5, 4.0]
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1])
