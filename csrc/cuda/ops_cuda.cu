// CUDA implementations of gram, redundancy_scores and gather_slices (TORCH_LIBRARY_IMPL(snp_fast, CUDA)).
//
// Deliberately simple: the products run in cuBLAS through ATen on the current stream (fp32, TF32 only if
// the user enabled it for torch matmuls), the epilogues are small ATen reductions. The symmetric ops
// multiply only the upper-triangle block rows, as the CPU kernels do. (The Triton kernels in
// snp_fast/ops/triton/ are the fused alternatives; qk_scores on CUDA is qk_scores_hybrid in
// csrc/qk_scores_dxd.cpp: Grams on the GPU, the d×d eigen work by the CPU kernel on the host.)
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "../gather_checks.h"

namespace {

constexpr int64_t kBlock = 1024;  // block-row height: few, large cuBLAS GEMMs

// bf16 (gram, redundancy_scores): the inputs rounded to bfloat16, then the float32 route below (the same
// values as bf16 products with float32 sums; not faster: bf16 tensor-core GEMMs with a float32 output are
// not wired up here, where nothing CUDA can run).
at::Tensor gram_cuda(const at::Tensor& x, bool bf16) {
  TORCH_CHECK(x.dim() == 2, "gram: x must be 2-D (tokens, features), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gram: x must be floating point, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), m = x.size(1);
  auto xf = bf16 ? x.to(at::kBFloat16).to(at::kFloat) : x.to(at::kFloat);
  if (xf.stride(1) != 1) xf = xf.contiguous();
  auto g = at::empty({m, m}, xf.options());
  if (m == 0) return g;
  if (T == 0) return g.zero_();
  if (m <= kBlock) return at::mm(xf.t(), xf);
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {  // G[I, I:] = x[:, I]ᵀ x[:, I:]
    const int64_t ni = std::min(kBlock, m - i0);
    auto panel = at::mm(xf.narrow(1, i0, ni).t(), xf.narrow(1, i0, m - i0));
    g.narrow(0, i0, ni).narrow(1, i0, m - i0).copy_(panel);
  }
  for (int64_t j0 = kBlock; j0 < m; j0 += kBlock) {  // mirror the strictly-lower block rows
    const int64_t nj = std::min(kBlock, m - j0);
    g.narrow(0, j0, nj).narrow(1, 0, j0).copy_(g.narrow(0, 0, j0).narrow(1, j0, nj).t());
  }
  return g;
}

at::Tensor redundancy_scores_cuda(const at::Tensor& w, bool bf16) {
  TORCH_CHECK(w.dim() == 2, "redundancy_scores: w must be 2-D (rows = filters), got shape ", w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "redundancy_scores: w must be floating point, got ", w.scalar_type());
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.size(0);
  auto wf = (bf16 ? w.to(at::kBFloat16).to(at::kFloat) : w.to(at::kFloat)).contiguous();
  auto wd = wf.to(at::kDouble);
  auto norms = at::linalg_vector_norm(wd, 2, {1}, false, std::nullopt);
  TORCH_CHECK(at::isfinite(norms).all().item<bool>(), "redundancy_scores: w holds NaN or Inf values");
  // divided in double: 1/‖w_i‖ overflows float below 2.9e-39 (a zero row stays zero)
  auto wn = (wd / at::where(norms > 0, norms, at::ones_like(norms)).unsqueeze(1)).to(at::kFloat).contiguous();
  wd.reset();
  auto sums = at::zeros({n}, norms.options());
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {  // block row I of the upper triangle: |cos| of rows I × rows I:
    const int64_t ni = std::min(kBlock, n - i0);
    auto c = at::mm(wn.narrow(0, i0, ni), wn.narrow(0, i0, n - i0).t()).abs_();
    sums.narrow(0, i0, ni).add_(c.sum(1, false, at::kDouble));
    if (n - i0 > ni)  // off-diagonal part credits the later rows too (column sums)
      sums.narrow(0, i0 + ni, n - i0 - ni).add_(c.narrow(1, ni, n - i0 - ni).sum(0, false, at::kDouble));
  }
  auto omega = static_cast<double>(n) - sums;
  return at::where(norms > 0, omega, at::zeros_like(omega)).to(at::kFloat);
}

// Every slice's index range with one host sync: CUDA's index_select checks ranges by a device-side assert,
// which leaves the CUDA context unusable instead of raising. Each slice adds (min, size − 1 − max), and all
// must be ≥ 0; the slow per-slice check then names the first bad one.
void check_ranges(at::TensorList src, at::IntArrayRef dim_a, at::TensorList idx_a, at::IntArrayRef dim_b,
                  const c10::List<std::optional<at::Tensor>>& idx_b) {
  std::vector<at::Tensor> margins;
  const auto add = [&](size_t i, int64_t dim, const at::Tensor& idx) {
    if (idx.numel() == 0) return;
    const auto ix = idx.to(src[i].device());
    margins.push_back(at::stack({ix.min(), (src[i].size(dim) - 1) - ix.max()}));
  };
  for (size_t i = 0; i < src.size(); ++i) {
    add(i, dim_a[i], idx_a[i]);
    if (const std::optional<at::Tensor> b = idx_b.get(i); b.has_value()) add(i, dim_b[i], *b);
  }
  if (margins.empty() || at::cat(margins).min().item<int64_t>() >= 0) return;
  for (size_t i = 0; i < src.size(); ++i) {
    snp_fast::check_range(src[i], dim_a[i], idx_a[i], i);
    if (const std::optional<at::Tensor> b = idx_b.get(i); b.has_value()) snp_fast::check_range(src[i], dim_b[i], *b, i);
  }
}

std::vector<at::Tensor> gather_slices_cuda(at::TensorList src, at::IntArrayRef dim_a, at::TensorList idx_a,
                                           at::IntArrayRef dim_b, const c10::List<std::optional<at::Tensor>>& idx_b) {
  snp_fast::check_gather_args(src, dim_a, idx_a, dim_b, idx_b);
  const size_t n = src.size();
  std::vector<at::Tensor> out(n);
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(src[0].device());
  check_ranges(src, dim_a, idx_a, dim_b, idx_b);
  for (size_t i = 0; i < n; ++i) {
    at::Tensor t = src[i].index_select(dim_a[i], idx_a[i].to(src[i].device()));
    const std::optional<at::Tensor> b = idx_b.get(i);
    if (b.has_value()) t = t.index_select(dim_b[i], b->to(src[i].device()));
    out[i] = t.contiguous();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(snp_fast, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("redundancy_scores", &redundancy_scores_cuda);
  m.impl("gather_slices", &gather_slices_cuda);
}
