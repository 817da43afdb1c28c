"""Pure-PyTorch stand-ins for the four names OpenRLHF 0.11.2 imports from flash-attn.

``flash_attn`` cannot be imported without its CUDA extension, yet ``openrlhf.models`` imports
``flash_attn.bert_padding`` (``index_first_axis``, ``pad_input``, ``unpad_input``) and
``flash_attn.utils.distributed.all_gather`` at module top. These follow flash-attn 2.8.3's semantics.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange


def index_first_axis(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of ``tensor`` along its first axis (differentiable)."""
    return tensor[indices]


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatter ``[nnz, ...]`` rows back to a zero-padded ``[batch, seqlen, ...]`` tensor."""
    out = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
    out = out.index_copy(0, indices, hidden_states)
    return out.view(batch, seqlen, *hidden_states.shape[1:])


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """Drop padded positions of ``[batch, seqlen, ...]``.

    Returns ``(rows, indices, cu_seqlens, max_seqlen, used_seqlens)`` as flash-attn does: ``rows`` are the
    kept positions in row-major order, ``cu_seqlens`` the int32 prefix sums of per-row lengths (with a leading 0).
    """
    all_masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    rows = index_first_axis(rearrange(hidden_states, "b s ... -> (b s) ..."), indices)
    return rows, indices, cu_seqlens, int(seqlens.max().item()), used_seqlens


class _AllGatherFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The gradient of a gather is the sum over ranks of each rank's slice (a reduce-scatter);
        # all_reduce + slice works on every backend, gloo included.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, dim=0)[rank], None


def all_gather(tensor: torch.Tensor, process_group) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank of ``process_group`` along dim 0 (differentiable)."""
    return _AllGatherFirstDim.apply(tensor, process_group)


def _module(name: str, is_package: bool = False, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=is_package)
    if is_package:
        mod.__path__ = []
    mod.__dict__.update(attrs)
    return mod


def install() -> bool:
    """Register the stand-ins as ``flash_attn.*`` if the real package cannot be imported. Returns True if installed."""
    try:
        import flash_attn.bert_padding  # noqa: F401

        return False
    except ImportError:
        pass
    for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
        del sys.modules[name]  # drop the half-imported real package
    padding = _module(
        "flash_attn.bert_padding",
        index_first_axis=index_first_axis,
        pad_input=pad_input,
        unpad_input=unpad_input,
        rearrange=rearrange,
    )
    distributed = _module("flash_attn.utils.distributed", all_gather=all_gather)
    utils = _module("flash_attn.utils", is_package=True, distributed=distributed)
    package = _module(
        "flash_attn", is_package=True, bert_padding=padding, utils=utils, __version__="0.0.0+openrlhf_irl_standin"
    )
    sys.modules.update(
        {
            "flash_attn": package,
            "flash_attn.bert_padding": padding,
            "flash_attn.utils": utils,
            "flash_attn.utils.distributed": distributed,
        }
    )
    return True
