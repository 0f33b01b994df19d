// Launchers of the correction kernels (freekv/correct.cuh). Called from freekv_sglang.ops.correct
// on the forward stream right after the layer's query is computed; the flags (or the masks'
// redo plane) feed select_pages(head_mask=...) on the same stream, so no host sync is needed.
#include "checks.h"
#include "freekv/correct.cuh"

namespace freekv {

void correction_flags(const at::Tensor& q, const at::Tensor& q_prev, int64_t num_kv_heads,
                      double tau, bool use_tau, const at::Tensor& cos_mean,
                      const at::Tensor& flags) {
  FREEKV_CHECK_INPUT(q);
  FREEKV_CHECK_DIM(q, 3);
  FREEKV_CHECK_INPUT(q_prev);
  FREEKV_CHECK_SAME_DEVICE(q_prev, q);
  FREEKV_CHECK_DTYPE(q_prev, q.scalar_type());
  TORCH_CHECK(q_prev.sizes() == q.sizes(), "q_prev must have the shape of q ", q.sizes(), ", got ",
              q_prev.sizes());
  const int64_t b = q.size(0), h_q = q.size(1);
  TORCH_CHECK(num_kv_heads >= 1 && h_q % num_kv_heads == 0, "num_kv_heads (", num_kv_heads,
              ") must divide the query heads q.size(1) (", h_q, ")");
  FREEKV_CHECK_INPUT(cos_mean);
  FREEKV_CHECK_SAME_DEVICE(cos_mean, q);
  FREEKV_CHECK_DTYPE(cos_mean, at::kFloat);
  FREEKV_CHECK_DIM(cos_mean, 2);
  FREEKV_CHECK_SIZE(cos_mean, 0, b);
  FREEKV_CHECK_SIZE(cos_mean, 1, num_kv_heads);
  FREEKV_CHECK_INPUT(flags);
  FREEKV_CHECK_SAME_DEVICE(flags, q);
  FREEKV_CHECK_DTYPE(flags, at::kBool);
  FREEKV_CHECK_DIM(flags, 2);
  FREEKV_CHECK_SIZE(flags, 0, b);
  FREEKV_CHECK_SIZE(flags, 1, num_kv_heads);
  if (b == 0) return;
  const DeviceGuard guard(q.device());
  const cudaStream_t stream = current_stream();
  dispatch_kv_dtype(q.scalar_type(), "q", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    FREEKV_LAUNCH(static_cast<unsigned>(b * num_kv_heads), kCorrectThreads, 0, stream,
                  correct_kernel<T>)(
        static_cast<const T*>(q.data_ptr()), static_cast<const T*>(q_prev.data_ptr()),
        static_cast<int>(h_q), static_cast<int>(num_kv_heads), static_cast<int>(q.size(2)),
        static_cast<float>(tau), use_tau ? 1 : 0, cos_mean.data_ptr<float>(),
        reinterpret_cast<uint8_t*>(flags.data_ptr<bool>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void correction_masks(const at::Tensor& q, const at::Tensor& q_prev, const at::Tensor& regs,
                      const at::Tensor& seq_lens, const at::Tensor& spec_len, int64_t num_kv_heads,
                      double tau, bool use_tau, const at::Tensor& masks) {
  FREEKV_CHECK_INPUT(q);
  FREEKV_CHECK_DIM(q, 3);
  const int64_t b = q.size(0), h_q = q.size(1), d = q.size(2);
  FREEKV_CHECK_INPUT(q_prev);
  FREEKV_CHECK_SAME_DEVICE(q_prev, q);
  FREEKV_CHECK_DTYPE(q_prev, q.scalar_type());
  FREEKV_CHECK_DIM(q_prev, 3);
  FREEKV_CHECK_SIZE(q_prev, 1, h_q);
  FREEKV_CHECK_SIZE(q_prev, 2, d);
  const int64_t r = q_prev.size(0);
  TORCH_CHECK(num_kv_heads >= 1 && h_q % num_kv_heads == 0, "num_kv_heads (", num_kv_heads,
              ") must divide the query heads q.size(1) (", h_q, ")");
  check_tensor(regs, "regs", at::kLong, {b}, q);
  check_tensor(seq_lens, "seq_lens", at::kLong, {b}, q);
  check_tensor(spec_len, "spec_len", at::kLong, {r}, q);
  check_tensor(masks, "masks", at::kBool, {3, b, num_kv_heads}, q);
  if (b == 0) return;
  const DeviceGuard guard(q.device());
  const cudaStream_t stream = current_stream();
  dispatch_kv_dtype(q.scalar_type(), "q", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    FREEKV_LAUNCH(static_cast<unsigned>(b * num_kv_heads), kCorrectThreads, 0, stream,
                  correction_masks_kernel<T>)(
        static_cast<const T*>(q.data_ptr()), static_cast<const T*>(q_prev.data_ptr()),
        regs.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), spec_len.data_ptr<int64_t>(),
        static_cast<int>(h_q), static_cast<int>(num_kv_heads), static_cast<int>(d),
        static_cast<float>(tau), use_tau ? 1 : 0,
        reinterpret_cast<uint8_t*>(masks.data_ptr<bool>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace freekv
