// Redundancy scores on the CPU (SNP.md, "V and FFN"): ω_i = Σ_l (1 − |cos(W_i, W_l)|) over the rows.
//
// Rows are normalised once (float32, norms accumulated in float64); the cosine matrix is never formed:
// it is visited in T×T tiles over the upper triangle of tile pairs only (I ≤ J), each tile one BLAS GEMM
// (a syrk, one triangle, for the diagonal tiles when torch's BLAS exports one: blas.h) into a per-thread
// buffer, with an abs + row-sum epilogue that credits both row blocks (row sums to block I, column sums
// to block J). Half the products of the full n×n route, O(T²) extra memory per thread. A zero row has
// no direction: its cosines are 0 and its own score is 0 (as the reference).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "blas.h"

namespace {

// Tile edge: large enough for efficient GEMMs, small enough that the diagonal tiles waste little when
// they are computed in full (no syrk): the cost is then (nb(nb+1)/2)/nb² of the full product, nb = ceil(n / T).
int64_t tile_size(int64_t n) {
  if (n <= 256) return n;
  return n >= 2048 ? 512 : 256;
}

at::Tensor redundancy_scores_cpu(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "redundancy_scores: w must be 2-D (rows = filters), got shape ", w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "redundancy_scores: w must be floating point, got ", w.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), "redundancy_scores (CPU kernel): w must be a CPU tensor");
  const int64_t n = w.size(0), m = w.size(1);
  auto out = at::zeros({n}, w.options().dtype(at::kFloat));
  if (n == 0) return out;
  // normalised rows (float32), norms in float64
  auto wf = w.to(at::kFloat).contiguous();
  auto norms = at::linalg_vector_norm(wf.to(at::kDouble), 2, {1}, false, std::nullopt);
  auto inv = at::where(norms > 0, 1.0 / norms, at::zeros_like(norms)).to(at::kFloat);
  auto wn = (wf * inv.unsqueeze(1)).contiguous();
  if (m == 0) return out;
  const int64_t T = tile_size(n);
  const int64_t nb = (n + T - 1) / T;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J) pairs.emplace_back(I, J);
  // one row-sum accumulator per thread (deterministic for a fixed thread count), reduced at the end
  const int64_t nthreads = at::get_num_threads();
  std::vector<std::vector<double>> acc(nthreads, std::vector<double>(n, 0.0));
  const auto syrk = m < (int64_t{1} << 31) ? snp_fast::blas::ssyrk() : nullptr;
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    double* a = acc[tid].data();
    auto tile = at::empty({T, T}, wn.options());
    std::vector<float> colsum(T);
    for (int64_t p = begin; p < end; ++p) {
      const auto [I, J] = pairs[p];
      const int64_t i0 = I * T, ni = std::min(T, n - i0), j0 = J * T, nj = std::min(T, n - j0);
      // the tile's cosines: the lower triangle only for a diagonal tile by syrk (row i's |cos| are then
      // c[i, :i+1] and c[i+1:, i]), else the whole ni × nj tile by GEMM
      const bool lower = I == J && syrk != nullptr;
      at::Tensor c;  // the GEMM's tile (a smaller one at the matrix's edge)
      const float* cp;
      int64_t ld = T;
      if (lower) {
        snp_fast::blas::syrk_rows_lower(syrk, wn.data_ptr<float>() + i0 * m, ni, m, m, tile.data_ptr<float>(), T);
        cp = tile.data_ptr<float>();
      } else {
        c = ni == T && nj == T ? tile : at::empty({ni, nj}, wn.options());
        at::mm_out(c, wn.narrow(0, i0, ni), wn.narrow(0, j0, nj).t());
        cp = c.data_ptr<float>();
        ld = nj;
      }
      std::fill(colsum.begin(), colsum.begin() + nj, 0.0f);
      float* cs = colsum.data();
      for (int64_t i = 0; i < ni; ++i) {
        const float* row = cp + i * ld;
        const int64_t len = lower ? i : nj;
        float s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < len; ++j) {
          const float v = std::fabs(row[j]);
          s += v;
          cs[j] += v;
        }
        a[i0 + i] += lower ? s + std::fabs(row[i]) : s;
      }
      if (lower || I != J)  // column sums: the same rows' (lower) or block J's (off-diagonal) share
        for (int64_t j = 0; j < nj; ++j) a[(lower ? i0 : j0) + j] += colsum[j];
    }
  });
  const double* np = norms.data_ptr<double>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t t = 0; t < nthreads; ++t) s += acc[t][i];
    op[i] = np[i] > 0 ? static_cast<float>(static_cast<double>(n) - s) : 0.0f;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(snp_fast, CPU, m) {
  m.impl("redundancy_scores", &redundancy_scores_cpu);
}
