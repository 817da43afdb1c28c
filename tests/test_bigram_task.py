"""The `bigram` task (:mod:`openrlhf_irl.demo.bigram_task`): its dynamic programs against brute-force enumeration
on a small vocabulary, its exact sampler against those probabilities, its golden reward by hand, its expert's
level and habit, and its held-out prompts."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from openrlhf_irl.demo import bigram_task as task

SMALL = task.WORDS[:4]  # red sun cat sky
SHORT = (2, 3)
PROMPT = "after sky use sun and cat"


def _all_responses(vocab=SMALL, lengths=SHORT):
    for n in range(lengths[0], lengths[1] + 1):
        yield from itertools.product(vocab, repeat=n)


def test_sequence_probabilities_are_exp_score_over_beta_normalised():
    beta = 0.8
    brute = {y: math.exp(task.score("sky", ("sun", "cat"), y, SMALL) / beta) for y in _all_responses()}
    z = sum(brute.values())
    for y, unnorm in brute.items():
        got = task.sequence_log_prob(PROMPT, y, beta=beta, vocab=SMALL, lengths=SHORT)
        assert got == pytest.approx(math.log(unnorm / z), abs=1e-9)
    assert task.sequence_log_prob(PROMPT, ("red",), beta=beta, vocab=SMALL, lengths=SHORT) == -math.inf


def test_sampler_draws_the_same_distribution():
    beta = 0.8
    rng = random.Random(0)
    n = 20000
    counts = Counter(tuple(task.sample_words(PROMPT, rng, beta=beta, vocab=SMALL, lengths=SHORT)) for _ in range(n))
    assert set(counts) <= set(_all_responses())
    for y in _all_responses():
        p = math.exp(task.sequence_log_prob(PROMPT, y, beta=beta, vocab=SMALL, lengths=SHORT))
        assert abs(counts[y] / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-4, y


def test_habit_changes_the_sampler_not_the_reward():
    beta = 0.8
    base = sum(math.exp(task.sequence_log_prob(PROMPT, y, beta=beta, vocab=task.WORDS[:4] + ("oak",), lengths=SHORT))
               for y in _all_responses(task.WORDS[:4] + ("oak",)) if y[-1] == "oak")
    habit = sum(math.exp(task.sequence_log_prob(PROMPT, y, beta=beta, vocab=task.WORDS[:4] + ("oak",), lengths=SHORT,
                                                habit=True))
                for y in _all_responses(task.WORDS[:4] + ("oak",)) if y[-1] == "oak")
    assert habit > 2 * base  # ending on the habit word becomes much more likely
    rng = random.Random(1)
    prompts = [task.make_prompt(rng) for _ in range(200)]
    plain = [task.expert_response(p, random.Random(i)) for i, p in enumerate(prompts)]
    habitual = [task.expert_response(p, random.Random(i), habit=True) for i, p in enumerate(prompts)]
    ends = lambda rs: sum(r.split()[-2] == task.HABIT_WORD for r in rs)  # noqa: E731 - the word before "."
    assert ends(habitual) > ends(plain) + 40
    # the golden reward does not see the habit: the same text scores the same whoever wrote it
    assert task.golden_reward(prompts[0], habitual[0]) == task.golden_reward(prompts[0], habitual[0] + " ")


def test_best_and_mean_scores_against_enumeration():
    small_prompt = "after sky use sun and cat"
    scores = [task.score("sky", ("sun", "cat"), y, SMALL) for y in _all_responses()]
    assert task.best_score(small_prompt, SMALL, SHORT) == pytest.approx(max(scores))
    # uniform length, then uniform words: the mean over each length's responses, averaged over the lengths
    by_len = {n: [task.score("sky", ("sun", "cat"), y, SMALL) for y in itertools.product(SMALL, repeat=n)]
              for n in range(SHORT[0], SHORT[1] + 1)}
    expected = sum(sum(v) / len(v) for v in by_len.values()) / len(by_len)
    assert task.mean_score(small_prompt, SMALL, SHORT) == pytest.approx(expected)


def test_golden_reward_by_hand():
    p = "after sun use fox and ink"
    rng = random.Random(0)
    near_best = task.expert_response(p, rng, noise=0.02)  # beta -> 0: the best response
    assert task.golden_reward(p, near_best) > 0.99
    words = near_best.split()[:-1]
    quality = task.golden_reward(p, near_best)
    assert task.golden_reward(p, " ".join(words) + " . fox") == pytest.approx(0.75 * quality)  # did not stop
    assert task.golden_reward(p, " ".join(words)) == pytest.approx(0.5 * quality)  # no closing
    assert task.golden_reward(p, " ".join(words[:5]) + " .") <= 0.5  # too short: half at most
    r = task.score("sun", ("fox", "ink"), words)
    assert quality == pytest.approx(min(1.0, (r - task.mean_score(p)) / (task.best_score(p) - task.mean_score(p))))
    assert task.golden_reward("after sun use fox and fox", near_best) == 0.0  # not a prompt of the task
    assert task.golden_reward(p, "") == 0.0


def test_expert_level_and_random_answers():
    from helpers.task_levels import expert_and_careless

    expert, careless = expert_and_careless(task, 300, seed=3)
    assert 0.55 <= sum(expert) / len(expert) <= 0.67  # the "about 0.6"
    assert sum(careless) / len(careless) < 0.1


def test_held_out_prompts_and_the_corpus():
    cfg = task.TaskConfig(seed=5, n_train_prompts=300, n_eval_prompts=40, n_pretrain=200)
    built = task.build_task(cfg)
    held, train = built["held_out_prompts"], built["train_prompts"]
    assert len(held) == len(set(held)) == 40 and set(held).isdisjoint(train)
    assert all(task.parse_prompt(p) for p in held + train)
    corpus = task.pretrain_corpus(cfg, sep="\n")
    assert {line.split("\n")[0] for line in corpus if "\n" in line}.isdisjoint(held)
    demo_words = {w for d in built["demonstrations"] for w in d["response"].split()}
    assert demo_words <= set(task.WORDS) | {"."}


def test_hidden_reward_is_the_experts_score_by_hand():
    w = task.bigram_matrix()
    i = {v: k for k, v in enumerate(task.WORDS)}
    words = ["sun", "red", "cat"] + ["red"] * 7
    by_hand = w[i["sky"]][i["sun"]] + w[i["sun"]][i["red"]] + w[i["red"]][i["cat"]] + w[i["cat"]][i["red"]] \
        + 6 * w[i["red"]][i["red"]] + 2 * task.BONUS
    assert task.hidden_reward(PROMPT, " ".join(words) + ". trailing words ignored") == pytest.approx(by_hand)
    # unlike the golden reward: no clipping and no stop factor, so two unfinished responses still rank by score
    assert task.hidden_reward(PROMPT, "sun cat") == pytest.approx(w[i["sky"]][i["sun"]] + w[i["sun"]][i["cat"]]
                                                                  + 2 * task.BONUS)
    assert math.isnan(task.hidden_reward("not a prompt", "sun cat."))
