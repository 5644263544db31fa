// Gather-based weight slicing on the CPU: every (tensor, dim, kept-index) slice of a model in one call,
// the tensors spread over threads (each slice is a memory-bound copy; large tensors are split by rows).
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

void check_index(const at::Tensor& src, int64_t dim, const at::Tensor& idx, size_t i) {
  TORCH_CHECK(dim >= 0 && dim < src.dim(), "gather_slices: tensor ", i, " has ", src.dim(),
              " dims, slice dim ", dim, " is out of range");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong,
              "gather_slices: indices for tensor ", i, " must be a 1-D int64 tensor");
  if (idx.numel() > 0) {
    const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < src.size(dim), "gather_slices: index out of range for tensor ", i,
                " dim ", dim, " of size ", src.size(dim), " (got [", lo, ", ", hi, "])");
  }
}

std::vector<at::Tensor> gather_slices_cpu(at::TensorList src, at::IntArrayRef dim_a, at::TensorList idx_a,
                                          at::IntArrayRef dim_b, const c10::List<std::optional<at::Tensor>>& idx_b) {
  const size_t n = src.size();
  TORCH_CHECK(dim_a.size() == n && idx_a.size() == n && dim_b.size() == n && idx_b.size() == n,
              "gather_slices: src, dim_a, idx_a, dim_b and idx_b must have the same length");
  std::vector<at::Tensor> out(n);
  std::vector<at::Tensor> ib(n);
  for (size_t i = 0; i < n; ++i) {
    check_index(src[i], dim_a[i], idx_a[i], i);
    const std::optional<at::Tensor> b = idx_b.get(i);
    if (b.has_value()) {
      TORCH_CHECK(dim_b[i] != dim_a[i], "gather_slices: tensor ", i, " slices dim ", dim_a[i], " twice");
      check_index(src[i], dim_b[i], *b, i);
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
