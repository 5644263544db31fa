// snp_fast._C: op schemas (declared once, here: no other file calls m.def or TORCH_LIBRARY_FRAGMENT, and
// the Python side only adds fake kernels to these) and the Python module that loads them.
//
// Each device's implementation registers under its own dispatch key in its own file:
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(snp_fast, CPU, m)) and csrc/cuda/*.cu (..., CUDA, m).
// Python calls them as torch.ops.snp_fast.<op> through the wrappers in snp_fast/ops/.
#include <torch/extension.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <map>
#include <string>

#include "cpu/blas.h"

TORCH_LIBRARY(snp_fast, m) {
  // Q/K attention-score preservation scores, (B, H, N, d) q and k -> (H, d) float32, summed over B.
  m.def("qk_scores(Tensor q, Tensor k, int gamma) -> Tensor");
  // The same from the float64 Grams G_q = q^T q, G_k = k^T k, (B, H, d, d) -> (H, d) (the d x d half alone).
  m.def("qk_scores_grams(Tensor gq, Tensor gk, int gamma) -> Tensor");
  // The same, Grams on q's device and the d x d half on the host CPU (the CUDA implementation of qk_scores).
  m.def("qk_scores_hybrid(Tensor q, Tensor k, int gamma) -> Tensor");
  // The same by the d x d route in ATen ops on any device (csrc/qk_scores_dxd.cpp).
  m.def("qk_scores_dxd(Tensor q, Tensor k, int gamma) -> Tensor");
  // Pairwise redundancy: omega_i = sum_l (1 - |cos(W_i, W_l)|) over the rows of a 2-D weight -> (n,) float32.
  // bf16: of the rows rounded to bfloat16 (products exact, sums in float32: bf16 GEMMs where the CPU has them).
  m.def("redundancy_scores(Tensor w, bool bf16=False) -> Tensor");
  // Gram matrix x^T x of a (T, m) input, float32 (m, m); bf16: of x rounded to bfloat16, as above.
  m.def("gram(Tensor x, bool bf16=False) -> Tensor");
  // In place: b (m, n) float64 -> b a^-1 for a (n, n) float64 symmetric positive definite, which is
  // overwritten; returns LAPACK's info as a 0-d int64 tensor (0, or k > 0: the leading k x k minor is not
  // positive definite; a tensor, not an int, since it depends on the data: see the fake in snp_fast/ops).
  m.def("cholesky_solve_(Tensor(a!) a, Tensor(b!) b) -> Tensor");
  // Apply (dim, kept-index) slices to many tensors in one call; idx_b may be None (one slice only).
  m.def("gather_slices(Tensor[] src, int[] dim_a, Tensor[] idx_a, int[] dim_b, Tensor?[] idx_b) -> Tensor[]");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "snp_fast compiled kernels (ops are registered as torch.ops.snp_fast.*)";
#ifdef SNP_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def(
      "blas",
      [](bool enable) {
        namespace blas = snp_fast::blas;
        blas::lookup_enabled().store(enable);
        auto name = [](bool used, const blas::Found& f) { return std::string(used ? f.name : ""); };
        std::map<std::string, std::string> found;
        found["ssyrk"] = name(blas::ssyrk() != nullptr, blas::ssyrk_found());
        found["dsyrk"] = name(blas::dsyrk() != nullptr, blas::dsyrk_found());
        found["dgemm"] = name(blas::dgemm() != nullptr, blas::dgemm_found());
        found["dpotrf"] = name(blas::dpotrf() != nullptr, blas::dpotrf_found());
        found["dpotrs"] = name(blas::dpotrs() != nullptr, blas::dpotrs_found());
        found["gemm_bf16"] = name(blas::gemm_bf16() != nullptr, blas::gemm_bf16_found());
        return found;
      },
      pybind11::arg("enable") = true,
      "The BLAS symbols of torch's own build the CPU kernels call, {'ssyrk', 'dsyrk', 'dgemm', 'dpotrf', 'dpotrs', 'gemm_bf16'} "
      "-> name "
      "('' = not found: ATen GEMMs or plain loops instead); enable=False switches them off (tests of the "
      "fallbacks).");
}
