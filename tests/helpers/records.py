"""Small data sets the tests train and score on, and an independent NLL check of a saved model."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path


def counting_records(n: int = 48, seed: int = 0) -> list[dict]:
    """Prompt "count from a" -> "a a+1 a+2 a+3": a pattern a tiny model learns in a few dozen steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randint(1, 60)
        out.append({"prompt": f"count from {a}", "response": " ".join(str(a + j) for j in range(4))})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def corpus_prompts(n: int = 4) -> list[str]:
    """The first four words of the first ``n`` texts of the tiny model's corpus (the PPO and multi-node prompts)."""
    from openrlhf_irl.utils.tiny_model import sample_corpus

    return [" ".join(t.split()[:4]) for t in sample_corpus(seed=0)[:n]]


def mean_response_nll(model_dir: str, records: list[dict]) -> float:
    """Mean NLL of the responses under a saved model, with the prompt format OpenRLHF's SFT dataset uses
    (default input template, " </s>" appended): an independent check that training helped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if os.path.exists(os.path.join(model_dir, "adapter_config.json")):  # a LoRA checkpoint: adapter + base model
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).merge_and_unload().eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            prompt = f"User: {r['prompt']}\nAssistant: "
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(prompt + r["response"] + " " + tok.eos_token, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
            targets = x[0, 1:]
            start = len(p_ids) - 1
            nll = -logp[torch.arange(len(targets)), targets][start:]
            total += float(nll.sum())
            count += len(nll)
    return total / count


def saved_dtypes(model_dir: str | os.PathLike) -> set:
    """The dtypes of the tensors in ``model_dir/model.safetensors`` (a saved HF model)."""
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as h:
        return {h.get_tensor(k).dtype for k in h.keys()}
