"""One kernel dispatch table: op name -> backend -> implementation, and the rule that picks one.

Backends: "reference" (plain PyTorch, always there), "cpu" and "cuda" (the compiled extension's
torch.ops.snp_fast.* kernels, registered per dispatch key) and "triton". `backend="auto"` takes the
fastest one available for the tensor's device; when none but the reference is, it says so once. Inside
`prefer(X)` (what prune(backend=X) uses), "auto" takes X first for every op that has it.
"""
import contextvars
import importlib
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch

__all__ = ['BACKENDS', 'register', 'resolve', 'available_backends', 'extension', 'has_kernel', 'prefer',
           'check_backend', 'PRECISIONS', 'check_precision', 'precision', 'current_precision']

# Precision of the large products (redundancy cosines, re-fit Grams). "bf16": the inputs are rounded to
# bfloat16 and their products (exact in fp32) summed in fp32: MKL's bf16 GEMM (AMX / AVX512-BF16) in the
# CPU kernels, several times the fp32 GEMM rate where the CPU has them; every other backend computes the
# same values from the rounded inputs by its fp32 route.
PRECISIONS = ('fp32', 'bf16')

BACKENDS = ('auto', 'reference', 'cpu', 'cuda', 'triton')
# Preference of backend="auto" by device type (first available wins).
_AUTO_ORDER = {'cuda': ('cuda', 'triton', 'reference'), 'cpu': ('cpu', 'reference')}

_TABLE: Dict[str, Dict[str, Callable]] = {}
# A model-level choice (prefer()): backend="auto" tries it first for every op.
_preferred: contextvars.ContextVar = contextvars.ContextVar('snp_fast_preferred_backend', default=None)
_precision: contextvars.ContextVar = contextvars.ContextVar('snp_fast_precision', default='fp32')
_warned: set = set()
_ext = None
_ext_error: Optional[str] = None


def extension():
    """The compiled module snp_fast._C, or None when it is not built (the reason is kept)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module('snp_fast._C')
        except ImportError as e:  # a pure-Python install still works, on the reference kernels
            _ext_error = str(e)
    return _ext


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered torch.ops.snp_fast.<op> for a dispatch key (CPU, CUDA)."""
    if extension() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f'snp_fast::{op}', dispatch_key)


def _triton_ok(device: torch.device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import os
    return device.type == 'cuda' or os.environ.get('TRITON_INTERPRET') == '1'


def _available(op: str, backend: str, device: torch.device) -> bool:
    if backend not in _TABLE.get(op, {}):
        return False
    if backend == 'reference':
        return True
    if backend == 'cpu':
        return device.type == 'cpu' and has_kernel(op, 'CPU')
    if backend == 'cuda':
        return device.type == 'cuda' and has_kernel(op, 'CUDA')
    if backend == 'triton':
        return _triton_ok(device)
    return False


def register(op: str, backend: str):
    """Decorator: register `fn` as the `backend` implementation of `op`."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f'unknown backend {backend!r}; expected one of {BACKENDS[1:]}')

    def deco(fn: Callable) -> Callable:
        _TABLE.setdefault(op, {})[backend] = fn
        return fn
    return deco


def available_backends(op: str, device) -> List[str]:
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if _available(op, b, device)]


def resolve(op: str, backend: str, device) -> Callable:
    """The implementation of `op` for `backend` on `device` (see the module docstring)."""
    if op not in _TABLE:
        raise KeyError(f'unknown op {op!r}; known: {sorted(_TABLE)}')
    if backend not in BACKENDS:
        raise ValueError(f'unknown backend {backend!r}; expected one of {BACKENDS}')
    device = torch.device(device)
    if backend != 'auto':
        if not _available(op, backend, device):
            why = f' (extension not loaded: {_ext_error})' if backend in ('cpu', 'cuda') and _ext_error else ''
            raise RuntimeError(f'backend {backend!r} is not available for {op} on {device.type}{why}; '
                               f'available: {available_backends(op, device)}')
        return _TABLE[op][backend]
    pref = _preferred.get()
    if pref is not None and _available(op, pref, device):
        return _TABLE[op][pref]
    for b in _AUTO_ORDER.get(device.type, ('reference',)):
        if _available(op, b, device):
            if b == 'reference' and (op, device.type) not in _warned:
                _warned.add((op, device.type))
                reason = f'the compiled extension is not loaded ({_ext_error})' if _ext_error else \
                    f'no compiled {op} kernel for {device.type}'
                warnings.warn(f'snp_fast: {reason}; using the plain-PyTorch reference for {op} (slower)', stacklevel=3)
            return _TABLE[op][b]
    raise RuntimeError(f'no backend for {op} on {device.type}')


@contextmanager
def prefer(backend: str):
    """Within this block, backend="auto" takes `backend` for every op that has it available, and the usual
    order for the others: the model-level choice of prune() ("triton": the Triton kernels where they
    exist; "reference": the plain-PyTorch versions throughout). "auto" changes nothing."""
    if backend not in BACKENDS:
        raise ValueError(f'unknown backend {backend!r}; expected one of {BACKENDS}')
    token = _preferred.set(None if backend == 'auto' else backend)
    try:
        yield
    finally:
        _preferred.reset(token)


def check_backend(backend: str, device) -> None:
    """A clear error, before any work, when a model-level backend cannot run any op on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f'backend={backend!r} is not known; choose one of {list(BACKENDS)}')
    device = torch.device(device)
    if backend in ('auto', 'reference') or any(_available(op, backend, device) for op in _TABLE):
        return
    why = f' (the compiled extension is not loaded: {_ext_error})' if backend in ('cpu', 'cuda') and _ext_error else ''
    raise ValueError(f'backend={backend!r} has no kernel for a model on {device.type}{why}; use "auto" or one of '
                     f'{sorted({b for op in _TABLE for b in available_backends(op, device)})}')


def check_precision(p: str) -> None:
    if p not in PRECISIONS:
        raise ValueError(f'precision={p!r} is not known; choose one of {list(PRECISIONS)}')


def current_precision() -> str:
    """The precision ops use when none is given: "fp32", or what the innermost precision() block set."""
    return _precision.get()


@contextmanager
def precision(p: str):
    """Within this block, redundancy_scores and gram default to precision `p` (what prune(precision=p) uses)."""
    check_precision(p)
    token = _precision.set(p)
    try:
        yield
    finally:
        _precision.reset(token)
