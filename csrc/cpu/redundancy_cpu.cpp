// Redundancy scores on the CPU (docs/METHOD.md, "Criteria"): ω_i = Σ_l (1 − |cos(W_i, W_l)|) over the rows.
//
// The cosine matrix is never formed whole beyond one tile: it is visited in T×T tiles over the upper
// triangle of tile pairs only (I ≤ J), each tile one BLAS product of the rows (a syrk, one triangle, for
// the diagonal tiles when torch's BLAS exports one: blas.h), with an abs + row-sum epilogue that credits
// both row blocks (row sums to block I, column sums to block J). Half the products of the full n×n
// route, O(T²) extra memory. The products are of the raw rows, and the epilogue scales them by the
// inverse row norms (float64 sums): no normalised copy of the weight is written, which at value-filter
// sizes costs as much as the products saved. A zero row has no direction: its cosines are 0 and its own
// score is 0 (as the reference).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "blas.h"

namespace {

// Tile edge. Up to 1024 rows the whole (lower-triangle) matrix is one tile, computed by one BLAS call
// that uses every thread; beyond, tiles large enough for efficient GEMMs, small enough that the diagonal
// tiles waste little when they are computed in full (no syrk): (nb(nb+1)/2)/nb² of the full product.
int64_t tile_size(int64_t n) {
  if (n <= 1024) return n;
  return n >= 2048 ? 512 : 256;
}

// Row norms accumulated in float64; inv[i] = 1/‖w_i‖ (0 for a zero row). T: float or at::BFloat16.
template <typename T>
void row_norms(const T* w, int64_t n, int64_t m, std::vector<double>& norm, std::vector<float>& inv) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* r = w + i * m;
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < m; ++k) {
        const double v = static_cast<float>(r[k]);
        s += v * v;
      }
      norm[i] = std::sqrt(s);
      inv[i] = norm[i] > 0 ? static_cast<float>(1.0 / norm[i]) : 0.0f;
    }
  });
}

// Adds the |cos| sums of the block c (ni × nj, leading dimension ld) of rows i0.. against rows j0..:
// row sums to acc[i0 + i] and, when `cols`, column sums to acc[j0 + j]. `lower`: c holds only a lower
// triangle, whose diagonal is at column i0 - j0 + i of row i (the block starts at or left of the
// diagonal). sc: the rows' inverse norms; colsum: nj floats of scratch.
void add_block_sums(const float* c, int64_t ld, int64_t ni, int64_t nj, int64_t i0, int64_t j0, bool lower, bool cols,
                    const float* sc, float* colsum, double* acc) {
  std::fill(colsum, colsum + nj, 0.0f);
  const float* sj = sc + j0;
  for (int64_t i = 0; i < ni; ++i) {
    const float* row = c + i * ld;
    const float si = sc[i0 + i];
    const int64_t len = lower ? i0 - j0 + i : nj;  // (lower: the diagonal entry is added after the loop)
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) {
      const float v = std::fabs(row[j]);
      s += v * sj[j];
      colsum[j] += v * si;
    }
    acc[i0 + i] += si * (lower ? s + std::fabs(row[len]) * si : s);
  }
  if (cols)
    for (int64_t j = 0; j < nj; ++j) acc[j0 + j] += sj[j] * colsum[j];
}

at::Tensor redundancy_scores_cpu(const at::Tensor& w, bool bf16) {
  TORCH_CHECK(w.dim() == 2, "redundancy_scores: w must be 2-D (rows = filters), got shape ", w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "redundancy_scores: w must be floating point, got ", w.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), "redundancy_scores (CPU kernel): w must be a CPU tensor");
  const int64_t n = w.size(0), m = w.size(1);
  auto out = at::zeros({n}, w.options().dtype(at::kFloat));
  if (n == 0 || m == 0) return out;  // no row has a direction: every score is 0
  // bf16: the scores of the rows rounded to bfloat16; their products are exact in float32, so the float32
  // route below on the rounded rows computes the same scores (up to summation order) as the bf16 GEMMs
  at::Tensor wb = bf16 ? w.to(at::kBFloat16).contiguous() : at::Tensor();
  at::Tensor wf = bf16 ? at::Tensor() : w.to(at::kFloat).contiguous();  // (bf16: only for the float32 route)
  std::vector<double> norm(n);
  std::vector<float> inv(n);
  if (bf16) {
    row_norms(wb.data_ptr<at::BFloat16>(), n, m, norm, inv);
  } else {
    row_norms(wf.data_ptr<float>(), n, m, norm, inv);
  }
  // float64 sums of fp32 squares cannot overflow: a norm is finite exactly when its row is
  const auto bad = std::find_if(norm.begin(), norm.end(), [](double v) { return !std::isfinite(v); });
  TORCH_CHECK(bad == norm.end(), "redundancy_scores: w holds NaN or Inf values (row ", bad - norm.begin(), ")");
  // Raw rows unless a norm is so large or small that fp32 products w_i·w_l could overflow or turn
  // subnormal; then a normalised copy (and unit scales) instead.
  const bool raw =
      std::all_of(norm.begin(), norm.end(), [](double v) { return v == 0 || (v > 0x1p-40 && v < 0x1p40); });
  const auto gemm16 = bf16 && raw && m < (int64_t{1} << 31) ? snp_fast::blas::gemm_bf16() : nullptr;
  if (bf16 && gemm16 == nullptr) wf = wb.to(at::kFloat);
  if (!raw) {
    if (wf.is_alias_of(w)) wf = wf.clone();  // never scale the caller's weight
    float* p = wf.data_ptr<float>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        // divided in double: 1/‖w_i‖ itself can overflow float (‖w_i‖ < 2.9e-39) or lose bits as a subnormal
        // (a zero row stays as it is)
        if (norm[i] > 0)
          for (int64_t k = 0; k < m; ++k) p[i * m + k] = static_cast<float>(p[i * m + k] / norm[i]);
        inv[i] = norm[i] > 0 ? 1.0f : 0.0f;
      }
    });
  }
  // bf16 GEMMs take the raw rounded rows (a normalised copy, when one is needed, takes the float32 route)
  const float* x = gemm16 == nullptr ? wf.data_ptr<float>() : nullptr;
  const float* sc = inv.data();
  const auto syrk = m < (int64_t{1} << 31) ? snp_fast::blas::ssyrk() : nullptr;
  const auto* xb = gemm16 != nullptr ? reinterpret_cast<const uint16_t*>(wb.data_ptr<at::BFloat16>()) : nullptr;
  // one row-sum accumulator per thread (deterministic for a fixed thread count), reduced at the end
  const int64_t nthreads = at::get_num_threads();
  std::vector<std::vector<double>> acc(nthreads, std::vector<double>(n, 0.0));
  // (bf16 GEMMs have no syrk: one tile would be the full n×n product; tiles pairs of the upper triangle do
  // ~5/8 of it at 1024 rows)
  const int64_t T = gemm16 != nullptr && n > 256 ? std::min<int64_t>(tile_size(n), 256) : tile_size(n);
  if (T == n) {
    // One tile: the products by one BLAS call over all threads, then the sums over row blocks, blocks b
    // and nb - 1 - b in the same task so that the triangle's rows balance over the threads.
    auto c = at::empty({n, n}, out.options());
    const bool lower = syrk != nullptr && gemm16 == nullptr;  // (no bf16 syrk: the full product)
    if (gemm16 != nullptr) {
      snp_fast::blas::gemm_bf16_rows(gemm16, false, true, n, n, m, xb, m, xb, m, c.data_ptr<float>(), n);
    } else if (lower) {
      snp_fast::blas::syrk_rows_lower(syrk, x, n, m, m, c.data_ptr<float>(), n);
    } else {
      at::mm_out(c, wf, wf.t());
    }
    const float* cp = c.data_ptr<float>();
    constexpr int64_t rb = 64;
    const int64_t nb = (n + rb - 1) / rb;
    at::parallel_for(0, (nb + 1) / 2, 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      std::vector<float> colsum(n);
      const auto rows = [&](int64_t b) {
        const int64_t i0 = b * rb, ni = std::min(rb, n - i0);
        // lower: rows i0.. against columns 0..i0+ni (both sums); full rows: the row sums say it all
        add_block_sums(cp + i0 * n, n, ni, lower ? i0 + ni : n, i0, 0, lower, lower, sc, colsum.data(),
                       acc[tid].data());
      };
      for (int64_t t = begin; t < end; ++t) {
        rows(t);
        if (nb - 1 - t != t) rows(nb - 1 - t);
      }
    });
  } else {
    const int64_t nb = (n + T - 1) / T;
    std::vector<std::pair<int64_t, int64_t>> pairs;
    for (int64_t I = 0; I < nb; ++I)
      for (int64_t J = I; J < nb; ++J) pairs.emplace_back(I, J);
    const at::ThreadLocalState tls;  // the caller's grad / inference modes, for the ATen calls on the workers
    at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(tls);
      const int64_t tid = at::get_thread_num();
      auto tile = at::empty({T, T}, out.options());
      std::vector<float> colsum(T);
      for (int64_t p = begin; p < end; ++p) {
        const auto [I, J] = pairs[p];
        const int64_t i0 = I * T, ni = std::min(T, n - i0), j0 = J * T, nj = std::min(T, n - j0);
        // the tile's products: the lower triangle only for a diagonal tile by syrk, else the whole
        // ni × nj tile by GEMM (into a smaller tensor at the matrix's edge)
        const bool lower = I == J && syrk != nullptr && gemm16 == nullptr;
        at::Tensor c = ni == T && nj == T ? tile : at::empty({ni, nj}, out.options());
        if (gemm16 != nullptr) {
          snp_fast::blas::gemm_bf16_rows(gemm16, false, true, ni, nj, m, xb + i0 * m, m, xb + j0 * m, m,
                                         c.data_ptr<float>(), nj);
        } else if (lower) {
          snp_fast::blas::syrk_rows_lower(syrk, x + i0 * m, ni, m, m, c.data_ptr<float>(), nj);
        } else {
          at::mm_out(c, wf.narrow(0, i0, ni), wf.narrow(0, j0, nj).t());
        }
        // column sums: the same rows' other triangle (lower) or block J's share (off-diagonal)
        add_block_sums(c.data_ptr<float>(), nj, ni, nj, i0, j0, lower, lower || I != J, sc, colsum.data(),
                       acc[tid].data());
      }
    });
  }
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t t = 0; t < nthreads; ++t) s += acc[t][i];
    op[i] = norm[i] > 0 ? static_cast<float>(static_cast<double>(n) - s) : 0.0f;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(snp_fast, CPU, m) {
  m.impl("redundancy_scores", &redundancy_scores_cpu);
}
