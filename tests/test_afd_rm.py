"""AfD classifier reward model (``--trainer afd_rm``): labelled dataset, BCE trainer, scorer; and the
Bradley-Terry route (``--trainer rm``) on AfD pairs."""

from __future__ import annotations

import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_ok, counting_records, run_python, sft_flags, write_jsonl
from openrlhf_irl import compat

compat.activate()

from openrlhf_irl.datasets.labeled_reward import LabeledRewardDataset  # noqa: E402
from openrlhf_irl.trainers.afd_rm import BCERewardLoss, classifier_logs, classifier_stats  # noqa: E402
from openrlhf_irl.utils.jsonl import DataError  # noqa: E402


def _strategy(**data):
    fields = dict(prompt_key="prompt", response_key="response", label_key="label", apply_chat_template=False,
                  tokenizer_chat_template=None)
    fields.update(data)
    return SimpleNamespace(args=SimpleNamespace(data=SimpleNamespace(**fields)), print=lambda *a: None)


def _dataset(records, tokenizer, max_len=64, input_template=None, **data):
    from datasets import Dataset

    return LabeledRewardDataset(Dataset.from_list(records), tokenizer, max_len, _strategy(**data),
                                input_template=input_template, num_processors=1)


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


# ------------------------------------------------------------------------------------------ dataset


def test_dataset_tokenises_like_reward_dataset_and_keeps_labels(tok):
    records = [{"prompt": "count from 7", "response": " 7 8 9 10\n", "label": 1},
               {"prompt": "count from 3", "response": " 12 5", "label": 0}]
    ds = _dataset(records, tok, input_template="User: {}\nAssistant:")
    assert len(ds) == 2 and ds.labels == [1, 0]
    assert ds.text(0) == "User: count from 7\nAssistant: 7 8 9 10 </s>"  # trailing newline stripped, " " + EOS
    ids, mask, label = ds[0]
    expected = tok("User: count from 7\nAssistant: 7 8 9 10 </s>", add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == expected and ids[0, -1] == tok.eos_token_id
    assert mask.all() and label == 1

    input_ids, attention_mask, labels = ds.collate_fn([ds[0], ds[1]])
    assert labels.tolist() == [1.0, 0.0] and labels.dtype == torch.float32
    short = len(ds[1][0][0])
    assert input_ids.shape == attention_mask.shape == (2, len(expected)) and short < len(expected)
    # left padding, as OpenRLHF's RewardDataset: the EOS of every row is the last column
    assert input_ids[1, : len(expected) - short].eq(tok.pad_token_id).all()
    assert attention_mask[1].tolist() == [0] * (len(expected) - short) + [1] * short
    assert input_ids[:, -1].eq(tok.eos_token_id).all()


def test_dataset_default_prompt_key_truncation_and_overlong_prompts(tok):
    records = [{"prompt": "count from 7", "response": " 7 8 9 10 11 12 13 14 15 16", "label": True},
               {"prompt": "count from 1 " * 20, "response": " 1", "label": False}]
    ds = _dataset(records, tok, max_len=12, prompt_key=None)  # None -> "prompt"
    assert len(ds) == 1 and ds.n_filtered == 1 and ds.labels == [1]
    ids, mask, _ = ds[0]
    assert ids.shape == (1, 12) and ids[0, -1] == tok.eos_token_id and mask.all()  # cut, EOS forced


def test_dataset_custom_keys(tok):
    ds = _dataset([{"q": "count from 2", "a": " 2 3", "y": 0}], tok, prompt_key="q", response_key="a", label_key="y")
    assert ds.text(0) == "count from 2 2 3 </s>" and ds.labels == [0]


@pytest.mark.parametrize("records,message", [
    ([{"prompt": "p", "response": "a", "label": 1}, {"prompt": "p", "response": "b", "label": 2}],
     r"record 1, field 'label': expected label 0 or 1, got 2"),
    ([{"prompt": "p", "response": "a", "label": 1}, {"prompt": "p", "response": "b", "label": 0},
      {"prompt": "p", "response": "c", "label": None}], r"record 2, field 'label': missing"),
    ([{"prompt": "p", "response": "a", "label": 1}, {"prompt": "p", "label": 0}],
     r"record 1, field 'response': missing"),
    ([{"prompt": "p", "response": "a"}], r"record 0, field 'label': missing"),
    ([{"prompt": "p", "response": "a", "label": 0.5}], r"record 0, field 'label': expected label 0 or 1, got 0.5"),
])
def test_dataset_rejects_bad_labels_and_missing_fields(tok, records, message):
    with pytest.raises(ValueError, match=message) as err:
        _dataset(records, tok)
    assert isinstance(err.value, DataError)


def test_dataset_applies_chat_template(tok):
    records = [{"prompt": [{"role": "user", "content": "count from 4"}],
                "response": [{"role": "assistant", "content": "4 5"}], "label": 1}]
    ds = _dataset(records, tok, apply_chat_template=True)
    assert ds.text(0) == "User: count from 4\nAssistant: 4 5</s>"  # already ends with EOS: nothing appended


# ------------------------------------------------------------------------------------------ loss


def test_bce_loss_matches_torch_and_hand_value():
    rewards = torch.tensor([2.0, -1.0, 0.5, -3.0], dtype=torch.bfloat16)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = BCERewardLoss()(rewards, labels)
    expected = F.binary_cross_entropy_with_logits(rewards.float(), labels)
    torch.testing.assert_close(loss, expected)
    r = rewards.float()
    by_hand = -(labels * torch.log(torch.sigmoid(r)) + (1 - labels) * torch.log(1 - torch.sigmoid(r))).mean()
    torch.testing.assert_close(loss, by_hand)
    assert loss.dtype == torch.float32


def test_bce_loss_gradient_is_sigmoid_minus_label():
    rewards = torch.tensor([0.3, -0.7, 1.2], requires_grad=True)
    labels = torch.tensor([1.0, 1.0, 0.0])
    BCERewardLoss()(rewards, labels).backward()
    torch.testing.assert_close(rewards.grad, (torch.sigmoid(rewards.detach()) - labels) / 3)


def test_classifier_stats_hand_case():
    stats = classifier_stats(torch.tensor([1.0, -2.0, 0.5, -0.5, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))
    assert stats == {"correct": 3, "count": 5, "pos_sum": -1.0, "pos_count": 2, "neg_sum": 0.0, "neg_count": 3}
    assert classifier_logs(stats) == {"acc": 0.6, "pos_reward": -0.5, "neg_reward": 0.0}
    only_pos = classifier_logs(classifier_stats(torch.tensor([1.0]), torch.tensor([1.0])))
    assert only_pos == {"acc": 1.0, "pos_reward": 1.0}  # no negatives: no negative mean


class _ToyRewardModel(torch.nn.Module):
    """OpenRLHF reward-model interface (``model(ids, attention_mask=, return_output=, ring_attn_group=)``)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(4, 1)
        torch.nn.init.zeros_(self.emb.weight)
        self.config = SimpleNamespace()

    def forward(self, input_ids, attention_mask=None, return_output=False, ring_attn_group=None):
        reward = (self.emb(input_ids).squeeze(-1) * attention_mask).sum(-1) / attention_mask.sum(-1)
        return (reward, {}) if return_output else reward


class _LocalStrategy:
    """The strategy calls the trainer makes, for one process."""

    accumulated_gradient = 2
    ring_attn_group = None

    def __init__(self):
        ns = SimpleNamespace
        self.args = ns(model=ns(aux_loss_coef=0, margin_loss_enable=False, compute_fp32_loss_enable=False),
                       ds=ns(packing_samples=False), logger=ns(wandb=ns(key=None), tensorboard_dir=None))
        self.steps = 0
        self.printed = []

    def backward(self, loss, model, optimizer):
        (loss / self.accumulated_gradient).backward()

    def optimizer_step(self, optimizer, model, scheduler):
        self.steps += 1
        if self.steps % self.accumulated_gradient == 0:
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()

    def get_grad_norm(self, model):
        return 0.0

    def all_reduce(self, data, op="mean"):
        return data

    def all_gather(self, data):
        return data

    def print(self, *msg):
        self.printed.append(" ".join(map(str, msg)))

    def is_rank_0(self):
        return True

    def _unwrap_model(self, model):
        return model


def _toy_batches(n=16):
    """Token 1 = positive, token 2 = negative, left-padded with 0 like the dataset's collate_fn."""
    items = []
    for i in range(n):
        label = i % 2
        length = 2 + i % 3
        items.append((torch.tensor([[0] * (4 - length) + [1 if label else 2] * length]),
                      torch.tensor([[0] * (4 - length) + [1] * length]), label))

    def collate(batch):
        return (torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch]),
                torch.tensor([float(b[2]) for b in batch]))

    return torch.utils.data.DataLoader(items, batch_size=4, shuffle=False, collate_fn=collate)


def test_trainer_fit_and_evaluate_with_a_local_strategy():
    from openrlhf_irl.trainers.afd_rm import AfDRewardTrainer

    model, strategy = _ToyRewardModel(), _LocalStrategy()
    optim = torch.optim.SGD(model.parameters(), lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0)
    loader = _toy_batches()
    trainer = AfDRewardTrainer(model=model, strategy=strategy, optim=optim, tokenizer=None, train_dataloader=loader,
                               eval_dataloader=loader, scheduler=scheduler, max_norm=1.0, max_epochs=3)
    evaluations = []
    evaluate = trainer.evaluate
    trainer.evaluate = lambda dl, steps=0: evaluations.append((steps, evaluate(dl, steps)))
    args = SimpleNamespace(eval=SimpleNamespace(steps=-1), ckpt=SimpleNamespace(save_steps=-1),
                           train=SimpleNamespace(batch_size=8), logger=SimpleNamespace(logging_steps=1))
    trainer.fit(args, 0, num_update_steps_per_epoch=2)

    assert [steps for steps, _ in evaluations] == [2, 4, 6]  # once per epoch, as OpenRLHF
    logs = evaluations[-1][1]
    assert logs["acc_mean"] == 1.0 and logs["pos_reward"] > 0 > logs["neg_reward"]
    assert logs["eval_loss"] < evaluations[0][1]["eval_loss"] < math.log(2)
    # mean/std of the eval rewards go to the config, which train_rm saves with the model
    with torch.no_grad():
        rewards = torch.cat([model(ids, attention_mask=mask) for ids, mask, _ in loader])
    assert model.config.mean == pytest.approx(rewards.mean().item(), abs=1e-6)
    assert model.config.std == pytest.approx(rewards.std().item(), abs=1e-6)
    assert any("AfD binary cross-entropy" in line for line in strategy.printed)


def test_trainer_refuses_margin_loss():
    from openrlhf_irl.trainers.afd_rm import AfDRewardTrainer

    strategy = _LocalStrategy()
    strategy.args.model.margin_loss_enable = True
    model = _ToyRewardModel()
    optim = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="margin"):
        AfDRewardTrainer(model=model, strategy=strategy, optim=optim, tokenizer=None, train_dataloader=None,
                         eval_dataloader=None, scheduler=None)


# ------------------------------------------------------------------------------------------ end to end


def _rm_flags(model, data, out, *extra):
    """``sft_flags`` for OpenRLHF's train_rm: prompt key instead of input/output keys, the data as eval set."""
    flags = sft_flags(model, data, out, *extra)
    for key in ("--data.input_key", "--data.output_key"):
        i = flags.index(key)
        del flags[i : i + 2]
    return [*flags, "--data.prompt_key", "prompt", "--eval.dataset", data]


def _load_rm(path):
    from openrlhf.models import get_llm_for_sequence_regression

    return get_llm_for_sequence_regression(path, "reward", param_dtype="bf16", attn_implementation="eager").eval()


def _labelled_records():
    """Positives: counting responses; negatives: four random three-digit numbers on the same prompts (the tiny
    model is randomly initialised: with numbers in 1..99 it needs about 8 epochs to separate the classes)."""
    rng = random.Random(5)
    records = []
    for r in counting_records(48, 4):
        records.append({"prompt": r["prompt"], "response": r["response"], "label": 1})
        bad = " ".join(str(rng.randint(100, 999)) for _ in range(4))
        records.append({"prompt": r["prompt"], "response": bad, "label": 0})
    return records


@pytest.mark.slow
def test_afd_rm_trains_a_classifier_openrlhf_loads(tiny_model, tmp_path):
    from openrlhf_irl.models import RewardScorer

    records = _labelled_records()
    data = str(write_jsonl(tmp_path / "labels.jsonl", records))
    out = str(tmp_path / "afd_rm")
    proc = run_python(["-m", "openrlhf_irl.cli.train_rm", "--trainer", "afd_rm", *_rm_flags(tiny_model, data, out)])
    assert_ok(proc)
    assert "AfD binary cross-entropy loss" in proc.stdout

    config = json.load(open(os.path.join(out, "config.json")))
    assert config["value_head_prefix"] == "score" and config["std"] > 0 and "mean" in config

    from transformers import AutoTokenizer

    rm, tok = _load_rm(out), AutoTokenizer.from_pretrained(out)
    texts = [r["prompt"] + r["response"] + " " + tok.eos_token for r in records]
    direct = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", add_special_tokens=False)
            direct.append(float(rm(ids["input_ids"], attention_mask=ids["attention_mask"])))
    accuracy = sum((d > 0) == (r["label"] == 1) for d, r in zip(direct, records)) / len(records)
    assert accuracy >= 0.85, accuracy
    # the eval-set statistics OpenRLHF stores for normalisation are those of these very rewards
    assert abs(config["mean"] - sum(direct) / len(direct)) < 0.1

    scorer = RewardScorer(out, batch_size=8)
    scores = scorer.score([r["prompt"] for r in records], [r["response"] for r in records])
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(direct), rtol=0.02, atol=0.05)
    # one unpadded sequence in the dtype of the direct call (bf16; "auto" is fp32 on a CPU without native bf16):
    # exactly the direct call's reward
    one = RewardScorer(out, batch_size=1, param_dtype="bf16")
    assert one.score([records[0]["prompt"]], [records[0]["response"]]) == [direct[0]]


@pytest.mark.slow
def test_bradley_terry_route_on_afd_pairs(tiny_model, tmp_path):
    from openrlhf_irl.datasets.afd import build_afd_dataset
    from openrlhf_irl.models import RewardScorer

    rng = random.Random(7)
    init, sft = [], []
    for i, r in enumerate(counting_records(32, 6)):
        common = {"prompt": r["prompt"], "sample_index": 0, "finished": True, "logprob": -1.0}
        sft.append({**common, "response": r["response"], "policy": "sft"})
        init.append({**common, "response": " ".join(str(rng.randint(1, 99)) for _ in range(4)), "policy": "init"})
    pairs, report = build_afd_dataset(
        "init-sft", init_samples=str(write_jsonl(tmp_path / "init.jsonl", init)),
        sft_samples=str(write_jsonl(tmp_path / "sft.jsonl", sft)), fmt="pairs",
    )
    assert report["records"] == len(pairs) > 0
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pairs))
    out = str(tmp_path / "bt_rm")
    proc = run_python(["-m", "openrlhf_irl.cli.train_rm", "--trainer", "rm",
                       *_rm_flags(tiny_model, data, out, "--train.max_epochs", "1")])
    assert_ok(proc)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["value_head_prefix"] == "score" and "mean" in config
    scorer = RewardScorer(out)
    chosen = scorer.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(pairs) >= 0.6


def test_empty_dataset_says_what_to_do(tok):
    with pytest.raises(DataError, match="pass --eval.dataset"):
        _dataset([], tok)


def test_train_rm_with_too_few_records_and_no_eval_dataset_stops_up_front(tmp_path):
    data = str(write_jsonl(tmp_path / "labels.jsonl", _labelled_records()[:60]))
    flags = [f for f in _rm_flags("unused-model", data, str(tmp_path / "o"))]
    i = flags.index("--eval.dataset")
    del flags[i : i + 2]
    proc = run_python(["-m", "openrlhf_irl.cli.train_rm", "--trainer", "afd_rm", *flags], timeout=120)
    assert proc.returncode == 2
    assert "labels.jsonl: 60 records" in proc.stderr and "pass --eval.dataset" in proc.stderr
    assert "Traceback" not in proc.stderr
