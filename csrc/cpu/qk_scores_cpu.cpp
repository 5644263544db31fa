// Q/K attention-score preservation scores on the CPU (docs/METHOD.md, "Criteria"), never forming the N×N matrix.
//
// Per (image, head), with Q, K the (N, d) queries and keys, S = Q Kᵀ = Σ_j σ_j u_j v_jᵀ and
//     ω_i = Σ_{j<γ, σ_j > 1e-4 σ_1} |cos(u_j, q_i) · cos(v_j, k_i)|.
// Route (everything after the Grams is d×d work in float64, one matrix per task of at::parallel_for):
//   1. G_q = QᵀQ, G_k = KᵀK in float64: per task by torch's BLAS dsyrk when it exports one (blas.h),
//      else by batched GEMM (images processed in chunks to bound memory); or given (qk_scores_grams).
//      The d×d products below go to torch's dgemm when found (blas.h), else to plain loops.
//   2. R with RᵀR = G_q by pivoted Cholesky (r × d, r = numerical rank of Q), pivoting and stopping on
//      the column-scaled residuals (a column joins while what is left of it exceeds 1e-12 of its own
//      squared norm), so that the result does not depend on the filters' scales: one filter 10⁶× louder
//      than the rest must not hide the others' directions.
//      Then Q = A R with A orthonormal, and S Sᵀ = A (R G_k Rᵀ) Aᵀ: the left singular vectors of S
//      are u_j = A x_j with x_j the eigenvectors of the r×r matrix B = R G_k Rᵀ, eigenvalues σ_j².
//   3. cos(u_j, q_i) = (x_jᵀ R)_i / ‖q_i‖ and, since v_j = Sᵀu_j/σ_j,
//      cos(v_j, k_i) = (x_jᵀ R G_k)_i / (σ_j ‖k_i‖): only R (not a root of G_k) is needed.
//   4. The top eigenpairs of B: Householder tridiagonalisation, all eigenvalues by implicit QL
//      (no vectors; the QL iterations of kGroup tasks run interleaved, one rotation of each in turn,
//      since each is a chain of dependent sqrt/div), then only the needed eigenvectors by inverse
//      iteration on the tridiagonal (re-orthogonalised within clusters, as LAPACK's dstein),
//      back-transformed by the reflectors.
// Squaring (B has eigenvalues σ²) costs nothing here: the σ threshold is σ_j² > 1e-8 σ_1², eight
// orders above float64 rounding of B. The thresholds are those of snp_fast/ops/reference.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "blas.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// One build runs everywhere; the hot d×d code gets an AVX-512 and an AVX2 clone chosen at load time.
#define SNP_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SNP_MULTIVERSION
#endif
#define SNP_INLINE inline __attribute__((always_inline))

namespace {

constexpr double kSigmaRtol = 1e-4;      // reference.singular_value_rtol(float32)
constexpr double kPivotRtol = 1e-12;     // pivoted Cholesky stops below this fraction of max diag

// Dot product; the simd reduction lets the compiler vectorise it (strict IEEE order would not).
SNP_INLINE double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[j0, j0 + W) = y0[...] + scale Σ_{t<T} a[t·a_stride] X[t·ldx + j0 ...] for one block of W columns, summed
// in registers: the plain order (one axpy into y per t) makes each step wait for the previous step's store.
template <int64_t W>
SNP_INLINE void sum_rows_block(double* y, const double* y0, double scale, const double* a, int64_t a_stride,
                               const double* X, int64_t ldx, int64_t T, int64_t j0) {
  double acc[W] = {};
  for (int64_t t = 0; t < T; ++t) {
    const double c = a[t * a_stride];
    const double* x = X + t * ldx + j0;
#pragma omp simd
    for (int64_t jj = 0; jj < W; ++jj) acc[jj] += c * x[jj];
  }
  for (int64_t jj = 0; jj < W; ++jj) y[j0 + jj] = (y0 != nullptr ? y0[j0 + jj] : 0.0) + scale * acc[jj];
}

// y = y0 + scale Σ_{t<T} a[t·a_stride] X[t, :n] (X row-major with row stride ldx; y0 may be null = 0).
SNP_INLINE void sum_rows(double* y, const double* y0, double scale, const double* a, int64_t a_stride, const double* X,
                         int64_t ldx, int64_t T, int64_t n) {
  int64_t j0 = 0;
  for (; j0 + 32 <= n; j0 += 32) sum_rows_block<32>(y, y0, scale, a, a_stride, X, ldx, T, j0);
  for (; j0 + 8 <= n; j0 += 8) sum_rows_block<8>(y, y0, scale, a, a_stride, X, ldx, T, j0);
  for (; j0 < n; ++j0) sum_rows_block<1>(y, y0, scale, a, a_stride, X, ldx, T, j0);
}

// Row-major C (M×N, row stride ldc) = op(A) op(B), op(A) M×K, op(B) K×N; a_t: A is stored K×M, b_t: B is
// stored N×K. torch's dgemm when found (~70 GFLOP/s for 64×64 products on one AVX-512 core, several times
// these loops), else the loops.
SNP_INLINE void matmul_rm(snp_fast::blas::gemm_fn<double> gemm, bool a_t, bool b_t, int64_t M, int64_t N, int64_t K,
                          const double* A, int64_t lda, const double* Bm, int64_t ldb, double* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (gemm != nullptr && K > 0) {
    // row-major C read column-major is Cᵀ = op(B)ᵀ op(A)ᵀ, and so are A and B: swap them, keep the flags
    const double one = 1, zero = 0;
    gemm(b_t ? "T" : "N", a_t ? "T" : "N", &N, &M, &K, &one, Bm, &ldb, A, &lda, &zero, C, &ldc);
    return;
  }
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = 0;
    for (int64_t l = 0; l < K; ++l) {
      const double a = a_t ? A[l * lda + i] : A[i * lda + l];
      if (a == 0) continue;
      if (b_t) {
        for (int64_t j = 0; j < N; ++j) c[j] += a * Bm[j * ldb + l];
      } else {
        const double* b = Bm + l * ldb;
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      }
    }
  }
}

// Work arrays for one matrix of head dim d (kGroup of them allocated once per parallel chunk).
struct Work {
  explicit Work(int64_t d)
      : gemm(snp_fast::blas::dgemm()),
        R(d * d), C(d * d), A(d * d), V(d * d), Z(d * d), Zt(d * d), P(d * d), Pk(d * d), u1(d * d), u2(d * d),
        mult(d * d), sw(d * d), ip(d * d), beta(d), diag(d), off(d), lam(d), dres(d), x(d), shift(d), cd(d), cs(d),
        done(d), cluster(d), e2(d), qn2(d), kn2(d), inv_diag(d) {}
  snp_fast::blas::gemm_fn<double> gemm;
  std::vector<double> R, C, A, V, Z, Zt, P, Pk, u1, u2, mult, sw, ip;
  std::vector<double> beta, diag, off, lam, dres, x, shift, cd, cs;
  std::vector<char> done;
  std::vector<int64_t> cluster;
  std::vector<double> e2, qn2, kn2;  // QL scratch; diagonals of G_q, G_k (squared norms of q_i, k_i)
  std::vector<double> inv_diag;      // 1 / G_q[j, j] (0 for a zero column): the pivoted Cholesky's scaling
  int64_t n = 0;                     // rank of Q: order of B
  double tscale = 1;                 // the scale of the tridiagonal copy in lam, e2
};

// Pivoted Cholesky, rows of R (row-major r × d, original column order): RᵀR = G up to the dropped
// Schur complement. Returns r. Pivots and stop are those of the unit-diagonal D⁻¹GD⁻¹ (D² = diag G), whose
// factor is R D⁻¹: the residual of column j is compared with G[j, j], not with the largest column.
SNP_INLINE int64_t pivoted_cholesky(const double* G, int64_t d, Work& w) {
  double* R = w.R.data();
  double* dres = w.dres.data();
  double* inv_diag = w.inv_diag.data();
  char* done = w.done.data();
  for (int64_t j = 0; j < d; ++j) {
    dres[j] = G[j * d + j];
    done[j] = 0;
    inv_diag[j] = dres[j] > 0 ? 1.0 / dres[j] : 0.0;
  }
  int64_t r = 0;
  for (; r < d; ++r) {
    int64_t p = -1;
    double best = kPivotRtol;
    for (int64_t j = 0; j < d; ++j)
      if (!done[j] && dres[j] * inv_diag[j] > best) { best = dres[j] * inv_diag[j]; p = j; }
    if (p < 0) break;
    const double piv = dres[p];
    double* rs = R + r * d;
    sum_rows(rs, G + p * d, -1.0, R + p, d, R, d, r, d);  // G[p, :] − Σ_t R[t, p] R[t, :]
    const double sp = std::sqrt(piv), inv = 1.0 / sp;
    for (int64_t j = 0; j < d; ++j) rs[j] = done[j] ? 0.0 : rs[j] * inv;
    rs[p] = sp;
    done[p] = 1;
    for (int64_t j = 0; j < d; ++j) dres[j] -= rs[j] * rs[j];
  }
  return r;
}

// Householder tridiagonalisation of the symmetric n×n matrix A (row-major, full storage, destroyed):
// A = H_0 ⋯ H_{n-3} T H_{n-3} ⋯ H_0, H_k = I − β_k v_k v_kᵀ acting on indices k+1..n−1 (v_k in row k of V).
SNP_INLINE void tridiagonalize(double* A, int64_t n, Work& w) {
  double* V = w.V.data();
  double* beta = w.beta.data();
  double* diag = w.diag.data();
  double* off = w.off.data();
  double* p = w.x.data();  // scratch of length n
  for (int64_t k = 0; k + 2 < n; ++k) {
    const int64_t m = n - k - 1;
    double* ak = A + k * n + k + 1;  // row k right of the diagonal = column k below it
    double* v = V + k * n + k + 1;
    const double s2 = dot(ak + 1, ak + 1, m - 1);
    diag[k] = A[k * n + k];
    if (s2 == 0) {  // already tridiagonal in this column
      off[k] = ak[0];
      beta[k] = 0;
      continue;
    }
    const double x0 = ak[0];
    const double nrm = std::sqrt(x0 * x0 + s2);
    const double alpha = x0 >= 0 ? -nrm : nrm;
    for (int64_t i = 0; i < m; ++i) v[i] = ak[i];
    v[0] -= alpha;
    const double vtv = v[0] * v[0] + s2;
    const double b = 2.0 / vtv;
    beta[k] = b;
    off[k] = alpha;
    // trailing block A22 (rows/cols k+1..n-1): p = b A22 v, w = p − (b/2)(pᵀv) v, A22 −= v wᵀ + w vᵀ
    double* A22 = A + (k + 1) * n + (k + 1);
    sum_rows(p, nullptr, b, v, 1, A22, n, m, m);  // p = b A22 v as a sum of rows (A22 is symmetric)
    const double K = 0.5 * b * dot(p, v, m);
    for (int64_t i = 0; i < m; ++i) p[i] -= K * v[i];
    for (int64_t i = 0; i < m; ++i) {
      double* row = A22 + i * n;
      const double vi = v[i], wi = p[i];
      for (int64_t j = 0; j < m; ++j) row[j] -= vi * p[j] + wi * v[j];
    }
  }
  if (n >= 2) {
    diag[n - 2] = A[(n - 2) * n + (n - 2)];
    off[n - 2] = A[(n - 2) * n + (n - 1)];
  }
  if (n >= 1) diag[n - 1] = A[(n - 1) * n + (n - 1)];
  if (n >= 1) off[n - 1] = 0;
}

// All eigenvalues of symmetric tridiagonals (d, e) by implicit QL with Wilkinson-type shifts (no
// vectors), d overwritten with them, e destroyed. Each QL sweep is one long chain of dependent
// sqrt/div; a QLJob is one matrix's iteration, resumable after every rotation, so that tql_values_multi
// can advance several independent matrices in turn and the core overlaps their chains.
struct QLJob {
  enum State { kSearch, kSweep, kDone, kFailed };
  double* d = nullptr;
  double* e = nullptr;
  int64_t n = 0, l = 0, m = 0, i = 0;  // eigenvalue l is being found; a sweep runs from m − 1 down to l, now at i
  int iter = 0;
  double s = 1, c = 1, p = 0, g = 0;
  State state = kDone;

  void reset(double* d_, double* e_, int64_t n_) {
    d = d_, e = e_, n = n_, l = 0, iter = 0;
    if (n > 0) e[n - 1] = 0;
    state = kSearch;
  }

  // Deflate converged eigenvalues, then set up the next sweep (or finish).
  SNP_INLINE void search() {
    while (l < n) {
      for (m = l; m < n - 1; ++m) {
        const double dd = std::fabs(d[m]) + std::fabs(d[m + 1]);
        if (std::fabs(e[m]) <= DBL_EPSILON * dd) break;
      }
      if (m == l) {
        ++l;
        iter = 0;
        continue;
      }
      if (iter++ == 60) {
        state = kFailed;
        return;
      }
      g = (d[l + 1] - d[l]) / (2.0 * e[l]);
      const double r = std::sqrt(g * g + 1.0);
      g = d[m] - d[l] + e[l] / (g + (g >= 0 ? r : -r));
      s = c = 1.0;
      p = 0.0;
      i = m - 1;
      state = kSweep;
      return;
    }
    state = kDone;
  }

  // One rotation of the sweep.
  SNP_INLINE void rotate() {
    const double f = s * e[i], b = c * e[i];
    double r = std::sqrt(f * f + g * g);  // T is scaled to norm ~1: no overflow
    e[i + 1] = r;
    if (r == 0.0) {  // underflow: split the matrix here and search again
      d[i + 1] -= p;
      e[m] = 0.0;
      state = kSearch;
      return;
    }
    s = f / r;
    c = g / r;
    const double gi = d[i + 1] - p;
    r = (d[i] - gi) * s + 2.0 * c * b;
    p = s * r;
    d[i + 1] = gi + p;
    g = c * r - b;
    if (--i < l) {
      d[l] -= p;
      e[l] = g;
      e[m] = 0.0;
      state = kSearch;
    }
  }
};

// Runs the jobs to the end, one rotation of each in turn. Returns false if an eigenvalue did not converge.
SNP_INLINE bool tql_values_multi(QLJob* jobs, int64_t count) {
  bool active = true;
  while (active) {
    active = false;
    for (int64_t k = 0; k < count; ++k) {
      QLJob& j = jobs[k];
      if (j.state == QLJob::kSweep) {
        j.rotate();
      } else if (j.state == QLJob::kSearch) {
        j.search();
      } else {
        continue;
      }
      active = true;
    }
  }
  for (int64_t k = 0; k < count; ++k)
    if (jobs[k].state == QLJob::kFailed) return false;
  return true;
}

// LU with partial pivoting of T − λ_j I for m shifts at once (as LAPACK dlagtf, branch-free so that
// the loop over shifts vectorises): factors stored [i][j]; U has two superdiagonals; pivots smaller
// than `pert` are replaced by ±pert (T − λ_j I is singular to working precision by construction) and
// stored inverted.
SNP_INLINE void tri_lu_multi(const double* d, const double* e, int64_t n, const double* lam, int64_t m, double pert,
                             Work& w) {
  double *u1 = w.u1.data(), *u2 = w.u2.data(), *mult = w.mult.data(), *sw = w.sw.data(), *ip = w.ip.data();
  double* cd = w.cd.data();
  double* cs = w.cs.data();
  auto inv_piv = [pert](double u) { return 1.0 / (std::fabs(u) >= pert ? u : (u >= 0 ? pert : -pert)); };
  const double e0 = n > 1 ? e[0] : 0.0;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) { cd[j] = d[0] - lam[j]; cs[j] = e0; }
  for (int64_t i = 0; i + 1 < n; ++i) {
    const double sub = e[i], b1 = i + 2 < n ? e[i + 1] : 0.0, di1 = d[i + 1];
    double *U1 = u1 + i * m, *U2 = u2 + i * m, *M = mult + i * m, *S = sw + i * m, *IP = ip + i * m;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const double c = cd[j], t = cs[j], a1 = di1 - lam[j];
      const bool swp = std::fabs(c) < std::fabs(sub);
      const double num = swp ? c : sub, den = swp ? sub : c;
      const double mu = den != 0 ? num / den : 0.0;
      IP[j] = inv_piv(swp ? sub : c);
      U1[j] = swp ? a1 : t;
      U2[j] = swp ? b1 : 0.0;
      M[j] = mu;
      S[j] = swp ? 1.0 : 0.0;
      cd[j] = swp ? t - mu * a1 : a1 - mu * t;
      cs[j] = swp ? -mu * b1 : b1;
    }
  }
  double* IP = ip + (n - 1) * m;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) IP[j] = inv_piv(cd[j]);
}

// Solve (T − λ_j I) y_j = x_j in place for the m columns of X ([i][j] layout) with tri_lu_multi's factors.
SNP_INLINE void tri_solve_multi(double* X, int64_t n, int64_t m, const Work& w) {
  const double *u1 = w.u1.data(), *u2 = w.u2.data(), *mult = w.mult.data(), *sw = w.sw.data(), *ip = w.ip.data();
  for (int64_t i = 0; i + 1 < n; ++i) {
    double *x0 = X + i * m, *x1 = X + (i + 1) * m;
    const double *M = mult + i * m, *S = sw + i * m;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const double a = x0[j], b = x1[j];
      const bool swp = S[j] != 0;
      const double na = swp ? b : a, nb = swp ? a : b;
      x0[j] = na;
      x1[j] = nb - M[j] * na;
    }
  }
  for (int64_t i = n - 1; i >= 0; --i) {
    double* x = X + i * m;
    const double* IP = ip + i * m;
    if (i + 2 < n) {
      const double *x1 = X + (i + 1) * m, *x2 = X + (i + 2) * m, *U1 = u1 + i * m, *U2 = u2 + i * m;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) x[j] = (x[j] - U1[j] * x1[j] - U2[j] * x2[j]) * IP[j];
    } else if (i + 1 < n) {
      const double *x1 = X + (i + 1) * m, *U1 = u1 + i * m;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) x[j] = (x[j] - U1[j] * x1[j]) * IP[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) x[j] *= IP[j];
    }
  }
}

// First half of the scores of one (image, head), gq, gk: d×d float64 Grams. Forms B = R G_k Rᵀ, its
// tridiagonal form, and a copy scaled to norm 1 in (lam, e2) for the eigenvalue iteration; returns false
// when there is nothing to score (Q or B zero).
SNP_MULTIVERSION bool qk_reduce(const double* gq, const double* gk, int64_t d, Work& w) {
  for (int64_t i = 0; i < d; ++i) {
    w.qn2[i] = gq[i * d + i];
    w.kn2[i] = gk[i * d + i];
  }
  const int64_t r = pivoted_cholesky(gq, d, w);
  w.n = r;
  if (r == 0) return false;
  const double* R = w.R.data();
  // C = R G_k (r × d), then B = C Rᵀ (r × r, symmetric) into A
  double* C = w.C.data();
  matmul_rm(w.gemm, false, false, r, d, d, R, d, gk, d, C, d);
  double* A = w.A.data();
  matmul_rm(w.gemm, false, true, r, r, d, C, d, R, d, A, r);
  for (int64_t s = 0; s < r; ++s)
    for (int64_t t = s + 1; t < r; ++t) A[s * r + t] = A[t * r + s];  // symmetrise (B is symmetric in exact arithmetic)
  const int64_t n = r;
  tridiagonalize(A, n, w);
  // keep T for inverse iteration; eigenvalues from copies
  double tscale = 0;
  for (int64_t i = 0; i < n; ++i) tscale = std::max({tscale, std::fabs(w.diag[i]), std::fabs(w.off[i])});
  w.tscale = tscale;
  if (!(tscale > 0)) return false;
  for (int64_t i = 0; i < n; ++i) {
    w.lam[i] = w.diag[i] / tscale;
    w.e2[i] = w.off[i] / tscale;
  }
  return true;
}

// Second half, once lam holds the eigenvalues of the scaled tridiagonal: adds ω_i (i < d) to out.
SNP_MULTIVERSION void qk_finish(int64_t d, int64_t gamma, double* out, Work& w) {
  const int64_t n = w.n;
  const double* R = w.R.data();
  const double* C = w.C.data();
  double* lam = w.lam.data();
  for (int64_t i = 0; i < n; ++i) lam[i] *= w.tscale;
  std::sort(lam, lam + n, [](double a, double b) { return a > b; });
  const double lam1 = lam[0];
  if (!(lam1 > 0)) return;
  int64_t m = 0;  // eigenpairs that count: the first γ with σ_j > 1e-4 σ_1
  const double thr = kSigmaRtol * kSigmaRtol * lam1;
  while (m < std::min(gamma, n) && lam[m] > thr) ++m;
  // eigenvectors of T by inverse iteration, all m at once (columns of Zt, [i][j] layout), with
  // modified Gram-Schmidt inside clusters of close eigenvalues after every solve (as LAPACK dstein)
  const double* td = w.diag.data();
  const double* te = w.off.data();
  double tnorm = 0;
  for (int64_t i = 0; i < n; ++i)
    tnorm = std::max(tnorm, std::fabs(td[i]) + (i > 0 ? std::fabs(te[i - 1]) : 0.0) + (i + 1 < n ? std::fabs(te[i]) : 0.0));
  const double pert = DBL_EPSILON * tnorm;
  const double ortol = 1e-3 * tnorm;
  const double sep = 10 * DBL_EPSILON * tnorm;
  double* shift = w.shift.data();
  int64_t* cluster = w.cluster.data();  // first index of j's cluster
  for (int64_t j = 0; j < m; ++j) {
    shift[j] = lam[j];
    cluster[j] = j;
    if (j > 0) {
      if (shift[j - 1] - shift[j] <= ortol) cluster[j] = cluster[j - 1];
      if (shift[j] > shift[j - 1] - sep) shift[j] = shift[j - 1] - sep;  // separate (numerically) equal eigenvalues
    }
  }
  tri_lu_multi(td, te, n, shift, m, pert, w);
  double* Zt = w.Zt.data();
  double* Z = w.Z.data();  // rows: eigenvectors (length n)
  for (int64_t j = 0; j < m; ++j) {
    uint64_t state = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(j + 1);
    for (int64_t i = 0; i < n; ++i) {  // deterministic pseudo-random start in (-1, 1)
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      Zt[i * m + j] = static_cast<double>(state >> 11) * (2.0 / 9007199254740992.0) - 1.0;
    }
  }
  for (int it = 0; it < 2; ++it) {
    tri_solve_multi(Zt, n, m, w);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) Z[j * n + i] = Zt[i * m + j];
    for (int64_t j = 0; j < m; ++j) {
      double* z = Z + j * n;
      for (int64_t c = cluster[j]; c < j; ++c) {
        const double* zc = Z + c * n;
        const double proj = dot(zc, z, n);
        for (int64_t i = 0; i < n; ++i) z[i] -= proj * zc[i];
      }
      double nrm = std::sqrt(dot(z, z, n));
      if (!(nrm > 0)) { z[j % n] = 1; nrm = 1; }
      const double inv = 1.0 / nrm;
      for (int64_t i = 0; i < n; ++i) z[i] *= inv;
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) Zt[i * m + j] = Z[j * n + i];
  }
  // back-transform X = H_0 ⋯ H_{n-3} Z, applied to all m columns of Zt at once
  double* proj = w.cd.data();
  for (int64_t k = n - 3; k >= 0; --k) {
    const double b = w.beta[k];
    if (b == 0) continue;
    const double* v = w.V.data() + k * n + k + 1;
    double* zt = Zt + (k + 1) * m;
    const int64_t len = n - k - 1;
    for (int64_t j = 0; j < m; ++j) proj[j] = 0;
    for (int64_t i = 0; i < len; ++i) {
      const double vi = b * v[i];
      const double* row = zt + i * m;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) proj[j] += vi * row[j];
    }
    for (int64_t i = 0; i < len; ++i) {
      const double vi = v[i];
      double* row = zt + i * m;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) row[j] -= vi * proj[j];
    }
  }
  // P = Xᵀ R, Pk = Xᵀ C (m × d; X = Zt is n × m), then the scores
  double* P = w.P.data();
  double* Pk = w.Pk.data();
  matmul_rm(w.gemm, true, false, m, d, n, Zt, m, R, d, P, d);
  matmul_rm(w.gemm, true, false, m, d, n, Zt, m, C, d, Pk, d);
  double* acc = w.x.data();
  for (int64_t i = 0; i < d; ++i) acc[i] = 0;
  for (int64_t j = 0; j < m; ++j) {
    const double inv_sigma = 1.0 / std::sqrt(lam[j]);
    const double* pj = P + j * d;
    const double* pkj = Pk + j * d;
    for (int64_t i = 0; i < d; ++i) acc[i] += std::fabs(pj[i] * pkj[i]) * inv_sigma;
  }
  for (int64_t i = 0; i < d; ++i) {
    const double qn2 = w.qn2[i], kn2 = w.kn2[i];
    if (qn2 > 0 && kn2 > 0) out[i] += acc[i] / std::sqrt(qn2 * kn2);
  }
}

// true when no entry of g[0, n) is NaN or ±Inf (x·0 is 0 exactly for finite x)
bool all_finite(const double* g, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += g[i] * 0.0;
  return s == 0;
}

constexpr int64_t kGroup = 8;  // tasks whose eigenvalue iterations run interleaved (tql_values_multi)

// Scores of tasks [begin, end) (adds ω of task t to out[t·d ...]), in groups of kGroup. grams(t) returns
// task t's float64 Grams (G_q, G_k), valid until its next call.
template <typename Grams>
void score_tasks(int64_t begin, int64_t end, int64_t d, int64_t gamma, double* out, Grams&& grams) {
  std::vector<Work> work;
  work.reserve(kGroup);
  for (int64_t k = 0; k < kGroup; ++k) work.emplace_back(d);
  QLJob jobs[kGroup];
  int64_t task_of_job[kGroup];
  for (int64_t t0 = begin; t0 < end; t0 += kGroup) {
    const int64_t count = std::min(kGroup, end - t0);
    int64_t njobs = 0;
    for (int64_t k = 0; k < count; ++k) {
      const auto [gq, gk] = grams(t0 + k);
      TORCH_CHECK(all_finite(gq, d * d) && all_finite(gk, d * d), "qk_scores: q or k holds NaN or Inf values "
                  "(in (image, head) task ", t0 + k, ", counting image-major)");
      if (!qk_reduce(gq, gk, d, work[k])) continue;
      jobs[njobs].reset(work[k].lam.data(), work[k].e2.data(), work[k].n);
      task_of_job[njobs++] = k;
    }
    TORCH_CHECK(tql_values_multi(jobs, njobs), "qk_scores: tridiagonal QL iteration did not converge");
    for (int64_t j = 0; j < njobs; ++j) {
      const int64_t k = task_of_job[j];
      qk_finish(d, gamma, out + (t0 + k) * d, work[k]);
    }
  }
}

// Scores of the tasks of (T, d, d) Grams gq, gk (any float dtype), added to out[t·d ...].
void score_grams(const at::Tensor& gq, const at::Tensor& gk, int64_t gamma, double* out) {
  const auto a = gq.to(at::kDouble).contiguous(), b = gk.to(at::kDouble).contiguous();
  const int64_t d = a.size(-1);
  const double* ap = a.data_ptr<double>();
  const double* bp = b.data_ptr<double>();
  at::parallel_for(0, a.size(0), 1, [&](int64_t begin, int64_t end) {
    score_tasks(begin, end, d, gamma, out, [&](int64_t t) {
      return std::pair<const double*, const double*>(ap + t * d * d, bp + t * d * d);
    });
  });
}

at::Tensor qk_scores_cpu(const at::Tensor& q, const at::Tensor& k, int64_t gamma) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes(), "qk_scores: q and k must both be (B, H, N, d) with equal shapes, got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()) && at::isFloatingType(k.scalar_type()),
              "qk_scores: q and k must be floating point, got ", q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "qk_scores (CPU kernel): q and k must be CPU tensors");
  TORCH_CHECK(gamma >= 1, "qk_scores: gamma must be >= 1, got ", gamma);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  auto out64 = at::zeros({B, H, d}, q.options().dtype(at::kDouble));
  if (B == 0 || H == 0 || d == 0 || N == 0) return out64.sum(0).to(at::kFloat);
  const int64_t g = std::min({gamma, N, d});
  double* out = out64.data_ptr<double>();
  if (auto syrk = snp_fast::blas::dsyrk(); syrk != nullptr && N < (int64_t{1} << 31)) {
    // each task converts its own Q, K to float64 (no copy of the whole batch) and forms the two Grams by
    // syrk (half the products of a GEMM) while they are in cache
    const auto dtype = at::promote_types(q.scalar_type(), k.scalar_type());
    auto qc = q.to(dtype).contiguous(), kc = k.to(dtype).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "qk_scores_cpu", [&] {
      const scalar_t* qp = qc.data_ptr<scalar_t>();
      const scalar_t* kp = kc.data_ptr<scalar_t>();
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<double> xq(N * d), xk(N * d), gq(d * d), gk(d * d);
        score_tasks(begin, end, d, g, out, [&](int64_t t) {
          const scalar_t* qt = qp + t * N * d;
          const scalar_t* kt = kp + t * N * d;
          for (int64_t i = 0; i < N * d; ++i) {
            xq[i] = static_cast<double>(qt[i]);
            xk[i] = static_cast<double>(kt[i]);
          }
          snp_fast::blas::syrk_lower(syrk, xq.data(), N, d, d, gq.data());
          snp_fast::blas::syrk_lower(syrk, xk.data(), N, d, d, gk.data());
          for (int64_t i = 0; i < d; ++i) {
            for (int64_t j = i + 1; j < d; ++j) {
              gq[i * d + j] = gq[j * d + i];
              gk[i * d + j] = gk[j * d + i];
            }
          }
          return std::pair<const double*, const double*>(gq.data(), gk.data());
        });
      });
    });
    return out64.sum(0).to(at::kFloat);
  }
  // without syrk: batched GEMM Grams, images in chunks that bound the float64 copies to ~32 MiB each
  const int64_t per_image = H * N * d * static_cast<int64_t>(sizeof(double));
  const int64_t chunk = std::max<int64_t>(1, (int64_t{32} << 20) / std::max<int64_t>(per_image, 1));
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    auto qd = q.narrow(0, b0, nb).to(at::kDouble).reshape({nb * H, N, d});
    auto kd = k.narrow(0, b0, nb).to(at::kDouble).reshape({nb * H, N, d});
    score_grams(at::matmul(qd.transpose(1, 2), qd), at::matmul(kd.transpose(1, 2), kd), g, out + b0 * H * d);
  }
  return out64.sum(0).to(at::kFloat);
}

// The same scores from the Grams G_q = QᵀQ, G_k = KᵀK, (B, H, d, d) (used as float64): the d×d half of
// the route on its own, for Grams formed elsewhere (on a GPU: see qk_scores_hybrid).
at::Tensor qk_scores_grams_cpu(const at::Tensor& gq, const at::Tensor& gk, int64_t gamma) {
  TORCH_CHECK(gq.dim() == 4 && gq.sizes() == gk.sizes() && gq.size(2) == gq.size(3),
              "qk_scores_grams: gq and gk must both be (B, H, d, d) with equal shapes, got ", gq.sizes(), " and ",
              gk.sizes());
  TORCH_CHECK(at::isFloatingType(gq.scalar_type()) && at::isFloatingType(gk.scalar_type()),
              "qk_scores_grams: gq and gk must be floating point, got ", gq.scalar_type(), " and ", gk.scalar_type());
  TORCH_CHECK(gq.device().is_cpu() && gk.device().is_cpu(),
              "qk_scores_grams (CPU kernel): gq and gk must be CPU tensors");
  TORCH_CHECK(gamma >= 1, "qk_scores_grams: gamma must be >= 1, got ", gamma);
  const int64_t B = gq.size(0), H = gq.size(1), d = gq.size(3);
  auto out64 = at::zeros({B, H, d}, gq.options().dtype(at::kDouble));
  if (B * H * d > 0)  // (γ > rank is harmless: only the nonzero σ_j count, and there are at most N of them)
    score_grams(gq.reshape({B * H, d, d}), gk.reshape({B * H, d, d}), std::min(gamma, d), out64.data_ptr<double>());
  return out64.sum(0).to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(snp_fast, CPU, m) {
  m.impl("qk_scores", &qk_scores_cpu);
  m.impl("qk_scores_grams", &qk_scores_grams_cpu);
}
