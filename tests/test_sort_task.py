"""The `sort` task (:mod:`openrlhf_irl.demo.sort_task`): its golden reward by hand, its expert's level, its held-out
prompts and its character-level tokenizer."""

from __future__ import annotations

import random

import pytest

from openrlhf_irl.demo import sort_task as task


def test_levenshtein_by_hand():
    assert task.levenshtein("abc", "abc") == 0
    assert task.levenshtein("acb", "abc") == 2  # a swap is two edits
    assert task.levenshtein("ab", "abc") == 1 and task.levenshtein("abbc", "abc") == 1
    assert task.levenshtein("", "abc") == 3 and task.levenshtein("xyz", "abc") == 3


def test_golden_reward_by_hand():
    p = "sort: cbdacfbc"  # distinct symbols a b c d f
    assert task.target_answer(p) == "abcdf"
    assert task.golden_reward(p, "abcdf.") == 1.0
    assert task.golden_reward(p, " abcdf. \n") == 1.0  # surrounding whitespace is not content
    assert task.golden_reward(p, "abdf.") == pytest.approx(1 - 1 / 5)  # a drop
    assert task.golden_reward(p, "abdcf.") == pytest.approx(1 - 2 / 5)  # a swap
    assert task.golden_reward(p, "abccdf.") == pytest.approx(1 - 1 / 6)  # a duplicate: over the longer length
    assert task.golden_reward(p, "abcdf.ab") == pytest.approx(0.75)  # did not stop
    assert task.golden_reward(p, "abcdf") == pytest.approx(0.5)  # no closing
    assert task.golden_reward(p, "") == 0.0
    assert task.golden_reward("sort: abc", "abc.") == 0.0  # too short to be a prompt of the task
    assert task.golden_reward("sort: abcdefgxyz", "abc.") == 0.0  # a symbol outside the alphabet


def test_expert_is_good_not_best_and_random_answers_are_bad():
    from helpers.task_levels import expert_and_careless

    expert, careless = expert_and_careless(task, 2000, seed=0)
    rng = random.Random(0)
    prompts = [task.make_prompt(rng) for _ in range(50)]
    assert 0.65 <= sum(expert) / len(expert) <= 0.75  # the "about 0.7"
    assert 0.03 <= sum(v == 1.0 for v in expert) / len(expert) <= 0.2  # (1 - 0.32) ** ~7 positions: a few perfect
    assert sum(careless) / len(careless) < 0.3
    assert all(task.expert_response(p, 1, noise=0.0) == task.target_answer(p) + "." for p in prompts)


def test_held_out_prompts_are_distinct_fresh_draws_of_the_training_distribution():
    cfg = task.TaskConfig(seed=3, n_train_prompts=500, n_eval_prompts=64, n_pretrain=300)
    built = task.build_task(cfg)
    held, train = built["held_out_prompts"], built["train_prompts"]
    assert len(held) == len(set(held)) == 64 and set(held).isdisjoint(train)
    corpus_prompts = {line.split("\n")[0] for line in task.pretrain_corpus(cfg, sep="\n") if line.startswith("sort: ")}
    assert corpus_prompts and corpus_prompts.isdisjoint(held)
    for p in held + train:
        assert task.parse_prompt(p) is not None
    assert [d["prompt"] for d in built["demonstrations"]] == train
    assert task.build_task(cfg)["held_out_prompts"] == held  # deterministic in the seed
    assert task.build_task(task.TaskConfig(seed=4, n_train_prompts=500, n_eval_prompts=64))["held_out_prompts"] != held


def test_tokenizer_of_the_task_is_character_level():
    from openrlhf_irl.utils.tiny_model import train_tokenizer

    cfg = task.TaskConfig(seed=0, n_train_prompts=50, n_eval_prompts=8, n_pretrain=400)
    tok = train_tokenizer(task.pretrain_corpus(cfg, sep="\n"), task.VOCAB_SIZE)
    text = "sort: cbdacfbc\nabcdf."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_sizing_validates_on_prompts_that_are_neither_training_nor_held_out():
    from openrlhf_irl.demo.sizing import validation_prompts

    built = task.build_task(task.TaskConfig(seed=2, n_train_prompts=200, n_eval_prompts=32))
    used = set(built["train_prompts"]) | set(built["held_out_prompts"])
    val = validation_prompts(task, used, 50, seed=2)
    assert len(set(val)) == 50 and used.isdisjoint(val) and all(task.parse_prompt(p) for p in val)
    assert validation_prompts(task, used, 50, seed=2) == val and validation_prompts(task, used, 50, seed=3) != val
