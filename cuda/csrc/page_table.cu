// Launcher of the FlashInfer page-table builder (freekv/page_table.cuh). Called from
// freekv_sglang.ops.page_table on the forward stream before the attention plan; outputs use
// FlashInfer's argument names so they go straight to BatchDecodeWithPagedKVCacheWrapper.plan.
#include "checks.h"
#include "freekv/page_table.cuh"

namespace freekv {

void build_page_table(const at::Tensor& page_starts, const at::Tensor& num_pages,
                      const at::Tensor& last_page_len_in, int64_t page_size, bool token_level,
                      const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                      const at::Tensor& kv_last_page_len) {
  FREEKV_CHECK_INPUT(page_starts);
  FREEKV_CHECK_DTYPE(page_starts, at::kInt);
  FREEKV_CHECK_DIM(page_starts, 2);
  const int64_t b = page_starts.size(0);
  for (const at::Tensor* t : {&num_pages, &last_page_len_in, &kv_last_page_len}) {
    const char* name = t == &num_pages
                           ? "num_pages"
                           : (t == &last_page_len_in ? "last_page_len" : "kv_last_page_len");
    TORCH_CHECK(on_device(*t) && t->is_contiguous() && t->scalar_type() == at::kInt &&
                    t->dim() == 1 && t->numel() == b && t->device() == page_starts.device(),
                name, " must be a contiguous int32 CUDA vector of ", b,
                " entries on page_starts' device, got ", t->scalar_type(), " ", t->sizes(),
                " on ", t->device());
  }
  FREEKV_CHECK_INPUT(kv_indptr);
  FREEKV_CHECK_SAME_DEVICE(kv_indptr, page_starts);
  FREEKV_CHECK_DTYPE(kv_indptr, at::kInt);
  TORCH_CHECK(kv_indptr.dim() == 1 && kv_indptr.numel() == b + 1, "kv_indptr must have shape [",
              b + 1, "], got ", kv_indptr.sizes());
  FREEKV_CHECK_INPUT(kv_indices);
  FREEKV_CHECK_SAME_DEVICE(kv_indices, page_starts);
  FREEKV_CHECK_DTYPE(kv_indices, at::kInt);
  FREEKV_CHECK_DIM(kv_indices, 1);
  const int64_t need = b * page_starts.size(1) * (token_level ? page_size : 1);
  TORCH_CHECK(kv_indices.numel() >= need, "kv_indices must hold at least ", need,
              " entries (batch * max_pages", token_level ? " * page_size" : "", "), got ",
              kv_indices.numel());
  TORCH_CHECK(page_size >= 1, "page_size must be >= 1, got ", page_size);
  if (b == 0) return;
  const DeviceGuard guard(page_starts.device());
  const cudaStream_t stream = current_stream();
  FREEKV_LAUNCH(static_cast<unsigned>(b), kPageTableThreads, 0, stream, page_table_kernel<kPageTableThreads>)(
      page_starts.data_ptr<int32_t>(), static_cast<int>(page_starts.size(1)),
      num_pages.data_ptr<int32_t>(), last_page_len_in.data_ptr<int32_t>(),
      static_cast<int>(page_size), token_level ? 1 : 0, kv_indptr.data_ptr<int32_t>(),
      kv_indices.data_ptr<int32_t>(), kv_last_page_len.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace freekv
