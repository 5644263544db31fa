// Gather-based weight slicing on the CPU: every (tensor, dim, kept-index) slice of a model in one call,
// the tensors spread over threads (each slice is a memory-bound copy done by index_select_out).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "../gather_checks.h"

namespace {

void check_range(const at::Tensor& src, int64_t dim, const at::Tensor& idx, size_t i) {
  if (idx.numel() == 0) return;
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < src.size(dim), "gather_slices: index out of range for tensor ", i, " dim ", dim,
              " of size ", src.size(dim), " (got [", lo, ", ", hi, "])");
}

std::vector<at::Tensor> gather_slices_cpu(at::TensorList src, at::IntArrayRef dim_a, at::TensorList idx_a,
                                          at::IntArrayRef dim_b, const c10::List<std::optional<at::Tensor>>& idx_b) {
  snp_fast::check_gather_args(src, dim_a, idx_a, dim_b, idx_b);
  const size_t n = src.size();
  std::vector<at::Tensor> out(n);
  std::vector<at::Tensor> ib(n);
  for (size_t i = 0; i < n; ++i) {
    check_range(src[i], dim_a[i], idx_a[i], i);
    const std::optional<at::Tensor> b = idx_b.get(i);
    if (b.has_value()) {
      check_range(src[i], dim_b[i], *b, i);
      ib[i] = *b;
    }
    std::vector<int64_t> shape(src[i].sizes().begin(), src[i].sizes().end());
    shape[dim_a[i]] = idx_a[i].numel();
    if (ib[i].defined()) shape[dim_b[i]] = ib[i].numel();
    out[i] = at::empty(shape, src[i].options().memory_format(at::MemoryFormat::Contiguous));
  }
  // One work item per tensor; index_select_out runs serially inside the parallel region.
  at::parallel_for(0, static_cast<int64_t>(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (ib[i].defined()) {
        at::Tensor tmp = src[i].index_select(dim_a[i], idx_a[i]);
        at::index_select_out(out[i], tmp, dim_b[i], ib[i]);
      } else {
        at::index_select_out(out[i], src[i], dim_a[i], idx_a[i]);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(snp_fast, CPU, m) {
  m.impl("gather_slices", &gather_slices_cpu);
}
