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

__all__ = ['count_macs', 'count_params', 'meta_copy', 'model_input_size', 'example_input']


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


def model_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) the model takes: a timm model's patch embedding's image size, a transformers model's config;
    224x224 when neither says."""
    pe = getattr(model, 'patch_embed', None)
    img = getattr(pe, 'img_size', None)
    config = getattr(model, 'config', None)
    if img is None and config is not None and hasattr(config, 'image_size'):
        size = config.image_size
        img = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (getattr(config, 'num_channels', 3), *img)
    return (getattr(model, 'in_chans', 3), *(img or (224, 224)))


def count_macs(model: nn.Module, input_size: Optional[Tuple[int, int, int]] = None) -> int:
    """MACs of one forward pass of a single image (C, H, W; default: the model's own input size)."""
    m = model if all(p.is_meta for p in model.parameters()) else meta_copy(model)
    m.eval()
    # FlopCounterMode's module tracker rejects a grad-requiring input without grad_fn: a no_grad view of a
    # parameter, as AttentionPoolLatent feeds its latent query to its q Linear
    if any(p.requires_grad for p in m.parameters()):
        m = meta_copy(m).requires_grad_(False)
    dtype = next(m.parameters()).dtype
    x = torch.empty(1, *(input_size or model_input_size(model)), device='meta', dtype=dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(x)
    return counter.get_total_flops() // 2


def example_input(model: nn.Module, batch: int, size: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """A seeded random batch of the model's input size, on its device and in its dtype (benchmarks, export checks)."""
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *(size or model_input_size(model)), generator=g).to(p.device, p.dtype)
