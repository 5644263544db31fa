"""The hot pieces of SNP behind one interface (dispatch.py has the table and the rule).

    qk_scores(q, k, gamma)        Q/K attention-score preservation scores, (B,H,N,d) -> (H,d)
    redundancy_scores(w)          Σ_l (1 − |cos(W_i, W_l)|) over the rows of w -> (n,)
    gram(x, out=None)             (out +=) xᵀx, fp32, for the least-squares re-fit
    (both with precision="bf16": of the inputs rounded to bfloat16, products summed in fp32)
    gather_slices(tensors, slices) every (dim, kept-index) slice of many tensors in one call
    cholesky_solve_(a, b)         in place: b ← b a⁻¹ for the re-fit's ridge systems (the one mutating op)

Each takes backend= "auto" | "reference" | "compiled" | "triton" ("cpu" / "cuda": deprecated aliases of
"compiled"). "compiled" calls torch.ops.snp_fast.<op>; its schema is declared once in csrc/snp_fast.cpp
and torch's dispatcher picks the CPU or CUDA kernel from the tensor's device. Every op has a
plain-PyTorch reference (ops/reference.py) that the compiled and Triton kernels are tested and
benchmarked against, and a fake kernel (below) so that the compiled ops trace under torch.compile.
"""
import operator
from typing import List, Optional, Sequence, Tuple

import torch

from . import reference
from .dispatch import (BACKENDS, OPS, PRECISIONS, available_backends, check_backend, check_precision,
                       current_precision, extension, has_kernel, precision, prefer, register, resolve)

__all__ = ['qk_scores', 'redundancy_scores', 'gram', 'gather_slices', 'cholesky_solve_', 'available_backends',
           'BACKENDS', 'OPS', 'PRECISIONS', 'precision', 'extension', 'has_kernel', 'prefer', 'check_backend']

# --- reference implementations -------------------------------------------------------------------
register('qk_scores', 'reference')(reference.qk_scores_literal)
register('redundancy_scores', 'reference')(reference.redundancy_scores_full)
register('gram', 'reference')(lambda x: reference.gram_full(x))
register('gather_slices', 'reference')(reference.gather_slices_loop)
register('cholesky_solve_', 'reference')(reference.cholesky_solve_linalg)


# --- compiled extension (torch.ops.snp_fast.*): one entry per op, the dispatcher picks the device kernel
def _ext_qk_scores(q, k, gamma):
    return torch.ops.snp_fast.qk_scores(q, k, gamma)


def _ext_redundancy(w, bf16=False):
    return torch.ops.snp_fast.redundancy_scores(w, bf16)


def _ext_gram(x, bf16=False):
    return torch.ops.snp_fast.gram(x, bf16)


_ext_redundancy.takes_bf16 = _ext_gram.takes_bf16 = True  # the others get bf16-rounded inputs (_with_precision)


def _ext_gather(tensors, slices):
    dim_a, idx_a, dim_b, idx_b = [], [], [], []
    for t, per in zip(tensors, slices):
        if not 1 <= len(per) <= 2:
            raise ValueError(f'gather_slices: each tensor takes one or two (dim, index) slices, got {len(per)}')
        (da, ia), (db, ib) = per[0], (per[1] if len(per) == 2 else (0, None))
        dim_a.append(da % t.dim())  # (in range: checked by gather_slices)
        idx_a.append(ia.to(t.device))
        dim_b.append(db % t.dim())
        idx_b.append(None if ib is None else ib.to(t.device))
    return list(torch.ops.snp_fast.gather_slices(list(tensors), dim_a, idx_a, dim_b, idx_b))


def _ext_cholesky_solve(a, b):
    return int(torch.ops.snp_fast.cholesky_solve_(a, b))


register('qk_scores', 'compiled')(_ext_qk_scores)
register('redundancy_scores', 'compiled')(_ext_redundancy)
register('gram', 'compiled')(_ext_gram)
register('gather_slices', 'compiled')(_ext_gather)
register('cholesky_solve_', 'compiled')(_ext_cholesky_solve)


def _register_fakes():
    """Shapes without data, so the ops trace under torch.compile / FakeTensor. Fakes only: every schema
    is declared in csrc/snp_fast.cpp (register_fake fails on an op that has none)."""
    if extension() is None:
        return

    def qk_fake(q, k, gamma):  # (B, H, ., d) q (or Gram) -> (H, d) scores
        return q.new_empty((q.shape[1], q.shape[3]), dtype=torch.float32)

    for name in ('qk_scores', 'qk_scores_dxd', 'qk_scores_hybrid', 'qk_scores_grams'):
        torch.library.register_fake(f'snp_fast::{name}')(qk_fake)

    @torch.library.register_fake('snp_fast::redundancy_scores')
    def _(w, bf16=False):
        return w.new_empty((w.shape[0],), dtype=torch.float32)

    @torch.library.register_fake('snp_fast::gram')
    def _(x, bf16=False):
        return x.new_empty((x.shape[1], x.shape[1]), dtype=torch.float32)

    @torch.library.register_fake('snp_fast::gather_slices')
    def _(src, dim_a, idx_a, dim_b, idx_b):
        out = []
        for t, da, ia, db, ib in zip(src, dim_a, idx_a, dim_b, idx_b):
            shape = list(t.shape)
            shape[da] = ia.shape[0]
            if ib is not None:
                shape[db] = ib.shape[0]
            out.append(t.new_empty(shape))
        return out

    @torch.library.register_fake('snp_fast::cholesky_solve_')
    def _(a, b):  # writes a and b in place (shapes unchanged); LAPACK's info, data-dependent, as a 0-d tensor
        return a.new_empty((), dtype=torch.int64)


_register_fakes()


def _import_triton_kernels():
    try:
        from . import triton as _triton  # noqa: F401  (registers the "triton" backends)
    except ImportError:
        pass


_import_triton_kernels()


# --- public API: scores and slices, not differentiable (no autograd graph, also for inputs that require grad)
@torch.no_grad()
def qk_scores(q: torch.Tensor, k: torch.Tensor, gamma: int, *, backend: str = 'auto') -> torch.Tensor:
    """Q/K attention-score preservation scores (docs/METHOD.md, "Criteria"), summed over the batch.

    Args:
        q: queries (B, H, N, d) as they enter QKᵀ; any float dtype (computed in fp32).
        k: keys, same shape.
        gamma: leading singular components of QKᵀ to preserve (1 <= gamma; capped at min(N, d)).
        backend: "auto" | "reference" | "compiled" | "triton" (dispatch.py). "auto" on a CUDA tensor takes
            the Triton kernel (ops/triton/qk_scores.py: everything on the GPU; d > 64 goes on to the
            compiled hybrid), on a CPU tensor the compiled CPU kernel.

    Returns:
        (H, d) float32 scores, high = keep.
    """
    if isinstance(gamma, bool):
        raise TypeError(f'qk_scores: gamma must be an int, got {gamma!r}')
    try:
        gamma = operator.index(gamma)  # ints and integer scalars; never truncates a float
    except TypeError:
        raise TypeError(f'qk_scores: gamma must be an int, got {gamma!r}') from None
    return resolve('qk_scores', backend, q.device)(q, k, gamma)


def _with_precision(fn, t: torch.Tensor, p: Optional[str]) -> torch.Tensor:
    p = current_precision() if p is None else p
    check_precision(p)
    if p == 'fp32':
        return fn(t)
    if getattr(fn, 'takes_bf16', False):
        return fn(t, True)
    return fn(t.to(torch.bfloat16))  # (each route computes in fp32 from its input: the rounded values)


@torch.no_grad()
def redundancy_scores(w: torch.Tensor, *, precision: Optional[str] = None, backend: str = 'auto') -> torch.Tensor:
    """ω_i = Σ_l (1 − |cos(W_i, W_l)|) over the rows of a 2-D weight; (n,) float32, high = keep.
    precision: "fp32", or "bf16" for ω of the rows rounded to bfloat16 (dispatch.PRECISIONS); None: that of
    the enclosing ops.precision() block, "fp32" outside one."""
    return _with_precision(resolve('redundancy_scores', backend, w.device), w, precision)


@torch.no_grad()
def gram(x: torch.Tensor, out: Optional[torch.Tensor] = None, *, precision: Optional[str] = None,
         backend: str = 'auto') -> torch.Tensor:
    """xᵀx (fp32) of a (T, m) input; added into `out` when given (streaming accumulation).
    precision: "fp32", or "bf16" for the Gram of x rounded to bfloat16 (as in redundancy_scores)."""
    if x.dim() != 2:
        raise ValueError(f'gram needs a 2-D input (tokens, features), got shape {tuple(x.shape)}')
    g = _with_precision(resolve('gram', backend, x.device), x, precision)
    if out is None:
        return g
    return out.add_(g)


Slice = Tuple[int, torch.Tensor]


@torch.no_grad()
def gather_slices(tensors: Sequence[torch.Tensor], slices: Sequence[Sequence[Slice]], *,
                  backend: str = 'auto') -> List[torch.Tensor]:
    """Slice many tensors at once: tensors[i] keeps, along each (dim, int64 index) of slices[i], the
    listed indices (one or two slices per tensor; dims in [-ndim, ndim)). Returns new contiguous tensors."""
    if len(tensors) != len(slices):
        raise ValueError(f'gather_slices: {len(tensors)} tensors but {len(slices)} slice lists')
    if not tensors:
        return []
    for i, (t, per) in enumerate(zip(tensors, slices)):
        for dim, idx in per:
            if isinstance(dim, bool) or not isinstance(dim, int) or not -t.dim() <= dim < t.dim():
                raise IndexError(f'gather_slices: tensor {i} of shape {tuple(t.shape)} has no dim {dim!r}')
            if not isinstance(idx, torch.Tensor) or idx.dim() != 1:
                raise TypeError(f'gather_slices: the index for dim {dim} of tensor {i} must be a 1-D int64 tensor, '
                                f'got {type(idx).__name__}' + (f' of shape {tuple(idx.shape)}'
                                                              if isinstance(idx, torch.Tensor) else ''))
    return resolve('gather_slices', backend, tensors[0].device)(tensors, slices)


def cholesky_solve_(a: torch.Tensor, b: torch.Tensor, *, backend: str = 'auto') -> int:
    """In place: b ← b a⁻¹ (= (a⁻¹ bᵀ)ᵀ), the ridge solve of the re-fit (snp_fast/refit.py).

    Args:
        a: (n, n) float64, symmetric positive definite; used as workspace (the compiled CPU kernel leaves
            the Cholesky factor in its lower triangle, the reference leaves it unchanged).
        b: (m, n) float64 right-hand sides, overwritten by the solution; m may be 0.
        backend: "auto" | "reference" | "compiled" (dispatch.py). On the CPU the compiled kernel calls
            LAPACK's dpotrf / dpotrs without torch.linalg's layout copies (csrc/cpu/cholesky_solve_cpu.cpp);
            on CUDA "auto" takes the reference, torch.linalg (cuSOLVER).

    Returns:
        0, or k > 0 when the leading k × k minor of a is not positive definite (b then holds no solution).
    """
    return resolve('cholesky_solve_', backend, a.device)(a, b)
