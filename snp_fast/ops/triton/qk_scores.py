"""Q/K attention-score preservation scores as one Triton kernel, GPU-resident (issue 21).

Reference: snp_fast.ops.reference.qk_scores_literal (the N×N SVD, the definition) and qk_scores_dxd (the
d×d route in plain torch). Per image b and head h, with Q, K the (N, d) queries and keys,
S = Q Kᵀ = Σ_j σ_j u_j v_jᵀ and filter pair i scores Σ_{j<γ, σ_j > 1e-4 σ_1} |cos(u_j, q_i) cos(v_j, k_i)|,
summed over the images: (H, d) float32.

Kernel: one program per (image, head); everything stays in registers (and the shared memory that
tl.gather uses), nothing goes back to the host:
  1. the Grams G_q = QᵀQ, G_k = KᵀK by tl.dot over BLOCK_N tokens at a time (float64 accumulators);
  2. R with RᵀR = G_q by pivoted Cholesky, pivoting and stopping on the column-scaled residuals
     (1e-12 of each filter's own squared norm), as the CPU kernel (csrc/cpu/qk_scores_cpu.cpp) does;
  3. B = R G_k Rᵀ (d×d, eigenvalues σ_j²; left singular vectors u_j = A x_j for Q = A R) and P = R G_k;
  4. the eigenpairs of B by cyclic Jacobi in round-robin ("circle method") order: each of the D − 1
     rounds of a sweep rotates D/2 disjoint pairs at once, as one vectorised update of the whole D×D
     matrix (A' = Jᵀ A J from A, its row- and column-permuted copies by tl.gather) and of V (V J);
     sweeps until max|offdiag| ≤ 1e-14 max|diag| (at most MAX_SWEEPS);
  5. cos(u_j, q_i) = (x_jᵀ R)_i / ‖q_i‖, cos(v_j, k_i) = (x_jᵀ P)_i / (σ_j ‖k_i‖); the top-γ eigenvalues by
     rank (no sort), σ_j² > 1e-8 σ_1²; the per-image scores go to a (B, H, D) buffer summed by torch.

Dispatch: the "triton" backend of qk_scores on CUDA tensors (and what backend="auto" takes there, ahead
of the compiled hybrid); not offered on CPU tensors, where the interpreter would need hours for a prune
(the tests call qk_scores_triton directly).

Why this method. The problems are small (d ≤ 128), many (24,576 per ViT-L prune with 64 images) and
symmetric; all eigenvectors can be needed (γ = d). Jacobi is the batched method whose every step is a
whole-matrix vector operation: a parallel-ordered round touches all D² entries at once, with no
sequential scalar chain (the CPU kernel's Householder + implicit QL + inverse iteration is a chain of
dependent scalar steps, which a Triton program, one SIMD block per problem, cannot run efficiently),
and it converges quadratically (6-10 sweeps in fp64 on these inputs) with high relative accuracy for
the small eigenvalues. Rotations are applied elementwise from gathered copies (O(D²) per round, a
shared-memory shuffle) rather than by tl.dot with the rotation matrix (O(D³) per round, 64× the
arithmetic at D = 64).

Why float64. The threshold σ_j > 1e-4 σ_1 is σ_j² > 1e-8 σ_1² on the eigenvalues of B, which float32
(ε = 1.2e-7) cannot resolve: a float32 B has absolute rounding ~1e-7 σ_1², so components near the cut
and the singular vectors of the small σ_j would be noise. The Grams and the d×d work therefore run in
float64 (the inputs are read in their own dtype); on an H100/H200 float64 runs at half the float32 rate
(67 TFLOP/s on tensor cores), and the whole kernel is ~1 % of the float64 peak per prune
(BENCHMARKS.md). On GPUs with a 1/64 float64 rate (consumer parts) it would be much slower.
"""
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .. import reference
from ..dispatch import has_kernel, register

__all__ = ['qk_scores_triton', 'MAX_D', 'MAX_D_GPU', 'num_warps']

MAX_D = 128            # head dims the kernel takes; larger ones go to the compiled op / the d×d reference
# On a GPU only d ≤ 64 for now: at D = 128 the kernel needs 448 KiB of shared memory (the tl.gather
# shuffles and the D×D float64 dot operands), over an H100/H200's 227 KiB per block; those heads take
# the compiled hybrid. (Under the interpreter, which has no such limit, the kernel is tested up to 128.)
MAX_D_GPU = 64
MAX_SWEEPS = 30        # Jacobi sweeps at most (6-10 needed at d ≤ 128; the cap only bounds a pathological case)
JACOBI_TOL = 1e-14     # converged when max|B_ij| (i ≠ j) ≤ JACOBI_TOL · max|B_ii|
PIVOT_RTOL = 1e-12     # the pivoted Cholesky stops below this fraction of a filter's own squared norm
SIGMA2_RTOL = 1e-8     # σ_j² > SIGMA2_RTOL σ_1²: reference.singular_value_rtol(float32)²
LR_STEPS = 1           # Cholesky-LR steps before Jacobi (BENCHMARKS.md: sweeps and error by LR_STEPS)
LR_RTOL = 1e-14        # their pivoted Cholesky's stop (what is dropped is below Jacobi's own tolerance)


@triton.jit
def _pivoted_cholesky(g, diag, n, D: tl.constexpr, RTOL: tl.constexpr):
    """Rows of R (D×D, row r = the r-th pivot's, columns in g's order; zero rows past the rank) with
    RᵀR = g up to what is dropped: right-looking, pivoting on and stopping at the residual of each column
    relative to its own diagonal (RTOL), as the CPU kernel's pivoted_cholesky (csrc/cpu/qk_scores_cpu.cpp)."""
    rows = tl.arange(0, D)
    cols = tl.arange(0, D)
    s_res = g
    dres = diag
    inv_diag = tl.where(diag > 0, 1.0 / tl.where(diag > 0, diag, 1.0), 0.0)
    done = cols < 0
    r_mat = tl.zeros((D, D), dtype=tl.float64)
    for r in range(0, n):
        score = tl.where(done, -1.0, dres * inv_diag)
        best = tl.max(score, axis=0)
        p = tl.argmax(score, axis=0)                        # first of equal maxima, as the CPU kernel
        ok = (tl.zeros((D,), dtype=tl.float64) + best) > RTOL   # (as a vector: the interpreter's
        piv = tl.sum(tl.where(cols == p, dres, 0.0), axis=0)    # scalar-bool & vector-bool fails)
        sp = tl.sqrt(tl.where(best > RTOL, piv, 1.0))
        srow = tl.sum(tl.where(rows[:, None] == p, s_res, 0.0), axis=0)   # residual row p
        row = tl.where(done, 0.0, srow / sp)
        row = tl.where(cols == p, sp, row)
        row = tl.where(ok, row, 0.0)
        r_mat = tl.where(rows[:, None] == r, row[None, :], r_mat)
        s_res = s_res - row[:, None] * row[None, :]
        dres = dres - row * row
        done = done | ((cols == p) & ok)
    return r_mat


@triton.jit
def _qk_scores_kernel(q_ptr, k_ptr, out_ptr, sweeps_ptr, H, N, d, gamma,
                      sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
                      D: tl.constexpr, BLOCK_N: tl.constexpr, MAX_SWEEPS: tl.constexpr,
                      JACOBI_TOL: tl.constexpr, PIVOT_RTOL: tl.constexpr, SIGMA2_RTOL: tl.constexpr,
                      LR_STEPS: tl.constexpr, LR_RTOL: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    rows = tl.arange(0, D)
    cols = tl.arange(0, D)
    eye = rows[:, None] == cols[None, :]

    # 1. Grams (float64), BLOCK_N tokens at a time
    tok = tl.arange(0, BLOCK_N)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    gq = tl.zeros((D, D), dtype=tl.float64)
    gk = tl.zeros((D, D), dtype=tl.float64)
    for n0 in range(0, N, BLOCK_N):
        t = (n0 + tok).to(tl.int64)
        m = (t[:, None] < N) & (cols[None, :] < d)
        qt = tl.load(q_base + t[:, None] * sq_n + cols[None, :] * sq_d, mask=m, other=0.0).to(tl.float64)
        kt = tl.load(k_base + t[:, None] * sk_n + cols[None, :] * sk_d, mask=m, other=0.0).to(tl.float64)
        gq += tl.dot(tl.trans(qt), qt)
        gk += tl.dot(tl.trans(kt), kt)
    qn2 = tl.sum(tl.where(eye, gq, 0.0), axis=0)          # ‖q_i‖², (D,) by filter
    kn2 = tl.sum(tl.where(eye, gk, 0.0), axis=0)

    # 2. pivoted Cholesky RᵀR = G_q (rows of R in pivot order, columns in filter order)
    r_mat = _pivoted_cholesky(gq, qn2, d, D, PIVOT_RTOL)

    # 3. B = R G_k Rᵀ (symmetrised), P = R G_k; then LR_STEPS Cholesky-LR steps B = LᵀL -> L Lᵀ (pivoted:
    #    the similar matrix is graded and nearly diagonal, so that Jacobi needs fewer sweeps); E collects
    #    Lᵀ ⋯ so that the eigenvectors of B are the normalised columns of E Y (Y: those of the last matrix)
    p_mat = tl.dot(r_mat, gk)
    a = tl.dot(p_mat, tl.trans(r_mat))
    a = 0.5 * (a + tl.trans(a))
    e_mat = tl.where(eye, 1.0, 0.0).to(tl.float64)
    for _ in tl.static_range(LR_STEPS):
        l_mat = _pivoted_cholesky(a, tl.sum(tl.where(eye, a, 0.0), axis=0), d, D, LR_RTOL)
        e_mat = tl.dot(e_mat, tl.trans(l_mat))
        a = tl.dot(l_mat, tl.trans(l_mat))
        a = 0.5 * (a + tl.trans(a))

    # 4. cyclic Jacobi, round-robin order: round r pairs i with (2r − i) mod (D − 1), and D − 1 with the
    #    index left over (r); every pair meets once in the D − 1 rounds of a sweep
    v = tl.where(eye, 1.0, 0.0).to(tl.float64)
    off = tl.max(tl.max(tl.where(eye, 0.0, tl.abs(a)), axis=1), axis=0)
    scale = tl.max(tl.abs(tl.sum(tl.where(eye, a, 0.0), axis=1)), axis=0)
    sweep = 0
    while (sweep < MAX_SWEEPS) & (off > JACOBI_TOL * scale):
        for r in range(0, D - 1):
            other = (2 * r - rows + (D - 1)) % (D - 1)
            pv = tl.where(rows == D - 1, r, tl.where(other == rows, D - 1, other))
            idx_r = tl.broadcast_to(pv[:, None], (D, D))
            idx_c = tl.broadcast_to(pv[None, :], (D, D))
            a_r = tl.gather(a, idx_r, 0)                    # a[p_i, j]
            a_c = tl.gather(a, idx_c, 1)                    # a[i, p_j]
            a_rc = tl.gather(a_r, idx_c, 1)                 # a[p_i, p_j]
            d_i = tl.sum(tl.where(eye, a, 0.0), axis=1)
            d_p = tl.sum(tl.where(eye, a_rc, 0.0), axis=1)
            apq = 0.5 * (tl.sum(tl.where(eye, a_c, 0.0), axis=1) + tl.sum(tl.where(eye, a_r, 0.0), axis=1))
            lo = rows < pv
            app = tl.where(lo, d_i, d_p)
            aqq = tl.where(lo, d_p, d_i)
            nz = apq != 0
            theta = (aqq - app) / (2.0 * tl.where(nz, apq, 1.0))
            t = tl.where(theta >= 0, 1.0, -1.0) / (tl.abs(theta) + tl.sqrt(theta * theta + 1.0))
            t = tl.where(nz, t, 0.0)
            c = 1.0 / tl.sqrt(t * t + 1.0)
            s = tl.where(lo, -(t * c), t * c)
            a = (c[:, None] * c[None, :]) * a + (c[:, None] * s[None, :]) * a_c \
                + (s[:, None] * c[None, :]) * a_r + (s[:, None] * s[None, :]) * a_rc
            v = v * c[None, :] + tl.gather(v, idx_c, 1) * s[None, :]
        a = 0.5 * (a + tl.trans(a))
        off = tl.max(tl.max(tl.where(eye, 0.0, tl.abs(a)), axis=1), axis=0)
        scale = tl.max(tl.abs(tl.sum(tl.where(eye, a, 0.0), axis=1)), axis=0)
        sweep += 1

    # 5. top-γ eigenpairs (by rank, ties to the lower index) above the σ threshold, then the scores
    lam = tl.sum(tl.where(eye, a, 0.0), axis=0)             # eigenvalue j (column j of v)
    lam1 = tl.max(lam, axis=0)
    before = (lam[:, None] > lam[None, :]) | ((lam[:, None] == lam[None, :]) & (rows[:, None] < cols[None, :]))
    rank = tl.sum(before.to(tl.int32), axis=0)
    sel = (rank < gamma) & (lam > SIGMA2_RTOL * lam1)   # (padded components: λ = 0, never rotated in)
    inv_sigma = tl.where(sel, 1.0 / tl.sqrt(tl.where(sel, lam, 1.0)), 0.0)   # (D,) by component j
    if LR_STEPS > 0:
        v = tl.dot(e_mat, v)                                # eigenvectors of B, up to their norms
        vn = tl.sqrt(tl.sum(v * v, axis=0))
        v = v / tl.where(vn > 0, vn, 1.0)[None, :]
    cu = tl.dot(tl.trans(v), r_mat)                         # [j, i] = x_jᵀ r_i
    cv = tl.dot(tl.trans(v), p_mat)                         # [j, i] = x_jᵀ (R G_k)_i = σ_j ‖k_i‖ cos(v_j, k_i)
    terms = tl.abs(cu * cv) * inv_sigma[:, None]
    omega = tl.sum(terms, axis=0)                           # (D,) by filter i
    nrm = tl.sqrt(qn2) * tl.sqrt(kn2)
    omega = tl.where(nrm > 0, omega / tl.where(nrm > 0, nrm, 1.0), 0.0)
    tl.store(out_ptr + pid.to(tl.int64) * D + cols, omega)
    tl.store(sweeps_ptr + pid, sweep)


def num_warps(D: int) -> int:
    """Warps per program for the padded head dim D (the D×D float64 matrices spread over more threads)."""
    return 4 if D <= 32 else (8 if D <= 64 else 16)


def _launch(q: torch.Tensor, k: torch.Tensor, gamma: int, *, block_n: int, max_sweeps: int,
            lr_steps: int = LR_STEPS):
    """(scores (H, d) float32, Jacobi sweeps per (image, head) (B, H) int32), both on q's device."""
    B, H, N, d = q.shape
    D = max(16, triton.next_power_of_2(d))
    per_task = torch.empty(B, H, D, device=q.device, dtype=torch.float64)
    sweeps = torch.zeros(B, H, device=q.device, dtype=torch.int32)
    if B * H:
        _qk_scores_kernel[(B * H,)](
            q, k, per_task, sweeps, H, N, d, gamma, *q.stride(), *k.stride(),
            D=D, BLOCK_N=block_n, MAX_SWEEPS=max_sweeps, JACOBI_TOL=JACOBI_TOL, PIVOT_RTOL=PIVOT_RTOL,
            SIGMA2_RTOL=SIGMA2_RTOL, LR_STEPS=lr_steps, LR_RTOL=LR_RTOL, num_warps=num_warps(D))
    return per_task.sum(0)[:, :d].float(), sweeps


@register('qk_scores', 'triton')
def qk_scores_triton(q: torch.Tensor, k: torch.Tensor, gamma: int, *, block_n: int = 32,
                     max_sweeps: int = MAX_SWEEPS) -> torch.Tensor:
    """Q/K scores of (B, H, N, d) q and k (any float dtype and strides) as (H, d) float32 on their device.

    Head dims above MAX_D (128; on a GPU MAX_D_GPU, 64: shared memory) are not taken by the kernel: those
    go to the compiled op (torch.ops.snp_fast.qk_scores: the hybrid on CUDA) where it is loaded, else to
    the d×d reference.

    Args:
        q, k: queries and keys, (B, H, N, d), equal shapes.
        gamma: leading singular components of QKᵀ to preserve (>= 1; capped at min(N, d) by the rank).
        block_n: tokens per step of the Gram loop (>= 16, a power of two).
        max_sweeps: Jacobi sweeps at most (tests lower it to show that an unconverged kernel is caught).
    """
    reference.check_qk(q, k, gamma)  # shapes, gamma, NaN/Inf (one device-to-host flag, as every backend)
    if q.shape[-1] > (MAX_D_GPU if q.is_cuda else MAX_D):
        return _fallback(q, k, gamma)
    if q.shape[-1] == 0:
        return torch.zeros(q.shape[1], 0, device=q.device)
    try:
        return _launch(q, k, gamma, block_n=block_n, max_sweeps=max_sweeps)[0]
    except OutOfResources as e:  # a GPU with less shared memory per block than the kernel needs (128 KiB at
        if q.device.type not in _warned:  # D = 64: consumer Ampere / Ada parts have ~100 KiB)
            _warned.add(q.device.type)
            warnings.warn(f'snp_fast: the Triton Q/K kernel does not fit this GPU ({e}); using the compiled '
                          'qk_scores instead', stacklevel=2)
        return _fallback(q, k, gamma)


_warned: set = set()


def _fallback(q: torch.Tensor, k: torch.Tensor, gamma: int) -> torch.Tensor:
    """The compiled op (the hybrid on CUDA) where it is loaded, else the d×d reference."""
    if has_kernel('qk_scores', q.device.type.upper()):
        return torch.ops.snp_fast.qk_scores(q, k, gamma)
    return reference.qk_scores_dxd(q, k, gamma)
