// Gram matrix G = xᵀx (float32) of a (T, m) input on the CPU, as a symmetric rank-k update.
//
// Fast path: torch's own BLAS syrk when its build exports one (blas.h): one call computes one triangle,
// half the products of xᵀx at full GEMM efficiency.
// Fallback: columns cut into blocks of b; block row I of the upper triangle, G[I, I:] = x[:, I]ᵀ x[:, I:],
// is one GEMM (column slices of x are strided views: no copies) written straight into G:
// (nb(nb+1)/2)/nb² of the products (nb = ceil(m/b)).
// Either way the other triangle is then mirrored, in cache-sized tiles.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "blas.h"

namespace {

int64_t block_size(int64_t m) { return std::min<int64_t>(m, 256); }

// Fill one triangle of the m×m row-major g from the other. `from_lower`: the lower triangle (diagonal
// included) is the computed one (syrk); otherwise the upper one (GEMM panels). 64×64 tiles, so that
// each transposed tile is read from L1 (ATen's copy of a transposed view walks one side with a stride
// of m floats), spread over the threads tile by tile.
void mirror(at::Tensor& g, bool from_lower) {
  constexpr int64_t b = 64;
  const int64_t m = g.size(0), nb = (m + b - 1) / b;
  float* p = g.data_ptr<float>();
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (I, J), J ≥ I: tiles of the upper triangle
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J) tiles.emplace_back(I, J);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = tiles[t].first * b, j0 = tiles[t].second * b;
      const int64_t ni = std::min(b, m - i0), nj = std::min(b, m - j0);
      for (int64_t i = 0; i < ni; ++i) {
        float* up = p + (i0 + i) * m + j0;  // row i0 + i of the upper tile
        const int64_t j_first = i0 == j0 ? i + 1 : 0;
        if (from_lower) {
          for (int64_t j = j_first; j < nj; ++j) up[j] = p[(j0 + j) * m + i0 + i];
        } else {
          for (int64_t j = j_first; j < nj; ++j) p[(j0 + j) * m + i0 + i] = up[j];
        }
      }
    }
  });
}

at::Tensor gram_cpu(const at::Tensor& x, bool bf16) {
  TORCH_CHECK(x.dim() == 2, "gram: x must be 2-D (tokens, features), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gram: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "gram (CPU kernel): x must be a CPU tensor");
  const int64_t T = x.size(0), m = x.size(1);
  auto g = at::empty({m, m}, x.options().dtype(at::kFloat));
  if (m == 0) return g;
  if (T == 0) return g.zero_();
  // bf16: the Gram of x rounded to bfloat16. Its products are exact in float32, so without MKL's bf16 GEMM
  // the float32 routes below on the rounded x compute the same matrix (up to summation order).
  at::Tensor xb = bf16 ? x.to(at::kBFloat16).contiguous() : at::Tensor();
  if (auto gemm16 = bf16 ? snp_fast::blas::gemm_bf16() : nullptr;
      gemm16 != nullptr && T < (int64_t{1} << 31) && m < (int64_t{1} << 31)) {
    // no bf16 syrk: block rows of the upper triangle, G[I, I:] = x[:, I]ᵀ x[:, I:], each one bf16 GEMM
    // over all threads, in blocks of 512 (fewer, larger products keep the bf16 GEMM efficient)
    const auto* p = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
    const int64_t b16 = std::min<int64_t>(m, 512);
    for (int64_t i0 = 0; i0 < m; i0 += b16) {
      const int64_t ni = std::min(b16, m - i0);
      snp_fast::blas::gemm_bf16_rows(gemm16, true, false, ni, m - i0, T, p + i0, m, p + i0, m,
                                     g.data_ptr<float>() + i0 * m + i0, m);
    }
    if (m > b16) mirror(g, /*from_lower=*/false);  // (one block is the whole matrix)
    return g;
  }
  auto xf = bf16 ? xb.to(at::kFloat) : x.to(at::kFloat).contiguous();  // row-major: column slices are BLAS views
  const int64_t b = block_size(m);
  if (m == b) return at::mm(xf.t(), xf);  // one block: no triangle to save
  if (auto syrk = snp_fast::blas::ssyrk(); syrk != nullptr && T < (int64_t{1} << 31) && m < (int64_t{1} << 31)) {
    snp_fast::blas::syrk_lower(syrk, xf.data_ptr<float>(), T, m, m, g.data_ptr<float>());
    mirror(g, /*from_lower=*/true);
    return g;
  }
  for (int64_t i0 = 0; i0 < m; i0 += b) {
    const int64_t ni = std::min(b, m - i0);
    auto panel = g.narrow(0, i0, ni).narrow(1, i0, m - i0);
    at::mm_out(panel, xf.narrow(1, i0, ni).t(), xf.narrow(1, i0, m - i0));
  }
  mirror(g, /*from_lower=*/false);
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(snp_fast, CPU, m) {
  m.impl("gram", &gram_cpu);
}
