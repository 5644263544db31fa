// Argument checks of gather_slices shared by the CPU and CUDA implementations (same messages on both).
#pragma once

#include <torch/extension.h>

namespace snp_fast {

inline void check_slice_dim(const at::Tensor& src, int64_t dim, size_t i) {
  TORCH_CHECK(dim >= 0 && dim < src.dim(), "gather_slices: tensor ", i, " has ", src.dim(), " dims, slice dim ",
              dim, " is out of range");
}

inline void check_slice_index(const at::Tensor& idx, size_t i) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, "gather_slices: indices for tensor ", i,
              " must be a 1-D int64 tensor");
}

// One slice's index range (two host reads: the CPU checks each slice, CUDA only on its error path).
inline void check_range(const at::Tensor& src, int64_t dim, const at::Tensor& idx, size_t i) {
  if (idx.numel() == 0) return;
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < src.size(dim), "gather_slices: index out of range for tensor ", i, " dim ", dim,
              " of size ", src.size(dim), " (got [", lo, ", ", hi, "])");
}

// Lengths of the lists, every slice's dim and index type, and no dim sliced twice. Index RANGES are left
// to the device implementation (the CPU checks each slice; CUDA all of them with one host sync).
inline void check_gather_args(at::TensorList src, at::IntArrayRef dim_a, at::TensorList idx_a,
                              at::IntArrayRef dim_b, const c10::List<std::optional<at::Tensor>>& idx_b) {
  const size_t n = src.size();
  TORCH_CHECK(dim_a.size() == n && idx_a.size() == n && dim_b.size() == n && idx_b.size() == n,
              "gather_slices: src, dim_a, idx_a, dim_b and idx_b must have the same length");
  for (size_t i = 0; i < n; ++i) {
    check_slice_dim(src[i], dim_a[i], i);
    check_slice_index(idx_a[i], i);
    const std::optional<at::Tensor> b = idx_b.get(i);
    if (b.has_value()) {
      TORCH_CHECK(dim_b[i] != dim_a[i], "gather_slices: tensor ", i, " slices dim ", dim_a[i], " twice");
      check_slice_dim(src[i], dim_b[i], i);
      check_slice_index(*b, i);
    }
  }
}

}  // namespace snp_fast
