// Gram matrix G = xᵀx (float32) of a (T, m) input on the CPU, as a symmetric rank-k update.
//
// Columns are cut into blocks of b; block row I of the upper triangle, G[I, I:] = x[:, I]ᵀ x[:, I:], is one
// BLAS GEMM (column slices of x are strided views: no copies) written straight into G; the lower
// triangle is then mirrored. The products done are (nb(nb+1)/2)/nb² of the full xᵀx (nb = ceil(m/b));
// each GEMM keeps a long N dimension, so BLAS (multi-threaded) runs them at full-matrix efficiency.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace {

int64_t block_size(int64_t m) {
  if (m <= 256) return m;
  return 256;
}

at::Tensor gram_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "gram: x must be 2-D (tokens, features), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gram: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "gram (CPU kernel): x must be a CPU tensor");
  const int64_t T = x.size(0), m = x.size(1);
  auto xf = x.to(at::kFloat);
  if (xf.stride(1) != 1) xf = xf.contiguous();  // column slices must be BLAS-compatible views
  auto g = at::empty({m, m}, x.options().dtype(at::kFloat));
  if (m == 0) return g;
  if (T == 0) return g.zero_();
  const int64_t b = block_size(m);
  const int64_t nb = (m + b - 1) / b;
  if (nb == 1) return at::mm(xf.t(), xf);
  for (int64_t i0 = 0; i0 < m; i0 += b) {
    const int64_t ni = std::min(b, m - i0);
    auto panel = g.narrow(0, i0, ni).narrow(1, i0, m - i0);
    at::mm_out(panel, xf.narrow(1, i0, ni).t(), xf.narrow(1, i0, m - i0));
  }
  // mirror the strictly-lower blocks from the upper ones
  at::parallel_for(1, nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t J = begin; J < end; ++J) {
      const int64_t j0 = J * b, nj = std::min(b, m - j0);
      g.narrow(0, j0, nj).narrow(1, 0, j0).copy_(g.narrow(0, 0, j0).narrow(1, j0, nj).t());
    }
  });
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(snp_fast, CPU, m) {
  m.impl("gram", &gram_cpu);
}
