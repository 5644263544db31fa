"""Parameter and multiply-accumulate counts.

MACs are counted by torch's FlopCounterMode on a meta-device copy of the model (no compute, no memory):
every matmul, linear and convolution, including both attention products (QKᵀ and AV, which
scaled_dot_product_attention decomposes into). Norms, softmax and activations are not counted, as
in fvcore / the SNP paper's GMACs.
"""
import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_macs', 'count_params', 'meta_copy']


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers live on the meta device (no data copied)."""
    memo = {}
    for t in model.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device='meta'), requires_grad=t.requires_grad)
    for t in model.buffers():
        memo[id(t)] = torch.empty_like(t, device='meta')
    return copy.deepcopy(model, memo)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _input_size(model: nn.Module) -> Tuple[int, int, int]:
    pe = getattr(model, 'patch_embed', None)
    img = getattr(pe, 'img_size', None) or (224, 224)
    return (getattr(model, 'in_chans', 3), *img)


def count_macs(model: nn.Module, input_size: Optional[Tuple[int, int, int]] = None) -> int:
    """MACs of one forward pass of a single image (C, H, W; default: the model's own input size)."""
    m = model if all(p.is_meta for p in model.parameters()) else meta_copy(model)
    m.eval()
    # FlopCounterMode's module tracker rejects a grad-requiring input without grad_fn: a no_grad view of a
    # parameter, as AttentionPoolLatent feeds its latent query to its q Linear
    if any(p.requires_grad for p in m.parameters()):
        m = meta_copy(m).requires_grad_(False)
    dtype = next(m.parameters()).dtype
    x = torch.empty(1, *(input_size or _input_size(model)), device='meta', dtype=dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(x)
    return counter.get_total_flops() // 2
