// Launcher of the page-digest kernel (freekv/digest.cuh). Called from
// freekv_sglang.ops.digest on the caller's current stream (the forward stream, right after
// the step's key is written), so the digest is ordered before the next selection reads it.
//
// k_buffer [num_slots][H][D]  one layer's keys (16-bit)
// slots    [n] int64          first token slot of each page in k_buffer
// pages    [n] int64          host pool page of each entry; < 0 skips it. Values must be < N:
//                             they live on the device, so they are not checked here, and the
//                             kernel skips pages >= N rather than write outside the store
// digests  [N][2][H][D]       per-host-page digest store of k_buffer's dtype
#include "checks.h"
#include "freekv/digest.cuh"

namespace freekv {

void page_digest(const at::Tensor& k_buffer, const at::Tensor& slots, const at::Tensor& pages,
                 const at::Tensor& digests, int64_t page_size, int64_t kind) {
  FREEKV_CHECK_INPUT(k_buffer);
  FREEKV_CHECK_DIM(k_buffer, 3);
  FREEKV_CHECK_INPUT(digests);
  FREEKV_CHECK_DIM(digests, 4);
  FREEKV_CHECK_SAME_DEVICE(digests, k_buffer);
  FREEKV_CHECK_DTYPE(digests, k_buffer.scalar_type());
  FREEKV_CHECK_SIZE(digests, 1, 2);
  FREEKV_CHECK_SIZE(digests, 2, k_buffer.size(1));
  FREEKV_CHECK_SIZE(digests, 3, k_buffer.size(2));
  const int64_t n = slots.numel();
  for (const at::Tensor* t : {&slots, &pages}) {
    const char* name = t == &slots ? "slots" : "pages";
    TORCH_CHECK(on_device(*t) && t->is_contiguous() && t->scalar_type() == at::kLong &&
                    t->dim() == 1 && t->numel() == n && t->device() == k_buffer.device(),
                name, " must be a contiguous int64 CUDA vector of ", n,
                " entries on k_buffer's device, got ", t->scalar_type(), " ", t->sizes(), " on ",
                t->device());
  }
  TORCH_CHECK(page_size >= 1, "page_size must be >= 1, got ", page_size);
  TORCH_CHECK(kind == 0 || kind == 1, "kind must be 0 (minmax) or 1 (mean), got ", kind);
  if (n == 0) return;
  const DeviceGuard guard(k_buffer.device());
  const cudaStream_t stream = current_stream();
  const int grid = static_cast<int>(std::min<int64_t>(n, int64_t{sm_count()} * 16));
  dispatch_kv_dtype(k_buffer.scalar_type(), "k_buffer", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    FREEKV_LAUNCH(grid, kDigestThreads, 0, stream, digest_kernel<T>)(
        static_cast<const T*>(k_buffer.data_ptr()), static_cast<int>(k_buffer.size(1)),
        static_cast<int>(k_buffer.size(2)), static_cast<int>(page_size), slots.data_ptr<int64_t>(),
        pages.data_ptr<int64_t>(), static_cast<int>(n), static_cast<T*>(digests.data_ptr()),
        digests.size(0), static_cast<int>(kind));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace freekv
