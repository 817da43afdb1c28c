"""The output head of a Hugging Face causal LM as the fused losses see it: weight, logit transform, ZeRO-3.

The fused losses compute logits = T(hidden @ W^T) chunk by chunk, so they must know T exactly. ``head_transform_for``
reads it from the config for the architectures whose forward we checked (transformers 5.15):

    final_logit_softcapping c (gemma2, gemma3_text):       T(z) = c * tanh(z / c)
    logit_scale s             (cohere, cohere2):           T(z) = s * z
    logits_scaling s          (granite, granitemoe, ...):  T(z) = z / s

Any other model with one of these fields set, or an lm_head with a bias, or a LoRA-wrapped lm_head, is refused with
a message naming the field. ``FusedHead.check`` also compares T(h W^T) with the model's own logits of the last
position (which the forward computes anyway with ``logits_to_keep=1``), catching transforms no field announces.

ZeRO-3 partitions parameters outside their module's forward. ``FusedHead.run`` therefore runs a fused op as the
forward of the lm_head module itself (docs/cpu_layer.md#the-fused-head-under-zero-3): DeepSpeed's hooks gather
the weight (also when it is the tied input embedding) for that call, re-gather it before the op's backward and
reduce-scatter its gradient. Without DeepSpeed it is a plain call.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .fused_iq_objective import HeadTransform

__all__ = ["FusedHead", "head_transform_for", "run_as_forward"]

SOFTCAP_MODELS = {"gemma2", "gemma3_text"}
LOGIT_SCALE_MODELS = {"cohere", "cohere2"}
LOGITS_SCALING_DIV_MODELS = {"granite", "granitemoe", "granitemoeshared", "granitemoehybrid"}
FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class UnsupportedHead(ValueError):
    """The fused loss cannot reproduce this model's output head (the plain loss, on the model's own logits, can)."""


def head_transform_for(config) -> HeadTransform:
    """The exact logit transform of ``config``'s causal LM, or :class:`UnsupportedHead` naming the field it cannot
    honour."""
    model_type = getattr(config, "model_type", "?")
    softcap, scale = None, 1.0
    for field in FIELDS:
        value = getattr(config, field, None)
        if value is None or (field != "final_logit_softcapping" and float(value) == 1.0):
            continue
        if field == "final_logit_softcapping" and model_type in SOFTCAP_MODELS:
            softcap = float(value)
        elif field == "logit_scale" and model_type in LOGIT_SCALE_MODELS:
            scale *= float(value)
        elif field == "logits_scaling" and model_type in LOGITS_SCALING_DIV_MODELS:
            scale /= float(value)
        else:
            raise UnsupportedHead(
                f"model config field {field}={value} (model_type {model_type!r}) transforms the logits in a way the "
                "fused loss does not implement for this architecture"
            )
    return HeadTransform(scale=scale, softcap=softcap)


def run_as_forward(module: nn.Module, fn, *args):
    """``fn(*args)`` called as ``module``'s forward, so that hooks on ``module`` (ZeRO-3's gather/release and its
    backward re-gather) wrap it."""
    had = "forward" in module.__dict__
    saved = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if had:
            module.forward = saved
        else:
            del module.forward


class FusedHead:
    """The lm_head module of ``model`` (an HF causal LM, possibly PEFT-wrapped) and its logit transform."""

    def __init__(self, model: nn.Module):
        module = model.get_output_embeddings()
        if module is None or not hasattr(module, "weight"):
            raise UnsupportedHead(f"{type(model).__name__} has no output embedding (lm_head) weight")
        if hasattr(module, "base_layer") or hasattr(module, "lora_A"):
            raise UnsupportedHead("the lm_head carries LoRA adapters (lm_head among the LoRA target modules); the "
                                  "fused loss reads lm_head.weight only, so leave lm_head out of them")
        if getattr(module, "bias", None) is not None:
            raise UnsupportedHead(f"{type(model).__name__}'s lm_head has a bias (lm_head.bias), which the fused "
                                  "loss does not add")
        self.module = module
        self.transform = head_transform_for(model.config)
        self.checked = False

    @classmethod
    def of(cls, model: nn.Module) -> "FusedHead":
        """The head of ``model``, built (and its config checked) once per model."""
        head = model.__dict__.get("_irl_fused_head")
        if head is None or head.module is not model.get_output_embeddings():
            head = cls(model)
            model.__dict__["_irl_fused_head"] = head
        return head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """T(hidden @ W^T) in fp32, differentiable (a few rows: bootstrap values, logged entropy)."""
        return self.run(lambda weight, h: self.transform.apply((h @ weight.t()).float()), hidden)

    def run(self, fn, *args):
        """``fn(weight, *args)`` inside the lm_head's forward (see module docstring)."""
        module = self.module
        return run_as_forward(module, lambda *a: fn(module.weight, *a), *args)

    @torch.no_grad()
    def check(self, hidden_last: torch.Tensor, logits_last: torch.Tensor) -> None:
        """Raise if T(hidden_last @ W^T) [B, V] is not the model's own ``logits_last``. Once per head."""
        if self.checked:
            return

        ours = self.logits(hidden_last.detach())
        theirs = logits_last.detach().float()
        if ours.shape != theirs.shape:
            raise UnsupportedHead(f"lm_head gives logits of shape {tuple(ours.shape)}, the model "
                                  f"{tuple(theirs.shape)}; this architecture's output head is not supported")
        tol = (1e-3 if hidden_last.dtype == torch.float32 else 3e-2) * (1.0 + float(theirs.abs().max()))
        err = float((ours - theirs).abs().max())
        if err > tol:
            raise UnsupportedHead(
                f"the model's logits differ from {self.transform} applied to hidden @ lm_head.weight.T (max abs diff "
                f"{err:.4g} > {tol:.3g}): its forward transforms the logits in a way the fused loss does not know"
            )
        self.checked = True
