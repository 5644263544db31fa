"""Running pieces of a model on the calibration images, in chunks, and capturing what scoring and the
re-fit need: forward hooks on submodules, column-sliced captures, finiteness checks, eval mode.

Shared by every model family's pipeline steps (snp_fast/families) and the pipeline itself."""
import ctypes
import functools
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from . import ops

__all__ = ['chunks', 'cat', 'apply', 'run_captured', 'take_cols', 'finite', 'release_heap', 'token_subset',
           'eval_mode', 'copy_modes', 'drop_eval_caches', 'Call']


def chunks(x: torch.Tensor, size: int):
    for s in range(0, x.shape[0], size):
        yield x[s:s + size]


def cat(parts: List[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def apply(fn: Callable, x: torch.Tensor, batch: int) -> torch.Tensor:
    """fn(x) in chunks of `batch` images, without autograd."""
    with torch.no_grad():
        return cat([fn(c) for c in chunks(x, batch)])


@torch.no_grad()
def run_captured(module: nn.Module, x: torch.Tensor, taps: Dict[str, tuple], batch: int,
                 kwargs: Optional[dict] = None):
    """module(x, **kwargs) in chunks; returns (output, {name: captured 'in'put or 'out'put of a submodule}).

    A tap is (submodule, 'in' | 'out') or (submodule, 'in' | 'out', kept last-dim indices): then only those
    columns are kept, sliced as they come, so the full activation is never held beyond its own forward."""
    store = defaultdict(list)
    handles = []
    for name, (sub, which, *cols) in taps.items():
        def hook(_m, inp, out, name=name, which=which, cols=cols[0] if cols else None):
            t = inp[0] if which == 'in' else out
            store[name].append(t if cols is None else take_cols(t, cols))
        handles.append(sub.register_forward_hook(hook))
    try:
        outs = [module(c, **(kwargs or {})) for c in chunks(x, batch)]
    finally:
        for h in handles:
            h.remove()
    return cat(outs), {k: cat(v) for k, v in store.items()}


def take_cols(t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """t[..., cols] through ops.gather_slices (its CPU kernel gathers row by row: several times faster
    than index_select along the last dim, which walks the columns)."""
    flat = t.reshape(t.shape[:-1].numel(), t.shape[-1])
    return ops.gather_slices([flat], [[(1, cols)]])[0].view(*t.shape[:-1], cols.numel())


def finite(t: torch.Tensor, where: str) -> torch.Tensor:
    """`t`, or FloatingPointError naming `where` when it holds a NaN or Inf."""
    # one reduction instead of an elementwise mask: a NaN or Inf anywhere makes the sum non-finite (summed in
    # fp32 at least: a half-precision sum of finite activations overflows past 65504)
    if not torch.isfinite(t.sum(dtype=torch.promote_types(t.dtype, torch.float32))):
        raise FloatingPointError(f'non-finite activations (NaN/Inf) at {where}; check the model weights and '
                                 'calibration images')
    return t


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc: nothing to call
        return None


def release_heap() -> None:
    """Hand the heap memory freed so far back to the OS (glibc's malloc_trim). glibc keeps the freed
    activations of the blocks and fits before resident for reuse, in holes between live tensors, so they
    add to the peak beside the growing pruned model (ViT-L, 16 images: ~0.1x the model's size); the
    price is page faults when that memory is used again."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def token_subset(n: int, budget: Optional[int], gen: torch.Generator) -> Optional[torch.Tensor]:
    """At most `budget` of n token rows (sorted, seeded by `gen`); None = all of them."""
    if budget is None or budget >= n:
        return None
    return torch.randperm(n, generator=gen)[:budget].sort().values


@contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode for the block; yields every module's training flag by name and restores them
    module by module afterwards (a BatchNorm frozen in a training model stays frozen)."""
    modes = {n: m.training for n, m in model.named_modules()}
    model.eval()
    try:
        yield modes
    finally:
        for n, m in model.named_modules():
            m.training = modes.get(n, m.training)
        drop_eval_caches(model)


def copy_modes(pruned: nn.Module, modes: Dict[str, bool]) -> nn.Module:
    """Give the pruned model the original's training flags, module by module (new modules: the model's)."""
    top = modes.get('', False)
    for n, m in pruned.named_modules():
        m.training = modes.get(n, top)
    drop_eval_caches(pruned)
    return pruned


def drop_eval_caches(model: nn.Module) -> None:
    # timm's attention-bias tables (EfficientFormer, LeViT, ...) are cached on an eval forward and cleared only
    # by train(True); the flags above are set directly, so a cache of these runs would outlive later changes of
    # the biases (training the original, loading weights into the pruned model)
    for m in model.modules():
        if isinstance(getattr(m, 'attention_bias_cache', None), dict):
            m.attention_bias_cache = {}


class Call(nn.Module):
    """A function as a module (so run_captured can run it with hooks on the modules it calls)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)
