"""One kernel dispatch table: op name -> backend -> implementation, and the rule that picks one.

Backends say what an implementation is, not where it runs:
  "reference"  plain PyTorch (ops/reference.py), always there: the fallback, test oracle and baseline;
  "compiled"   the extension's torch.ops.snp_fast.<op>, whatever the tensor's device: torch's dispatcher
               then picks the kernel registered under the tensor's dispatch key (csrc/cpu/ for CPU,
               csrc/cuda/ for CUDA). It is available where that key has a kernel (has_kernel);
  "triton"     the Triton kernels of ops/triton/ (CUDA tensors, or any under TRITON_INTERPRET=1).
"cpu" and "cuda" are deprecated aliases of "compiled" (one DeprecationWarning each) that keep their old
meaning: "compiled", on a tensor of that device type only.

`backend="auto"` takes the fastest one available for the tensor's device (AUTO_ORDER; per op where one
op differs); when none but the reference is, it says so once. Inside `prefer(X)` (what prune(backend=X)
uses), "auto" takes X first for every op that has it.

Every op schema is declared once, in C++ (csrc/snp_fast.cpp, TORCH_LIBRARY); OPS names the ops of this
table, and `register` refuses any other name. The Python side only adds fake kernels
(torch.library.register_fake, ops/__init__.py) to those schemas, never a schema of its own; the Triton
kernels are plain Python implementations registered in this same table.
"""
import contextvars
import importlib
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ['BACKENDS', 'OPS', 'register', 'resolve', 'available_backends', 'extension', 'has_kernel', 'prefer',
           'check_backend', 'canonical_backend', 'PRECISIONS', 'check_precision', 'precision', 'current_precision']

# Precision of the large products (redundancy cosines, re-fit Grams). "bf16": the inputs are rounded to
# bfloat16 and their products (exact in fp32) summed in fp32: MKL's bf16 GEMM (AMX / AVX512-BF16) in the
# CPU kernels, several times the fp32 GEMM rate where the CPU has them; every other backend computes the
# same values from the rounded inputs by its fp32 route.
PRECISIONS = ('fp32', 'bf16')

BACKENDS = ('auto', 'reference', 'compiled', 'triton')
# Deprecated names: alias -> (backend, the only device type it accepts).
_ALIASES = {'cpu': ('compiled', 'cpu'), 'cuda': ('compiled', 'cuda')}
# The ops of the table; their schemas are declared once, in csrc/snp_fast.cpp (TORCH_LIBRARY).
OPS = ('qk_scores', 'redundancy_scores', 'gram', 'gather_slices', 'cholesky_solve_')
# Preference of backend="auto" by device type (first available wins), and where one op differs.
AUTO_ORDER = {'cuda': ('compiled', 'triton', 'reference'), 'cpu': ('compiled', 'reference')}
_AUTO_ORDER_OP = {
    # the Triton kernel keeps the eigenproblems on the GPU; the compiled CUDA route (qk_scores_hybrid)
    # solves them on the host's cores (ops/triton/qk_scores.py)
    ('qk_scores', 'cuda'): ('triton', 'compiled', 'reference'),
}
# Triton kernels offered on CUDA tensors only: under the CPU interpreter the Q/K kernel takes ~5 s per
# (image, head) at d = 64, hours for a prune (its tests call ops/triton/qk_scores.py directly).
_TRITON_GPU_ONLY = {'qk_scores'}
# (op, device type) where the reference IS the native route (torch.linalg's cuSOLVER): no "slower" warning.
_REFERENCE_IS_NATIVE = {('cholesky_solve_', 'cuda')}

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


def canonical_backend(backend: str) -> Tuple[str, Optional[str]]:
    """(backend, the device type it is limited to or None) for a backend name or a deprecated alias.
    An alias warns once (DeprecationWarning); an unknown name is a ValueError that lists the known ones."""
    if backend in BACKENDS:
        return backend, None
    if isinstance(backend, str) and backend in _ALIASES:
        if ('alias', backend) not in _warned:
            _warned.add(('alias', backend))
            warnings.warn(f'snp_fast: backend={backend!r} is deprecated; use "compiled" (the device is '
                          "chosen by torch's dispatcher from the tensor's device)", DeprecationWarning, stacklevel=3)
        return _ALIASES[backend]
    raise ValueError(f'backend={backend!r} is not known; choose one of {list(BACKENDS)}')


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
    if backend == 'compiled':
        return device.type in ('cpu', 'cuda') and has_kernel(op, device.type.upper())
    if backend == 'triton':
        return _triton_ok(device) and (device.type == 'cuda' or op not in _TRITON_GPU_ONLY)
    return False


def register(op: str, backend: str):
    """Decorator: register `fn` as the `backend` implementation of `op` (one of OPS)."""
    if op not in OPS:
        raise ValueError(f'unknown op {op!r}: declare its schema in csrc/snp_fast.cpp and add it to OPS')
    if backend not in BACKENDS[1:]:
        raise ValueError(f'unknown backend {backend!r}; expected one of {BACKENDS[1:]}')

    def deco(fn: Callable) -> Callable:
        _TABLE.setdefault(op, {})[backend] = fn
        return fn
    return deco


def available_backends(op: str, device) -> List[str]:
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if _available(op, b, device)]


def _unavailable(op: str, backend: str, device: torch.device) -> RuntimeError:
    why = f' (extension not loaded: {_ext_error})' if backend == 'compiled' and _ext_error else ''
    return RuntimeError(f'backend {backend!r} is not available for {op} on {device.type}{why}; '
                        f'available: {available_backends(op, device)}')


def resolve(op: str, backend: str, device) -> Callable:
    """The implementation of `op` for `backend` on `device` (see the module docstring)."""
    if op not in _TABLE:
        raise KeyError(f'unknown op {op!r}; known: {sorted(_TABLE)}')
    if backend not in BACKENDS and backend not in _ALIASES:
        raise ValueError(f'unknown backend {backend!r}; expected one of {BACKENDS}')
    name, only = canonical_backend(backend)
    device = torch.device(device)
    if name != 'auto':
        if (only is not None and device.type != only) or not _available(op, name, device):
            raise _unavailable(op, backend, device)
        return _TABLE[op][name]
    pref = _preferred.get()
    if pref is not None:
        pname, ponly = pref
        if (ponly is None or device.type == ponly) and _available(op, pname, device):
            return _TABLE[op][pname]
    for b in _AUTO_ORDER_OP.get((op, device.type), AUTO_ORDER.get(device.type, ('reference',))):
        if _available(op, b, device):
            if b == 'reference' and (op, device.type) not in _warned | _REFERENCE_IS_NATIVE:
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
    name, only = canonical_backend(backend)
    token = _preferred.set(None if name == 'auto' else (name, only))
    try:
        yield
    finally:
        _preferred.reset(token)


def check_backend(backend: str, device) -> None:
    """A clear error, before any work, when a model-level backend cannot run any op on `device`."""
    name, only = canonical_backend(backend)
    device = torch.device(device)
    if name in ('auto', 'reference'):
        return
    if (only is None or device.type == only) and any(_available(op, name, device) for op in _TABLE):
        return
    why = f' (the compiled extension is not loaded: {_ext_error})' if name == 'compiled' and _ext_error else ''
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
