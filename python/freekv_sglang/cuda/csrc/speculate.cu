// Launcher of the speculation's commit (freekv/speculate.cuh). Called from
// freekv_sglang.ops.speculate on the recall stream (CUDA), after the speculative selection of
// the same layer and step and after the stream waited for the forward stream's correction
// (whose masks and counts it reads); nothing reads the state it writes before the next step's
// correction of the layer, which waits for the recall stream's event.
#include "checks.h"
#include "freekv/speculate.cuh"

namespace freekv {

void commit_speculation(const at::Tensor& regs, const std::optional<at::Tensor>& live,
                        const at::Tensor& next_lens, const at::Tensor& q, const at::Tensor& spec,
                        const at::Tensor& masks, const at::Tensor& corr_counts,
                        const at::Tensor& spec_counts, const at::Tensor& spec_pages,
                        const at::Tensor& spec_len, const at::Tensor& q_prev,
                        const at::Tensor& counts) {
  FREEKV_CHECK_INPUT(q);
  FREEKV_CHECK_DIM(q, 3);
  const int64_t b = q.size(0), h_q = q.size(1), d = q.size(2);
  FREEKV_CHECK_INPUT(spec_pages);
  FREEKV_CHECK_SAME_DEVICE(spec_pages, q);
  FREEKV_CHECK_DTYPE(spec_pages, at::kLong);
  FREEKV_CHECK_DIM(spec_pages, 3);
  const int64_t r = spec_pages.size(0), h = spec_pages.size(1), k = spec_pages.size(2);
  TORCH_CHECK(h >= 1 && h_q % h == 0, "spec_pages.size(1) (KV heads, ", h,
              ") must divide q.size(1) (query heads, ", h_q, ")");
  check_tensor(regs, "regs", at::kLong, {b}, q);
  if (live.has_value()) check_tensor(*live, "live", at::kLong, {b}, q);
  check_tensor(next_lens, "next_lens", at::kLong, {b}, q);
  check_tensor(spec, "spec", at::kLong, {b, h, k}, q);
  check_tensor(masks, "masks", at::kBool, {3, b, h}, q);
  check_tensor(corr_counts, "corr_counts", at::kLong, {b, h, 3}, q);
  check_tensor(spec_counts, "spec_counts", at::kLong, {b, h, 3}, q);
  check_tensor(spec_len, "spec_len", at::kLong, {r}, q);
  check_tensor(q_prev, "q_prev", q.scalar_type(), {r, h_q, d}, q);
  check_tensor(counts, "counts", at::kLong, {r, kNumCounters}, q);
  if (b == 0) return;
  const DeviceGuard guard(q.device());
  const cudaStream_t stream = current_stream();
  dispatch_kv_dtype(q.scalar_type(), "q", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    FREEKV_LAUNCH(static_cast<unsigned>(b), kCommitThreads, 0, stream,
                  commit_speculation_kernel<T>)(
        regs.data_ptr<int64_t>(), live.has_value() ? live->data_ptr<int64_t>() : nullptr,
        next_lens.data_ptr<int64_t>(), static_cast<const T*>(q.data_ptr()),
        spec.data_ptr<int64_t>(), reinterpret_cast<const uint8_t*>(masks.data_ptr<bool>()),
        corr_counts.data_ptr<int64_t>(), spec_counts.data_ptr<int64_t>(), static_cast<int>(h_q),
        static_cast<int>(h), static_cast<int>(d), static_cast<int>(k),
        spec_pages.data_ptr<int64_t>(), spec_len.data_ptr<int64_t>(),
        static_cast<T*>(q_prev.data_ptr()), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace freekv
