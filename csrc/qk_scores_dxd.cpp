// Q/K attention-score scores on any device, written in ATen ops:
// - qk_scores_dxd: the d×d route, float64 Gram matrices by batched GEMM, their roots by batched eigh,
//   the SVD of M = R_q R_kᵀ. Same thresholds as snp_fast/ops/reference.py: σ_j ≤ 1e-4 σ_1 counts as
//   zero, cos with a zero filter is 0, Gram eigenvalues within rounding of zero are clamped to 0.
// - qk_scores_hybrid, the CUDA implementation of snp_fast::qk_scores: the float64 Grams (the O(N d²)
//   part) by batched GEMM where q and k are, then the d×d half on the host's cores by the CPU kernel
//   (snp_fast::qk_scores_grams). The batched eigh / SVD of the d×d route are no option on a GPU for
//   d > 32: torch runs cuSOLVER's batched Jacobi only up to 32×32 and otherwise one solver call per
//   matrix (thousands per block at ViT-L size).
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>

namespace {

at::Tensor safe_div(const at::Tensor& num, const at::Tensor& den) {
  const double tiny = std::numeric_limits<double>::min();
  return at::where(den > 0, num / den.clamp_min(tiny), at::zeros_like(num));
}

// R with RᵀR = G, (..., d, d) float64, as the reference's _gram_root: the root of the unit-diagonal
// D⁻¹GD⁻¹ (D² = diag G), times D, so that the clamp of rounding-level eigenvalues does not depend on the
// filters' scales.
at::Tensor gram_root(const at::Tensor& g) {
  at::Tensor dn = g.diagonal(0, -2, -1).clamp_min(0).sqrt();
  dn = at::where(dn > 0, dn, at::ones_like(dn));
  auto eig = at::linalg_eigh(g / (dn.unsqueeze(-1) * dn.unsqueeze(-2)));
  at::Tensor lam = std::get<0>(eig), vec = std::get<1>(eig);
  const int64_t d = g.size(-1);
  at::Tensor lam_max = lam.narrow(-1, d - 1, 1).clamp_min(0);
  const double tol = static_cast<double>(d) * 4.0 * std::numeric_limits<float>::epsilon();
  lam = at::where(lam > lam_max * tol, lam, at::zeros_like(lam));
  return lam.sqrt().unsqueeze(-1) * vec.transpose(-1, -2) * dn.unsqueeze(-2);
}

// Checks the arguments; returns the float64 Grams q^T q, k^T k, (B, H, d, d), formed where q and k are.
std::pair<at::Tensor, at::Tensor> checked_grams(const at::Tensor& q, const at::Tensor& k, int64_t gamma) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes(), "qk_scores: q and k must both be (B, H, N, d) with equal "
              "shapes, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(gamma >= 1, "qk_scores: gamma must be >= 1, got ", gamma);
  TORCH_CHECK(q.is_floating_point() && k.is_floating_point(), "qk_scores: q and k must be floating point");
  const at::Tensor qd = q.to(at::kDouble), kd = k.to(at::kDouble);
  return {at::matmul(qd.transpose(-1, -2), qd), at::matmul(kd.transpose(-1, -2), kd)};
}

}  // namespace

at::Tensor qk_scores_dxd(const at::Tensor& q, const at::Tensor& k, int64_t gamma) {
  const auto [gq, gk] = checked_grams(q, k, gamma);
  if (q.size(3) == 0) return at::zeros({q.size(1), 0}, q.options().dtype(at::kFloat));
  TORCH_CHECK(at::isfinite(gq.sum() + gk.sum()).item<bool>(), "qk_scores: q or k holds NaN or Inf values");
  const at::Tensor rq = gram_root(gq), rk = gram_root(gk);
  auto svd = at::linalg_svd(at::matmul(rq, rk.transpose(-1, -2)), /*full_matrices=*/true);
  at::Tensor x = std::get<0>(svd), s = std::get<1>(svd), yh = std::get<2>(svd);
  const int64_t g = std::min<int64_t>(gamma, s.size(-1));
  x = x.narrow(-1, 0, g);
  s = s.narrow(-1, 0, g);
  const at::Tensor y = yh.narrow(-2, 0, g).transpose(-1, -2);
  const at::Tensor valid = (s > s.narrow(-1, 0, 1) * 1e-4).to(at::kDouble);
  const at::Tensor qn = gq.diagonal(0, -2, -1).clamp_min(0).sqrt().unsqueeze(-2);
  const at::Tensor kn = gk.diagonal(0, -2, -1).clamp_min(0).sqrt().unsqueeze(-2);
  const at::Tensor cos_u = safe_div(at::matmul(x.transpose(-1, -2), rq), qn);  // (B, H, g, d)
  const at::Tensor cos_v = safe_div(at::matmul(y.transpose(-1, -2), rk), kn);
  const at::Tensor omega = ((cos_u * cos_v).abs() * valid.unsqueeze(-1)).sum(-2);  // (B, H, d)
  return omega.sum(0).to(at::kFloat);
}

at::Tensor qk_scores_hybrid(const at::Tensor& q, const at::Tensor& k, int64_t gamma) {
  const auto [gq, gk] = checked_grams(q, k, gamma);  // to the host: 8 d² bytes per (image, head)
  static const auto grams_op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("snp_fast::qk_scores_grams", "")
                                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return grams_op.call(gq.cpu(), gk.cpu(), gamma).to(q.device());
}

TORCH_LIBRARY_IMPL(snp_fast, CompositeExplicitAutograd, m) {
  m.impl("qk_scores_dxd", &qk_scores_dxd);
  m.impl("qk_scores_hybrid", &qk_scores_hybrid);
}

#ifdef SNP_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(snp_fast, CUDA, m) {
  m.impl("qk_scores", &qk_scores_hybrid);
}
#endif
