// In-place Cholesky solve for the re-fit's ridge systems (snp_fast/refit.py): b ← b a⁻¹, a overwritten
// (its lower triangle by the Cholesky factor), by LAPACK's dpotrf / dpotrs (torch's own, looked up like the BLAS in blas.h; through ATen
// when they are not found).
//
// torch.linalg.cholesky_ex + torch.cholesky_solve do the same arithmetic, but copy a into column-major
// storage, zero the factor's other triangle (tril) and copy factor and right-hand side again for the
// solve: at the fc2 re-fit of ViT-L (n = 2049, 512 right-hand sides) that is ~120 ms of copies around
// ~70 ms of LAPACK. Here nothing is copied: a symmetric row-major matrix is its own column-major
// transpose, and the row-major (m, n) b is the column-major n × m right-hand side LAPACK wants.
#include <torch/extension.h>

#include "blas.h"

namespace {

int64_t cholesky_solve_info(at::Tensor a, at::Tensor b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "cholesky_solve_ (CPU kernel): a and b must be CPU tensors");
  TORCH_CHECK(a.scalar_type() == at::kDouble && b.scalar_type() == at::kDouble,
              "cholesky_solve_: a and b must be float64, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.dim() == 2 && a.size(0) == a.size(1), "cholesky_solve_: a must be square, got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(1) == a.size(0), "cholesky_solve_: b must be (m, ", a.size(0), "), got shape ",
              b.sizes());
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "cholesky_solve_: a and b must be contiguous (solved in place)");
  const int64_t n = a.size(0), m = b.size(0);
  if (n == 0) return 0;
  const auto potrf = snp_fast::blas::dpotrf();
  const auto potrs = snp_fast::blas::dpotrs();
  if (potrf == nullptr || potrs == nullptr) {  // no LAPACK symbols: the same through ATen, with its copies
    auto [chol, info] = at::linalg_cholesky_ex(a);
    if (info.item<int64_t>() != 0) return info.item<int64_t>();
    if (m > 0) b.copy_(at::cholesky_solve(b.t(), chol).t());
    return 0;
  }
  TORCH_CHECK(n < (int64_t{1} << 31) && m < (int64_t{1} << 31), "cholesky_solve_: sizes must be < 2^31");
  int64_t info = 0;
  // "U" of the column-major matrix LAPACK sees is the row-major lower triangle; either holds all of a
  potrf("U", &n, a.data_ptr<double>(), &n, &info);
  info = snp_fast::blas::lapack_info(info);
  if (info != 0 || m == 0) return info;  // > 0: the leading minor of that order is not positive definite
  potrs("U", &n, &m, a.data_ptr<double>(), &n, b.data_ptr<double>(), &n, &info);
  return snp_fast::blas::lapack_info(info);
}

// The op returns LAPACK's info as a 0-d int64 tensor: a data-dependent value, which an `int` return could
// not carry through torch.compile's fake tensors (they would have to guess it).
at::Tensor cholesky_solve_inplace_cpu(at::Tensor a, at::Tensor b) {
  return at::scalar_tensor(cholesky_solve_info(a, b), a.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(snp_fast, CPU, m) {
  m.impl("cholesky_solve_", &cholesky_solve_inplace_cpu);
}
