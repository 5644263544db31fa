"""Slicing: plans of kept indices per tensor, the one routine that applies them, and the new (smaller)
layers of a pruned architecture built on the meta device.

A plan is {parameter or buffer name: [(dim, kept index)]}; every family describes its coupled groups as
plans (families/*/surgery.py) and the pipeline applies them with slice_into."""
import warnings
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from . import ops

__all__ = ['Slice', 'Plan', 'head_rows', 'norm_plan', 'linear_plan', 'bn_plan', 'slice_into', 'quiet_zero_init', 'resize_norm',
           'new_linear', 'new_param', 'new_conv', 'new_bn']

Slice = Tuple[int, torch.Tensor]
Plan = Dict[str, List[Slice]]


# ------------------------------------------------------------------------------------------------
# plans

def head_rows(sel: torch.Tensor, head_dim: int, offset: int = 0, heads: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """(kept heads, kept) per-head indices -> flat row indices into a head-major (H*head_dim) axis.

    `heads`: the original index of each row of `sel` (None: rows are heads 0..H-1)."""
    if heads is None:
        heads = torch.arange(sel.shape[0], dtype=torch.long)
    return (heads.long().unsqueeze(1) * head_dim + sel + offset).flatten()


def norm_plan(plan: Plan, prefix: str, module: nn.Module, idx: torch.Tensor) -> None:
    for p in ('weight', 'bias'):
        if getattr(module, p, None) is not None:
            plan[f'{prefix}.{p}'] = [(0, idx)]


def bn_plan(plan: Plan, prefix: str, bn: nn.Module, idx: torch.Tensor) -> None:
    """A BatchNorm's affine parameters and running statistics."""
    norm_plan(plan, prefix, bn, idx)
    for b in ('running_mean', 'running_var'):
        if getattr(bn, b, None) is not None:
            plan[f'{prefix}.{b}'] = [(0, idx)]


def linear_plan(plan: Plan, prefix: str, module: nn.Module, out_idx: Optional[torch.Tensor],
                in_idx: Optional[torch.Tensor]) -> None:
    """A Linear's (or conv's) weight rows / columns and bias."""
    w = [(d, i) for d, i in ((0, out_idx), (1, in_idx)) if i is not None]
    if w:
        plan[f'{prefix}.weight'] = w
    if module.bias is not None and out_idx is not None:
        plan[f'{prefix}.bias'] = [(0, out_idx)]


# ------------------------------------------------------------------------------------------------
# applying a plan

def slice_into(pruned: nn.Module, model: nn.Module, plan: Plan, params: Iterable[str],
               buffers: Iterable[str] = ()) -> None:
    """The one slicing routine: every parameter in `params` and buffer in `buffers` of `model`, sliced by
    `plan` (or copied when the plan does not name it), put into the (meta) skeleton `pruned`."""
    src = dict(model.named_parameters())
    names = list(params)
    sliced = [n for n in names if n in plan]
    out = ops.gather_slices([src[n].detach() for n in sliced], [plan[n] for n in sliced]) if sliced else []
    tensors = dict(zip(sliced, out))
    for n in names:
        if n not in plan:
            tensors[n] = src[n].detach().clone()
    for name, t in tensors.items():
        mod_name, _, leaf = name.rpartition('.')
        mod = pruned.get_submodule(mod_name) if mod_name else pruned
        setattr(mod, leaf, nn.Parameter(t, requires_grad=src[name].requires_grad))
    _slice_buffers(pruned, model, plan, list(buffers))


def _slice_buffers(pruned: nn.Module, model: nn.Module, plan: Plan, names: List[str]) -> None:
    """Buffers (BatchNorm running statistics, index tables, RoPE tables): sliced by the plan or copied, persistent
    or not as they were."""
    if not names:
        return
    src = dict(model.named_buffers())
    persistent = set(model.state_dict())
    sliced = [n for n in names if n in plan]
    out = dict(zip(sliced, ops.gather_slices([src[n] for n in sliced], [plan[n] for n in sliced]))) if sliced else {}
    for n in names:
        mod_name, _, leaf = n.rpartition('.')
        mod = pruned.get_submodule(mod_name) if mod_name else pruned
        mod.register_buffer(leaf, out[n] if n in out else src[n].clone(), persistent=n in persistent)


# ------------------------------------------------------------------------------------------------
# new layers on the meta device

@contextmanager
def quiet_zero_init():
    """Zero-width layers (a dropped branch) are legal; torch's init warns that initialising them is a no-op."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Initializing zero-element tensors is a no-op')
        yield


def resize_norm(mod: nn.Module, n: int) -> None:
    """A LayerNorm-like module resized to n channels in place (its parameters on the meta device)."""
    if hasattr(mod, 'normalized_shape'):
        mod.normalized_shape = (n,)
    for p in ('weight', 'bias'):
        t = getattr(mod, p, None)
        if t is not None:
            setattr(mod, p, nn.Parameter(torch.empty(n, device='meta', dtype=t.dtype), requires_grad=t.requires_grad))


def new_linear(old: nn.Linear, in_f: int, out_f: int) -> nn.Linear:
    with quiet_zero_init():  # fc1/fc2 of a dropped MLP branch have zero width
        return nn.Linear(in_f, out_f, bias=old.bias is not None, device='meta', dtype=old.weight.dtype)


def new_param(old: torch.Tensor, shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device='meta', dtype=old.dtype), requires_grad=old.requires_grad)


def new_conv(old: nn.Conv2d, cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, old.kernel_size, old.stride, old.padding, bias=old.bias is not None,
                     device='meta', dtype=old.weight.dtype)


def new_bn(old: nn.BatchNorm2d, n: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(n, eps=old.eps, momentum=old.momentum, affine=old.affine,
                          track_running_stats=old.track_running_stats, device='meta', dtype=old.weight.dtype)
