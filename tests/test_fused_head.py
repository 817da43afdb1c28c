"""Output heads that are not plain ``hidden @ W.T`` (issue 12, point 5): Gemma-2/3 soft-cap, Cohere logit scale,
Granite logits scaling, tied embeddings. On tiny models built from each architecture's config, the fused losses
(single pass and two pass) equal the plain loss on the model's own logits, values and gradients of every parameter;
heads the fused loss cannot reproduce are refused with a message naming the field."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    LlamaConfig,
    PhiConfig,
)

from helpers.loss_api import iq_learn_loss
from openrlhf_irl.losses import HeadTransform, IQTermWeights, linear_iq_objective
from openrlhf_irl.losses.fused_head import FusedHead, UnsupportedHead
from openrlhf_irl.losses.fused_linear_qv import masked_linear_q_and_v
from openrlhf_irl.losses.iq_learn import iq_per_token_loss

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "gemma2_softcap_tied": lambda: Gemma2Config(head_dim=32, final_logit_softcapping=3.0, **COMMON),
    "gemma3_softcap_tied": lambda: Gemma3TextConfig(head_dim=32, final_logit_softcapping=3.0, **COMMON),
    "cohere_logit_scale_tied": lambda: CohereConfig(logit_scale=0.25, **COMMON),
    "granite_logits_scaling": lambda: GraniteConfig(logits_scaling=4.0, **COMMON),
}


def tiny(arch: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation="eager").float()
    with torch.no_grad():  # logits of several units, so that a soft-cap of 3 bends them
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 12), generator=gen)
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    ids[0, 8] = 2  # EOS
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, 3:8] = True  # ends with EOS
    mask[1, 2:8] = True  # ends before padding without EOS
    mask[2, 4:11] = True  # runs to the last column
    labels = ids[:, 1:]
    return ids, attn, labels, mask, mask & (labels == 2)


def grads(model):
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_losses_equal_plain_loss_on_the_models_own_logits(arch):
    model = tiny(arch)
    head = FusedHead(model)
    assert not head.transform.identity
    ids, attn, labels, mask, term = batch()

    out = model(ids, attention_mask=attn)
    ref, _ = iq_learn_loss(out.logits[:, :-1].float(), labels, mask, term, td_weight=0.5, gamma=0.9)
    ref.backward()
    ref_grads = grads(model)

    w = mask.float() / mask.sum()
    weights = IQTermWeights(log_probs=-w, rewards_sq=0.5 * w)
    out = model(ids, attention_mask=attn, output_hidden_states=True, logits_to_keep=1)
    head.check(out.hidden_states[-1][:, -1], out.logits[:, -1])
    hidden = out.hidden_states[-1][:, :-1]
    fused = head.run(lambda weight, h: linear_iq_objective(h, weight, labels, mask, term, weights, gamma=0.9,
                                                           head=head.transform, chunk_size=5).loss, hidden)
    fused.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads(model), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)

    # the two-pass reference op with the same transform
    out = model(ids, attention_mask=attn, output_hidden_states=True, logits_to_keep=1)
    q, v = head.run(lambda weight, h: masked_linear_q_and_v(h, weight, labels, mask, 4, head=head.transform),
                    out.hidden_states[-1][:, :-1])
    per_token, _ = iq_per_token_loss(q, v, mask, term, td_weight=0.5, gamma=0.9)
    two_pass = per_token.sum() / mask.sum()
    two_pass.backward()
    torch.testing.assert_close(two_pass, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads(model), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)

    # what the fused loss computed before: logits = hidden @ W.T, a different loss
    with torch.no_grad():
        out = model(ids, attention_mask=attn, output_hidden_states=True)
        plain_head = linear_iq_objective(out.hidden_states[-1][:, :-1], model.get_output_embeddings().weight, labels,
                                         mask, term, weights, gamma=0.9, head=HeadTransform()).loss
    assert abs(float(plain_head) - float(ref)) > 1e-2


def test_heads_the_fused_loss_cannot_reproduce_are_refused():
    with pytest.raises(UnsupportedHead, match=r"lm_head\.bias") as refused:
        FusedHead(AutoModelForCausalLM.from_config(PhiConfig(**COMMON)))
    assert "--" not in str(refused.value)  # the loss layer names no flag; the trainer does
    from openrlhf_irl import compat

    compat.activate()  # the CPU layer, before OpenRLHF's trainer modules import flash-attn
    from openrlhf_irl.trainers.iq_learn import checked_fused_head

    phi = AutoModelForCausalLM.from_config(PhiConfig(**COMMON))
    with pytest.raises(ValueError, match=r"^--irl\.fused_loss: .*lm_head\.bias.*train without --irl\.fused_loss"):
        checked_fused_head(phi, torch.zeros(1, 64), torch.zeros(1, VOCAB))
    for field, value in (("final_logit_softcapping", 5.0), ("logits_scaling", 2.0), ("logit_scale", 0.5)):
        config = LlamaConfig(**COMMON)
        setattr(config, field, value)  # a field we know, on an architecture whose forward we did not check
        with pytest.raises(ValueError, match=rf"{field}={value}.*'llama'"):
            FusedHead(AutoModelForCausalLM.from_config(config))
    config = LlamaConfig(**COMMON)
    config.logits_scaling = 1.0  # the identity is fine
    assert FusedHead(AutoModelForCausalLM.from_config(config)).transform.identity


def test_check_catches_an_unannounced_transform():
    model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON))
    ids = torch.randint(3, VOCAB, (2, 7))
    out = model(ids, output_hidden_states=True, logits_to_keep=1)
    last = out.hidden_states[-1][:, -1]
    head = FusedHead(model)
    with pytest.raises(ValueError, match="max abs diff"):
        head.check(last, out.logits[:, -1] * 1.5 + 0.1)  # e.g. a hidden-state multiplier in a custom forward
    head.check(last, out.logits[:, -1])
    assert head.checked
