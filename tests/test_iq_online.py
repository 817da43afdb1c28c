"""Online IQ-Learn term (issue 12, points 1-3): hand-computed values, the trainer's loss and gradient against a
per-token loop, gamma = 1 cancellation, refusal of content-free configurations, and gradient accumulation."""

from __future__ import annotations

import pytest
import torch

from helpers import counting_records
from helpers.iq_batches import FixedSampler, bare_trainer, grads, model_logits, sft_batch
from helpers.iq_reference import offline_loss, online_term
from openrlhf_irl import compat

compat.activate()

from openrlhf.utils.loss_utils import iter_grad_accum_global_norm  # noqa: E402

from openrlhf_irl.losses.iq_learn import IQTokenTerms, iq_online_term  # noqa: E402
from openrlhf_irl.losses.iq_sft import IQConfig, check_online_config  # noqa: E402


# ------------------------------------------------------------------------------------------------------------------
def _terms(values, next_values, rewards, td):
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return IQTokenTerms(torch.zeros_like(t(values)), t(rewards), torch.tensor(td), t(next_values), t(values))


def test_online_term_hand_computed():
    # expert: one row of two tokens (the second terminal); policy: two rows, the second cut with its last TD dropped
    expert = _terms([[2.0, 1.0]], [[1.0, 0.0]], [[0.5, -1.0]], [[True, True]])
    emask = torch.tensor([[True, True]])
    policy = _terms([[3.0, 0.0], [1.5, 0.5]], [[0.0, 0.0], [0.5, 0.0]], [[2.0, 0.0], [0.3, 0.0]],
                    [[True, False], [True, False]])
    pmask = torch.tensor([[True, False], [True, True]])
    kw = dict(alpha=0.25, td_weight=0.5, gamma=0.9)
    # g_E = (2 - 0.9*1 + 0.5*0.25) + (1 - 0 + 0.5*1) = 2.725; g_P = (3 + 0.5*4) + (1.5 - 0.45 + 0.5*0.09) = 6.095
    # loss = alpha * (B_E/B_P * g_P - g_E) / N_E = 0.25 * (6.095/2 - 2.725) / 2
    loss, _ = iq_online_term(expert, emask, policy, pmask, **kw)
    assert float(loss) == pytest.approx(0.25 * (6.095 / 2 - 2.725) / 2, abs=1e-6)
    # OpenRLHF's normalisers: batch_num_tokens (global tokens / accumulation steps) and dp_size, as aggregate_loss
    loss, _ = iq_online_term(expert, emask, policy, pmask, token_normaliser=torch.tensor(5.0), dp_size=2, **kw)
    assert float(loss) == pytest.approx(0.25 * (6.095 / 2 - 2.725) * 2 / 5, abs=1e-6)
    # chi^2 on expert states only: g_E = 1.1 + 1 = 2.1, g_P = 3 + 1.05 = 4.05
    loss, _ = iq_online_term(expert, emask, policy, pmask, chi2_on_policy=False, **kw)
    assert float(loss) == pytest.approx(0.25 * (4.05 / 2 - 2.1) / 2, abs=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_online_loss_and_gradient_match_a_loop_reference(actor_and_tok, gamma):
    """Expert batch with a cut row, policy samples with EOS-ended and cut ones, chi^2 over the mixture, bootstrap."""
    actor, tok = actor_and_tok
    inputs, attn, loss_mask = sft_batch(tok, counting_records(3, seed=11), truncate_last_to=12)
    mask = loss_mask[:, :-1].bool()
    sampler = FixedSampler(tok, n=2)
    cfg = dict(td_weight=0.7, gamma=gamma, online_mix=0.3, mle_weight=1.0)
    trainer = bare_trainer(actor, tok, sampler=sampler, **cfg)

    actor.zero_grad()
    got = trainer.loss_fn(trainer.policy_forward(inputs, attention_mask=attn), mask)
    got.backward()
    got_grads = grads(actor)
    samples = trainer._online_samples[0]
    assert sampler.refreshes == 1

    actor.zero_grad()
    eos = tok.eos_token_id
    pids, pattn, pmask = samples["sequences"], samples["attention_mask"], samples["loss_mask"]
    expert = (model_logits(actor, inputs, attn), inputs, attn, mask)
    policy = (model_logits(actor, pids, pattn), pids, pattn, pmask)
    offline = offline_loss(*expert, eos, td_weight=0.7, gamma=gamma)
    online = online_term(expert, policy, eos, alpha=0.3, td_weight=0.7, gamma=gamma)
    ref = offline + online
    ref.backward()
    ref_grads = grads(actor)

    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # the online term matters here: deleting it or flipping its sign would miss the reference
    assert abs(float(online)) > 1e-3
    assert abs(float(got) - float(offline - online)) > 1e-3
    # cut policy samples bootstrap, EOS-ended ones are terminal
    assert (pids[:, 1:][pmask] == eos).sum() == pids.shape[0] // 2


def test_gamma_one_value_part_cancels_for_complete_samples(actor_and_tok):
    """With gamma = 1 and every sample ended, the value parts of expert and policy telescope to the same V(s_0):
    without the chi^2 term the online term is exactly 0 (why such a configuration is refused)."""
    actor, tok = actor_and_tok
    inputs, attn, loss_mask = sft_batch(tok, counting_records(3, seed=2))
    mask = loss_mask[:, :-1].bool()
    with torch.no_grad():
        off = bare_trainer(actor, tok, td_weight=0.5).loss_fn(
            bare_trainer(actor, tok, td_weight=0.5).policy_forward(inputs, attn), mask)
        on = bare_trainer(actor, tok, sampler=FixedSampler(tok, n=3, all_finished=True), td_weight=0.5,
                          online_mix=0.5, chi2_on_policy=False)
        value_only = on.loss_fn(on.policy_forward(inputs, attn), mask)
        stats = on.iq_loss.pop_stats()
        on_chi2 = bare_trainer(actor, tok, sampler=FixedSampler(tok, n=3, all_finished=True), td_weight=0.5,
                               online_mix=0.5)
        with_chi2 = on_chi2.loss_fn(on_chi2.policy_forward(inputs, attn), mask)
    assert abs(stats["online_term"]) < 1e-5 and float(value_only) == pytest.approx(float(off), abs=1e-5)
    assert abs(float(with_chi2) - float(off)) > 1e-3


def test_online_term_without_chi2_on_policy_states_has_no_lower_bound():
    """Why gamma < 1 needs the chi^2 term on policy states: lowering V at a state only a policy sample visits (its
    V(s_1), and the matching V(s') of the step before) lowers the term by alpha (1 - gamma) per unit without end;
    with chi^2 on policy states r = Q - gamma V(s') grows instead and the term rises again."""
    expert = _terms([[2.0, 1.0]], [[1.0, 0.0]], [[0.5, -1.0]], [[True, True]])
    emask = torch.tensor([[True, True]])

    def loss(c, chi2, td_weight=0.5):
        # one policy sample of two tokens from the expert's prompt (same V(s_0) = 2), then terminal
        policy = _terms([[2.0, 1.0 - c]], [[1.0 - c, 0.0]], [[0.5 + 0.9 * c, 0.3]], [[True, True]])
        out, _ = iq_online_term(expert, emask, policy, torch.tensor([[True, True]]), alpha=0.25,
                                td_weight=td_weight, gamma=0.9, chi2_on_policy=chi2)
        return float(out)

    for chi2, td_weight in ((False, 0.5), (True, 0.0)):
        drops = [loss(0.0, chi2, td_weight) - loss(c, chi2, td_weight) for c in (10.0, 100.0, 1000.0)]
        # alpha (1 - gamma) c / N_E = 0.25 * 0.1 * c / 2 per unit of c
        assert drops == pytest.approx([0.0125 * c for c in (10.0, 100.0, 1000.0)], rel=1e-4)
    assert loss(1000.0, True) > loss(10.0, True) > loss(0.0, True) - 1.0  # bounded: the chi^2 term wins


def test_content_free_online_configurations_are_refused():
    check_online_config(IQConfig(online_mix=0.1, gamma=1.0, td_weight=0.1))  # chi^2 on the mixture: fine
    check_online_config(IQConfig(online_mix=0.1, gamma=0.9, td_weight=0.1))  # gamma < 1 with it: fine
    check_online_config(IQConfig(online_mix=0.0, gamma=1.0, td_weight=0.0))  # offline: nothing to check
    with pytest.raises(ValueError, match="no lower bound.*--no-irl.chi2_on_policy"):
        check_online_config(IQConfig(online_mix=0.1, gamma=0.9, td_weight=0.1, chi2_on_policy=False))
    with pytest.raises(ValueError, match="no lower bound.*td_weight is 0"):
        check_online_config(IQConfig(online_mix=0.1, gamma=0.9, td_weight=0.0))
    with pytest.raises(ValueError, match="telescopes"):
        check_online_config(IQConfig(online_mix=0.1, gamma=1.0, td_weight=0.1, chi2_on_policy=False))
    with pytest.raises(ValueError, match="td_weight is 0"):
        check_online_config(IQConfig(online_mix=0.1, gamma=1.0, td_weight=0.0))
    with pytest.raises(ValueError, match="multiturn"):
        check_online_config(IQConfig(online_mix=0.1), multiturn=True)


class _Strategy:
    """What ``iter_grad_accum_global_norm`` reads of a strategy in one process (no process group)."""

    ds_device_mesh = None


@pytest.mark.parametrize("online", [False, True])
def test_one_step_of_four_micro_batches_equals_one_micro_batch(actor_and_tok, online):
    """OpenRLHF's per-step normalisers + DeepSpeed's 1/gas scaling: 4 micro-batches of 2 rows (uneven lengths, one
    cut row) give the gradient of 1 micro-batch of the same 8 rows, offline and with the online term."""
    actor, tok = actor_and_tok
    records = counting_records(8, seed=21)
    records[3]["response"] = "1 2 3 4 5 6 7 8 9 10 11"
    cfg = dict(td_weight=0.4, gamma=0.95, online_mix=0.2 if online else 0.0)

    def run(batches):
        trainer = bare_trainer(actor, tok, sampler=FixedSampler(tok, n=2), **cfg)
        gas = len(batches)
        actor.zero_grad()
        total = 0.0
        for (inputs, attn, lmask), info in iter_grad_accum_global_norm(batches, _Strategy(), gas,
                                                                       lambda b: b[2][:, :-1]):
            loss = trainer.loss_fn(trainer.policy_forward(inputs, attention_mask=attn), lmask[:, :-1], **info)
            (loss / gas).backward()  # DeepSpeed scales each micro-batch's loss by 1 / gas
            total += float(loss) / gas
        return total, grads(actor)

    whole = [sft_batch(tok, records, truncate_last_to=None)]
    parts = [sft_batch(tok, records[i : i + 2]) for i in range(0, 8, 2)]
    loss1, g1 = run(whole)
    loss4, g4 = run(parts)
    assert loss4 == pytest.approx(loss1, rel=1e-5, abs=1e-6)
    for a, b in zip(g4, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if online:  # and the term is really there
        assert abs(loss1 - run_offline(actor, tok, records, cfg)) > 1e-4


def run_offline(actor, tok, records, cfg):
    trainer = bare_trainer(actor, tok, **{**cfg, "online_mix": 0.0})
    inputs, attn, lmask = sft_batch(tok, records)
    with torch.no_grad():
        return float(trainer.loss_fn(trainer.policy_forward(inputs, attention_mask=attn), lmask[:, :-1]))
