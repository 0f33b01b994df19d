// Launcher of recall (host HND -> GPU NHD).
//
// Called from freekv_sglang.ops.recall on the caller's current stream (normally a dedicated
// recall stream; the caller records an event after the call and the consumer waits on it).
//
// host_kv   [num_host_pages][L][H][2][p][D]  pinned CPU, 16-bit dtype (the host pool's arena)
// k_buffers, v_buffers  L tensors [num_slots][H][D] on the GPU (SGLang's per-layer buffers)
// work      [W][4] int32 (host_page, layer, head, slot) rows; every row is processed and
//           host_page < 0 is padding (the work list contract: python/freekv_sglang/ops/recall.py)
//
// ctas      blocks of the kernel (>= 1; grid-stride over the rows). Reading mapped host memory,
//           a few blocks keep PCIe busy; every block more takes an SM's slots from the compute
//           the recall should hide behind (the op's default: python/freekv_sglang/ops/recall.py)
//
// recall_direct: the work list stays on the device, where select_pages wrote it, and one kernel
// reads mapped host memory, so a decode step never waits for the host.
#include "checks.h"
#include "freekv/recall.cuh"

namespace freekv {
namespace {

struct HostGeom {
  int64_t num_pages, num_layers, num_heads, page_size, head_dim;
};

HostGeom check_host_kv(const at::Tensor& host_kv) {
  FREEKV_CHECK_CPU(host_kv);
  FREEKV_CHECK_CONTIGUOUS(host_kv);
  FREEKV_CHECK_DIM(host_kv, 6);
  FREEKV_CHECK_SIZE(host_kv, 3, 2);
  TORCH_CHECK(is_pinned_host(host_kv), "host_kv must be pinned (page-locked) host memory");
  return HostGeom{host_kv.size(0), host_kv.size(1), host_kv.size(2), host_kv.size(4),
                  host_kv.size(5)};
}

void check_work(const at::Tensor& work, int64_t cols) {
  FREEKV_CHECK_CONTIGUOUS(work);
  FREEKV_CHECK_DTYPE(work, at::kInt);
  FREEKV_CHECK_DIM(work, 2);
  FREEKV_CHECK_SIZE(work, 1, cols);
}

}  // namespace

void recall_direct(const at::Tensor& host_kv, const at::Tensor& work,
                   const std::vector<at::Tensor>& k_buffers,
                   const std::vector<at::Tensor>& v_buffers, int64_t ctas) {
  TORCH_CHECK(ctas >= 1 && ctas <= 65535,
              "ctas (blocks of the recall kernel) must be in [1, 65535], got ", ctas);
  const HostGeom g = check_host_kv(host_kv);
  FREEKV_CHECK_CUDA(work);
  check_work(work, 4);
  int64_t num_slots = 0;
  const LayerKV dst =
      layer_kv(k_buffers, v_buffers, host_kv.scalar_type(), g.num_heads, g.head_dim, &num_slots);
  TORCH_CHECK(g.num_layers == static_cast<int64_t>(k_buffers.size()), "host_kv.size(1) (",
              g.num_layers, " layers) must equal len(k_buffers) (", k_buffers.size(), ")");
  FREEKV_CHECK_SAME_DEVICE(work, k_buffers[0]);
  dispatch_kv_dtype(host_kv.scalar_type(), "host_kv", [](auto) {});
  const int64_t num_rows = work.size(0);
  if (num_rows == 0) return;
  TORCH_CHECK(num_rows < (int64_t{1} << 31), "work must have fewer than 2^31 rows, got ", num_rows);
  const DeviceGuard guard(work.device());
  const void* host = mapped_device_ptr(host_kv, "host_kv");
  const cudaStream_t stream = current_stream();
  const int grid = static_cast<int>(std::min<int64_t>(num_rows, ctas));
  dispatch_geometry(g.head_dim, g.page_size, [&](auto rv, auto ps) {
    constexpr int R = decltype(rv)::value, PS = decltype(ps)::value;
    FREEKV_LAUNCH(grid, kCopyThreads, 0, stream, recall_direct_kernel<R, PS>)(
        static_cast<const uint4*>(host), static_cast<int>(g.num_layers),
        static_cast<int>(g.num_heads), work.data_ptr<int32_t>(), static_cast<int>(num_rows), dst);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace freekv
