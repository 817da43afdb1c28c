"""The log-ratio reward function OpenRLHF's PPO loads from --reward.remote_url."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from openrlhf_irl.afd import ppo_reward_func
from openrlhf_irl.afd.ppo_reward_func import split_response


def test_split_response():
    assert split_response("User: hi\nAssistant: 1 2</s>", "User: hi\nAssistant: ", "</s>") == ("1 2", True)
    assert split_response("P: 1 2", "P: ", "</s>") == ("1 2", False)


def test_reward_func_loaded_like_openrlhf_loads_it_matches_log_ratio(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(other)
    monkeypatch.setenv("AFD_SFT_MODEL", str(other))
    monkeypatch.setenv("AFD_INIT_MODEL", tiny_model)
    ppo_reward_func._scorer.cache_clear()

    # OpenRLHF's SingleTurnAgentExecutor: spec_from_file_location on the .py path, then module.reward_func
    spec = importlib.util.spec_from_file_location("reward_func", ppo_reward_func.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prompts = ["User: count from 3\nAssistant: ", "User: count from 8\nAssistant: "]
    queries = [prompts[0] + "3 4 5</s>", prompts[1] + "8 9"]
    out = module.reward_func(queries, prompts, [None, None])
    assert out["rewards"].shape == (2,) and torch.equal(out["rewards"], out["scores"])

    tok = AutoTokenizer.from_pretrained(tiny_model)
    sft = AutoModelForCausalLM.from_pretrained(other).eval()
    init = AutoModelForCausalLM.from_pretrained(tiny_model).eval()

    def logp(m, prompt, response_ids):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + response_ids])
        with torch.no_grad():
            lp = torch.log_softmax(m(ids).logits[0, :-1].float(), -1)
        return float(sum(lp[len(p_ids) - 1 + i, t] for i, t in enumerate(response_ids)))

    expected = []
    for prompt, resp, eos in ((prompts[0], "3 4 5", True), (prompts[1], "8 9", False)):
        ids = tok(resp, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
        expected.append(logp(sft, prompt, ids) - logp(init, prompt, ids))
    assert out["rewards"].tolist() == pytest.approx(expected, abs=1e-4)
    ppo_reward_func._scorer.cache_clear()


def test_reward_func_needs_both_model_paths(monkeypatch):
    monkeypatch.delenv("AFD_SFT_MODEL", raising=False)
    ppo_reward_func._scorer.cache_clear()
    with pytest.raises(RuntimeError, match="AFD_SFT_MODEL"):
        ppo_reward_func.reward_func(["x"], ["x"], [None])
