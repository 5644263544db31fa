"""Least-squares re-fit of a pruned Linear to the original layer's outputs (docs/METHOD.md, "The re-fit").

For inputs X_S (the kept input columns, plus a ones column for the bias) and targets Y (the original
layer's outputs at the kept output rows), the re-fit solves

    W' = argmin ‖X_S Wᵀ − Y‖² + λ ‖W − W_S‖²,   λ = damp · mean(diag(X_Sᵀ X_S)),

i.e. Wᵀ = (X_Sᵀ X_S + λI)⁻¹ (X_Sᵀ Y + λ W_Sᵀ), with W_S the sliced weights. Damping towards W_S (not
towards 0) means that with nothing pruned the layer comes back unchanged, and that the calibration
error can never exceed that of plain slicing (W_S is a feasible point of the same objective; with
precision="bf16" the Gram is of the bf16-rounded X, so the "after" error is an estimate to that rounding). The
Gram matrix streams in over calibration batches (a symmetric rank-k update, ops.gram) in fp32; the
solve runs in fp64 by Cholesky (LAPACK in place on the CPU: cholesky_solve_).
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from . import ops
from .capture import Call, release_heap, run_captured, token_subset

__all__ = ['LinearFit', 'RefitStats', 'DEFAULT_DAMP', 'cholesky_solve_', 'fit', 'fit_constant', 'refit_heads']

DEFAULT_DAMP = 1e-4


@dataclass
class RefitStats:
    tokens: int
    err_sliced: float   # relative squared error ‖X W_Sᵀ − Y‖² / ‖Y‖² on the calibration tokens
    err_refit: float    # the same after the re-fit

    def to_dict(self) -> dict:
        return {'tokens': self.tokens, 'err_sliced': self.err_sliced, 'err_refit': self.err_refit}


def cholesky_solve_(a: torch.Tensor, b: torch.Tensor) -> int:
    """In place: b (m, n) float64 -> b a⁻¹ (= (a⁻¹ bᵀ)ᵀ) for a (n, n) float64 symmetric positive definite,
    which is used as workspace (on the CPU kernel's path its lower triangle holds the Cholesky factor
    afterwards). Returns 0, or k > 0 when the leading k × k minor of a is not positive definite (b then
    holds partial results). snp_fast.ops.cholesky_solve_: on the CPU the compiled kernel calls LAPACK
    without the layout copies of torch.linalg (csrc/cpu/cholesky_solve_cpu.cpp); elsewhere, or without
    it, torch.linalg."""
    return ops.cholesky_solve_(a, b)


class LinearFit:
    """Accumulates XᵀX and Xᵀ(Y − X W_Sᵀ) for one Linear, then re-fits it in place.

    Solving for the correction ΔW = W − W_S from the sliced layer's residual R = Y − X W_Sᵀ (instead of
    for W from XᵀY) keeps fp32 rounding of the Gram matrix from being amplified by 1/λ in directions
    the calibration data barely spans: the right-hand side XᵀR is small exactly there. It also gives
    the sliced layer's error ‖R‖² exactly.
    """

    def __init__(self, layer: nn.Linear, backend: str = 'auto'):
        self.layer = layer
        self.backend = backend
        self.bias = layer.bias is not None
        # accumulators, made by the first batch (a one-batch fit then makes no zero-filled copies)
        self.xtx: Optional[torch.Tensor] = None   # (in, in) fp32
        self.xsum: Optional[torch.Tensor] = None  # (in,) fp64
        self.rtx: Optional[torch.Tensor] = None   # (out, in[+1]) fp64 = (XᵀR)ᵀ, the last column from the bias;
        # stored transposed because LAPACK's solve takes and returns column-major matrices: then neither the
        # right-hand side nor the solution ΔWᵀ is copied to another layout
        dev = layer.weight.device
        self.rr = torch.zeros((), device=dev, dtype=torch.float64)
        self.yy = torch.zeros((), device=dev, dtype=torch.float64)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, pred: Optional[torch.Tensor] = None) -> None:
        """Add a batch: x (..., in_features) pruned-model inputs, y (..., out_features) targets, and
        optionally pred = the layer's current output on x when the caller has it already."""
        x = x.reshape(-1, x.shape[-1]).float()
        y = y.reshape(-1, y.shape[-1]).float()
        if x.shape[0] != y.shape[0] or x.shape[1] != self.layer.in_features or y.shape[1] != self.layer.out_features:
            raise ValueError(f'LinearFit.add: inputs {tuple(x.shape)} / targets {tuple(y.shape)} do not fit a '
                             f'Linear({self.layer.in_features}, {self.layer.out_features})')
        if pred is None:
            b = self.layer.bias.detach().float() if self.bias else None
            pred = torch.nn.functional.linear(x, self.layer.weight.detach().float(), b)
        r = y - pred.reshape(y.shape).float()
        # bf16 Grams (the enclosing ops.precision block) are of x rounded to bf16, rounded once here: the ones
        # column's sums must be of the same rounded x, or the bordered Gram [X 1]ᵀ[X 1] is no longer one and
        # can be indefinite (after a LayerNorm it nearly is)
        xs = x.to(torch.bfloat16) if ops.dispatch.current_precision() == 'bf16' else x
        g = ops.gram(xs, backend=self.backend)  # (rounding a bf16 input again is a no-op)
        # fp32 products and sums (BLAS / cascade summation), accumulated across batches in fp64. The column
        # sums are fp32 like the Gram's entries (a float64 reduction is ~15x slower: ~40 ms a ViT-L block)
        rtx, n = r.t() @ x, x.shape[1]
        xsum = xs.float().sum(0).double()
        if self.xtx is None:
            self.xtx, self.xsum = g, xsum
            self.rtx = rtx.new_empty((rtx.shape[0], n + self.bias), dtype=torch.float64)
            self.rtx[:, :n] = rtx
            if self.bias:
                self.rtx[:, n] = r.sum(0)
        else:
            self.xtx += g
            self.xsum += xsum
            self.rtx[:, :n] += rtx
            if self.bias:
                self.rtx[:, n] += r.sum(0)
        r = r.flatten()
        self.rr += r.dot(r)
        y = y.flatten()
        self.yy += y.dot(y)
        self.tokens += x.shape[0]

    def _gram(self) -> torch.Tensor:
        if not self.bias:
            return self.xtx.double()
        n = self.xtx.shape[0]
        full = self.xsum.new_empty(n + 1, n + 1)  # filled in place: no second fp64 copy of the n×n block
        full[:n, :n] = self.xtx
        full[n, :n] = full[:n, n] = self.xsum
        full[n, n] = self.tokens
        return full

    @torch.no_grad()
    def solve(self, damp: float = DEFAULT_DAMP) -> RefitStats:
        """Re-fit the layer in place; returns calibration errors before and after."""
        if self.tokens == 0:
            raise RuntimeError('LinearFit.solve called before any calibration batch was added')
        if damp < 0:
            raise ValueError(f'damp must be >= 0, got {damp}')
        yy = self.yy.clamp_min(torch.finfo(torch.float64).tiny)
        before = float(self.rr / yy)
        if before <= max(torch.finfo(self.layer.weight.dtype).eps, 4 * torch.finfo(torch.float32).eps) ** 2:
            # the sliced layer already matches to rounding (one ulp RMS of a half-precision layer, a few of an
            # fp32 one): nothing real to fit
            return RefitStats(self.tokens, before, before)
        g = self._gram()
        scale = g.diagonal().mean().clamp_min(1e-12)
        delta = self.rtx.clone()  # (out, in[+1]); solved in place into ΔW (and Δb)
        for jitter in (0.0, 1e-10, 1e-8, 1e-6):
            lam = (damp + jitter) * scale
            if jitter:
                g, delta = self._gram(), delta.copy_(self.rtx)  # the failed attempt overwrote both
            g.diagonal().add_(lam)  # G + λI in place: no identity matrix or sum beside G
            info = cholesky_solve_(g, delta)
            if info == 0:
                break
        del g
        if info != 0:  # numerically singular even with jitter: a rank-revealing solve (on the CPU: CUDA's
            # lstsq is QR without pivoting, which assumes full rank)
            g = self._gram()
            g.diagonal().add_(lam)
            delta = torch.linalg.lstsq(g.cpu(), self.rtx.t().cpu(), driver='gelsy').solution.t().to(g.device)
            del g
        d = delta.reshape(-1)  # delta: (out, in[+1]) = ΔW (and Δb), row-major
        # ‖R − XΔ‖² = ‖R‖² − 2⟨Δ, XᵀR⟩ + ⟨Δ, GΔ⟩, and GΔ = XᵀR − λΔ at the solution
        cross, dd = d.dot(self.rtx.reshape(-1)), d.dot(d)
        if not bool(torch.isfinite(cross) & torch.isfinite(dd)):  # a non-finite Δ makes one of them so
            return RefitStats(self.tokens, before, before)
        after = float((self.rr - cross - lam * dd).clamp_min(0) / yy)
        if after >= before:  # never worse than plain slicing
            return RefitStats(self.tokens, before, before)
        # in place, computed in float64 (type promotion) and rounded once to the layer's dtype: no copies
        n_in = self.layer.in_features
        self.layer.weight.data.add_(delta[:, :n_in])
        if self.bias:
            self.layer.bias.data.add_(delta[:, n_in])
        return RefitStats(self.tokens, before, after)


def fit(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, rows: Optional[torch.Tensor], damp: float,
        pred: Optional[torch.Tensor] = None) -> RefitStats:
    """Re-fit `layer` in place from inputs x (..., in) to targets y (..., out) on the token rows `rows` (None:
    all); pred = the layer's current output on x when the caller has it. A zero-width layer (a dropped
    branch) gets its bias set to the mean target."""
    release_heap()  # the solve's fresh n×n float64 matrices should not come on top of what earlier fits freed
    x = x.reshape(y.shape[:-1].numel(), x.shape[-1])  # not (-1, 0): a dropped branch's input has zero width
    y = y.reshape(-1, y.shape[-1])
    pred = None if pred is None else pred.reshape(-1, pred.shape[-1])
    if rows is not None:
        rows = rows.to(x.device)
        x, y = x.index_select(0, rows), y.index_select(0, rows)
        pred = None if pred is None else pred.index_select(0, rows)
    if layer.in_features == 0:
        return fit_constant(layer, y)
    lf = LinearFit(layer)
    lf.add(x, y, pred)
    return lf.solve(damp)


@torch.no_grad()
def fit_constant(layer: nn.Linear, y: torch.Tensor) -> RefitStats:
    """The re-fit of a zero-width layer (a dropped branch): its bias becomes the mean target."""
    y = y.double()
    yy = y.pow(2).sum().clamp_min(torch.finfo(torch.float64).tiny)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(y[0])
    before = float((y - b).pow(2).sum() / yy)
    if layer.bias is None:
        return RefitStats(y.shape[0], before, before)
    mean = y.mean(0)
    layer.bias.data.copy_(mean.to(layer.bias.dtype))
    return RefitStats(y.shape[0], before, float((y - mean).pow(2).sum() / yy))


@torch.no_grad()
def refit_heads(model: nn.Module, pruned: nn.Module, x: torch.Tensor, xp: torch.Tensor, damp: float,
                refit_tokens: Optional[int], gen: torch.Generator, batch: int, stats: Dict[str, RefitStats]) -> None:
    """Re-fit what reads the final stream (an attention pool's kv, the classifier heads) to the original's
    outputs, from the pruned model's final hidden states."""
    head_fn = lambda m: (lambda t: m.forward_head(m.norm(t)))  # noqa: E731
    if getattr(pruned, 'attn_pool', None) is not None:  # the pool reads the pruned stream through kv: re-fit it first
        _, orig = run_captured(Call(head_fn(model)), x, {'kv': (model.attn_pool.kv, 'out')}, batch)
        _, new = run_captured(Call(head_fn(pruned)), xp, {'kv': (pruned.attn_pool.kv, 'in')}, batch)
        rows = token_subset(orig['kv'].shape[0] * orig['kv'].shape[1], refit_tokens, gen)
        stats['attn_pool.kv'] = fit(pruned.attn_pool.kv, new['kv'], orig['kv'], rows, damp)
    names = [n for n in ('head', 'head_dist') if isinstance(getattr(model, n, None), nn.Linear)]
    if not names:
        return
    _, orig = run_captured(Call(head_fn(model)), x, {n: (getattr(model, n), 'out') for n in names}, batch)
    _, new = run_captured(Call(head_fn(pruned)), xp, {n: (getattr(pruned, n), 'in') for n in names}, batch)
    for n in names:
        rows = token_subset(new[n].shape[:-1].numel(), refit_tokens, gen)  # (B, C) pooled, (B, N, C) with no pooling
        stats[n] = fit(getattr(pruned, n), new[n], orig[n], rows, damp)
