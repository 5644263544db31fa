// torch's own BLAS syrk (C = A Aᵀ, one triangle), looked up at run time.
//
// torch does not expose syrk, but the BLAS it was built with usually exports one: MKL (x86_64 wheels)
// as mkl_blas_ssyrk / mkl_blas_dsyrk, OpenBLAS as ssyrk_ / dsyrk_. Looking the symbol up in the already
// loaded torch libraries (instead of linking it) lets the extension load against any torch build; the
// callers fall back to GEMMs when no syrk is found.
#pragma once

#include <dlfcn.h>

#include <atomic>
#include <cstdint>

namespace snp_fast::blas {

// Fortran BLAS ?syrk. Integers are passed as int64: on little-endian machines an LP64 BLAS reads the low
// 32 bits of the same storage, so this is right for LP64 and ILP64 builds alike (callers keep them < 2^31).
template <typename T>
using syrk_fn = void (*)(const char* uplo, const char* trans, const int64_t* n, const int64_t* k, const T* alpha,
                         const T* a, const int64_t* lda, const T* beta, T* c, const int64_t* ldc);

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

inline std::atomic<bool>& syrk_enabled() {  // tests switch it off to check the GEMM fallbacks
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

inline syrk_fn<float> ssyrk() {
  return syrk_enabled().load() ? reinterpret_cast<syrk_fn<float>>(ssyrk_found().fn) : nullptr;
}

inline syrk_fn<double> dsyrk() {
  return syrk_enabled().load() ? reinterpret_cast<syrk_fn<double>>(dsyrk_found().fn) : nullptr;
}

// Lower (row-major) triangle of the d×d `c` = xᵀx for a row-major (n, d) x with row stride ldx:
// row-major x is the column-major d×n matrix A = xᵀ, and the column-major upper triangle of A Aᵀ is the
// row-major lower one.
template <typename T>
inline void syrk_lower(syrk_fn<T> f, const T* x, int64_t n, int64_t d, int64_t ldx, T* c) {
  const T alpha = 1, beta = 0;
  f("U", "N", &d, &n, &alpha, x, &ldx, &beta, c, &d);
}

}  // namespace snp_fast::blas
