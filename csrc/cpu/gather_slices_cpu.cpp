// Gather-based weight slicing on the CPU: every (tensor, dim, kept-index) slice of a model in one call,
// the tensors spread over threads. A slice along a tensor's innermost dim (weight columns, activation
// channels) is a row-by-row gather of elements, which ATen's index_select does column by column with a
// stride of a whole row: it gets its own loop, over rows; every other slice is a copy of contiguous
// runs done by index_select_out.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>

#include "../gather_checks.h"

namespace {

// out[r, j] = src[r, idx[j]] for the (rows, cols) view of a contiguous tensor; E: an unsigned integer type
// of the element's size (the bits are copied, whatever the dtype).
template <typename E>
void gather_last_dim(const at::Tensor& src, const at::Tensor& idx, at::Tensor& out) {
  const int64_t cols = src.size(-1), k = idx.numel(), rows = cols == 0 ? 0 : src.numel() / cols;
  const E* s = static_cast<const E*>(src.const_data_ptr());
  E* o = static_cast<E*>(out.data_ptr());
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const E* in = s + r * cols;
      E* dst = o + r * k;
      for (int64_t j = 0; j < k; ++j) dst[j] = in[ix[j]];
    }
  });
}

// out = src sliced along `dim` at `idx` (out already has the sliced shape)
void slice_into(at::Tensor& out, const at::Tensor& src, int64_t dim, const at::Tensor& idx) {
  if (dim != src.dim() - 1 || !src.is_contiguous() || !idx.is_contiguous()) {
    at::index_select_out(out, src, dim, idx);
    return;
  }
  switch (src.element_size()) {
    case 1: gather_last_dim<uint8_t>(src, idx, out); return;
    case 2: gather_last_dim<uint16_t>(src, idx, out); return;
    case 4: gather_last_dim<uint32_t>(src, idx, out); return;
    case 8: gather_last_dim<uint64_t>(src, idx, out); return;
    default: at::index_select_out(out, src, dim, idx);  // complex128 and the like
  }
}

std::vector<int64_t> sliced_shape(const at::Tensor& t, int64_t dim, int64_t k) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape[dim] = k;
  return shape;
}

std::vector<at::Tensor> gather_slices_cpu(at::TensorList src, at::IntArrayRef dim_a, at::TensorList idx_a,
                                          at::IntArrayRef dim_b, const c10::List<std::optional<at::Tensor>>& idx_b) {
  snp_fast::check_gather_args(src, dim_a, idx_a, dim_b, idx_b);
  const size_t n = src.size();
  std::vector<at::Tensor> out(n);
  std::vector<at::Tensor> ib(n);
  for (size_t i = 0; i < n; ++i) {
    snp_fast::check_range(src[i], dim_a[i], idx_a[i], i);
    const std::optional<at::Tensor> b = idx_b.get(i);
    auto shape = sliced_shape(src[i], dim_a[i], idx_a[i].numel());
    if (b.has_value()) {
      snp_fast::check_range(src[i], dim_b[i], *b, i);
      ib[i] = *b;
      shape[dim_b[i]] = ib[i].numel();
    }
    out[i] = at::empty(shape, src[i].options().memory_format(at::MemoryFormat::Contiguous));
  }
  // One work item per tensor; a single tensor's row gather uses the threads itself (nested
  // parallel_for runs inline). The ATen calls on the worker threads need the caller's grad and inference
  // modes, which parallel_for does not carry over (else: a Parameter or an inference tensor is refused).
  const at::ThreadLocalState tls;
  at::parallel_for(0, static_cast<int64_t>(n), 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(tls);
    for (int64_t i = begin; i < end; ++i) {
      if (ib[i].defined()) {
        at::Tensor tmp = at::empty(sliced_shape(src[i], dim_a[i], idx_a[i].numel()), src[i].options());
        slice_into(tmp, src[i], dim_a[i], idx_a[i]);
        slice_into(out[i], tmp, dim_b[i], ib[i]);
      } else {
        slice_into(out[i], src[i], dim_a[i], idx_a[i]);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(snp_fast, CPU, m) {
  m.impl("gather_slices", &gather_slices_cpu);
}
