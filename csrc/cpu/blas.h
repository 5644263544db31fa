// torch's own BLAS syrk (C = A Aᵀ, one triangle) and dgemm, looked up at run time.
//
// torch does not expose syrk (nor a GEMM callable on raw pointers from inside a parallel region), but the
// BLAS it was built with usually exports them: MKL (x86_64 wheels) as mkl_blas_ssyrk / mkl_blas_dsyrk /
// mkl_blas_dgemm, OpenBLAS as ssyrk_ / dsyrk_ / dgemm_. Looking the symbols up in the already loaded torch
// libraries (instead of linking them) lets the extension load against any torch build; the callers fall
// back to GEMMs through ATen or to plain loops when a symbol is not found.
#pragma once

#include <dlfcn.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <atomic>
#include <cstdint>
#include <climits>

namespace snp_fast::blas {

// Fortran BLAS ?gemm and ?syrk. Integers are passed as int64: on little-endian machines an LP64 BLAS reads the low
// 32 bits of the same storage, so this is right for LP64 and ILP64 builds alike (callers keep them < 2^31).
template <typename T>
using gemm_fn = void (*)(const char* transa, const char* transb, const int64_t* m, const int64_t* n, const int64_t* k,
                         const T* alpha, const T* a, const int64_t* lda, const T* b, const int64_t* ldb, const T* beta,
                         T* c, const int64_t* ldc);
template <typename T>
using potrf_fn = void (*)(const char* uplo, const int64_t* n, T* a, const int64_t* lda, int64_t* info);
template <typename T>
using potrs_fn = void (*)(const char* uplo, const int64_t* n, const int64_t* nrhs, const T* a, const int64_t* lda, T* b,
                          const int64_t* ldb, int64_t* info);
template <typename T>
using syrk_fn = void (*)(const char* uplo, const char* trans, const int64_t* n, const int64_t* k, const T* alpha,
                         const T* a, const int64_t* lda, const T* beta, T* c, const int64_t* ldc);

// MKL's cblas_gemm_bf16bf16f32: bf16 inputs, products exact in fp32 and accumulated in fp32 (AMX or
// AVX512-BF16 where the CPU has them), fp32 output. Passed by value; int64 arguments are read right by an
// LP64 build on x86_64 too (the low half of a register, or of an 8-byte stack slot).
using gemm_bf16_fn = void (*)(int layout, int transa, int transb, int64_t m, int64_t n, int64_t k, float alpha,
                              const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
                              int64_t ldc);

struct Found {
  void* fn = nullptr;
  const char* name = "";
};

inline Found find_symbol(const char* mkl_name, const char* fortran_name) {
  for (const char* lib : {"libtorch_cpu.so", "libtorch.so"}) {
    void* h = dlopen(lib, RTLD_LAZY | RTLD_NOLOAD);  // only libraries torch already loaded
    if (h == nullptr) continue;
    for (const char* sym : {mkl_name, fortran_name}) {
      if (void* f = dlsym(h, sym)) return {f, sym};
    }
  }
  return {};
}

inline std::atomic<bool>& lookup_enabled() {  // tests switch it off to check the fallbacks
  static std::atomic<bool> on{true};
  return on;
}

inline const Found& ssyrk_found() {
  static const Found f = find_symbol("mkl_blas_ssyrk", "ssyrk_");
  return f;
}

inline const Found& dsyrk_found() {
  static const Found f = find_symbol("mkl_blas_dsyrk", "dsyrk_");
  return f;
}

inline const Found& dgemm_found() {
  static const Found f = find_symbol("mkl_blas_dgemm", "dgemm_");
  return f;
}

// Whether the CPU multiplies bf16 in hardware (AVX512_BF16: CPUID.(7,1):EAX[5]; AMX-BF16: CPUID.(7,0):EDX[22]).
// Elsewhere MKL's bf16 GEMM is emulated, slower than the fp32 route it would replace.
inline bool cpu_has_bf16_dot() {
#if defined(__x86_64__)
  unsigned a, b, c, d;
  const bool avx512_bf16 = __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
  const bool amx_bf16 = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22));
  return avx512_bf16 || amx_bf16;
#else
  return false;
#endif
}

inline const Found& gemm_bf16_found() {
#if defined(__x86_64__)
  static const Found f =
      cpu_has_bf16_dot() ? find_symbol("cblas_gemm_bf16bf16f32", "cblas_gemm_bf16bf16f32") : Found{};
#else
  static const Found f{};
#endif
  return f;
}

inline const Found& dpotrf_found() {  // LAPACK, the standard Fortran names (MKL and OpenBLAS export them)
  static const Found f = find_symbol("dpotrf_", "dpotrf_");
  return f;
}

inline const Found& dpotrs_found() {
  static const Found f = find_symbol("dpotrs_", "dpotrs_");
  return f;
}

inline syrk_fn<float> ssyrk() {
  return lookup_enabled().load() ? reinterpret_cast<syrk_fn<float>>(ssyrk_found().fn) : nullptr;
}

inline syrk_fn<double> dsyrk() {
  return lookup_enabled().load() ? reinterpret_cast<syrk_fn<double>>(dsyrk_found().fn) : nullptr;
}

inline gemm_fn<double> dgemm() {
  return lookup_enabled().load() ? reinterpret_cast<gemm_fn<double>>(dgemm_found().fn) : nullptr;
}

inline gemm_bf16_fn gemm_bf16() {
  return lookup_enabled().load() ? reinterpret_cast<gemm_bf16_fn>(gemm_bf16_found().fn) : nullptr;
}

// Row-major c (m × n, row stride ldc) = op(a) op(b) of row-major bf16 matrices; ta / tb: transposed.
inline void gemm_bf16_rows(gemm_bf16_fn f, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const uint16_t* a,
                           int64_t lda, const uint16_t* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int row_major = 101, no_trans = 111, trans = 112;
  f(row_major, ta ? trans : no_trans, tb ? trans : no_trans, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
}

inline potrf_fn<double> dpotrf() {
  return lookup_enabled().load() ? reinterpret_cast<potrf_fn<double>>(dpotrf_found().fn) : nullptr;
}

inline potrs_fn<double> dpotrs() {
  return lookup_enabled().load() ? reinterpret_cast<potrs_fn<double>>(dpotrs_found().fn) : nullptr;
}

// LAPACK's info as written by an LP64 (int32, into the low half of the zero-initialised int64) or an
// ILP64 library.
inline int64_t lapack_info(int64_t info) {
  return info > INT32_MAX ? static_cast<int32_t>(static_cast<uint32_t>(info)) : info;
}

// Lower (row-major) triangle of the d×d `c` = xᵀx for a row-major (n, d) x with row stride ldx:
// row-major x is the column-major d×n matrix A = xᵀ, and the column-major upper triangle of A Aᵀ is the
// row-major lower one.
template <typename T>
inline void syrk_lower(syrk_fn<T> f, const T* x, int64_t n, int64_t d, int64_t ldx, T* c) {
  const T alpha = 1, beta = 0;
  f("U", "N", &d, &n, &alpha, x, &ldx, &beta, c, &d);
}

// Lower (row-major) triangle of the n×n `c` = x xᵀ for a row-major (n, k) x with row stride ldx (row-major
// x is the column-major k×n matrix A, and A has to be transposed: C = Aᵀ A).
template <typename T>
inline void syrk_rows_lower(syrk_fn<T> f, const T* x, int64_t n, int64_t k, int64_t ldx, T* c, int64_t ldc) {
  const T alpha = 1, beta = 0;
  f("U", "T", &n, &k, &alpha, x, &ldx, &beta, c, &ldc);
}

}  // namespace snp_fast::blas
