// Launchers of recall (host HND -> GPU NHD) and offload (GPU NHD -> host), variants a and b.
//
// Called from freekv_sglang.ops.recall on the caller's current stream (normally a dedicated
// recall stream; the caller records an event after the call and the consumer waits on it).
//
// host_kv   [num_host_pages][L][H][2][p][D]  pinned CPU, 16-bit dtype (the host pool's arena)
// k_buffers, v_buffers  L tensors [num_slots][H][D] on the GPU (SGLang's per-layer buffers)
// work      [N][4] int32 (host_page, layer, head, slot) rows; host_page < 0 = padding
//
// recall_direct (a): the work list stays on the device; one kernel reads mapped host memory.
// recall_staged (b): the work list is on the host; the copy engine moves batches of chunks
//   into two alternating device staging buffers on a side stream while the current stream
//   scatters the previous batch. Events order (i) the side stream after the caller's prior
//   work, (ii) each scatter after its batch's copies, (iii) each batch's copies after the
//   scatter that last read the same staging buffer. Everything ends on the current stream.
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
                   const std::optional<at::Tensor>& num_work,
                   const std::vector<at::Tensor>& k_buffers,
                   const std::vector<at::Tensor>& v_buffers) {
  const HostGeom g = check_host_kv(host_kv);
  FREEKV_CHECK_CUDA(work);
  check_work(work, 4);
  int64_t num_slots = 0;
  const LayerKV dst =
      layer_kv(k_buffers, v_buffers, host_kv.scalar_type(), g.num_heads, g.head_dim, &num_slots);
  TORCH_CHECK(g.num_layers == static_cast<int64_t>(k_buffers.size()), "host_kv.size(1) (",
              g.num_layers, " layers) must equal len(k_buffers) (", k_buffers.size(), ")");
  FREEKV_CHECK_SAME_DEVICE(work, k_buffers[0]);
  const int32_t* count = nullptr;
  if (num_work.has_value()) {
    FREEKV_CHECK_INPUT(*num_work);
    FREEKV_CHECK_DTYPE(*num_work, at::kInt);
    TORCH_CHECK(num_work->numel() == 1, "num_work must hold one int32, got shape ",
                num_work->sizes());
    FREEKV_CHECK_SAME_DEVICE(*num_work, work);
    count = num_work->data_ptr<int32_t>();
  }
  dispatch_kv_dtype(host_kv.scalar_type(), "host_kv", [](auto) {});
  const int64_t capacity = work.size(0);
  if (capacity == 0) return;
  TORCH_CHECK(capacity < (int64_t{1} << 31), "work has too many rows: ", capacity);
  const DeviceGuard guard(work.device());
  const void* host = mapped_device_ptr(host_kv, "host_kv");
  const cudaStream_t stream = current_stream();
  const int grid = static_cast<int>(std::min<int64_t>(capacity, int64_t{sm_count()} * 16));
  dispatch_geometry(g.head_dim, g.page_size, [&](auto rv, auto ps) {
    constexpr int R = decltype(rv)::value, PS = decltype(ps)::value;
    FREEKV_LAUNCH(grid, kCopyThreads, 0, stream, recall_direct_kernel<R, PS>)(
        static_cast<const uint4*>(host), static_cast<int>(g.num_layers),
        static_cast<int>(g.num_heads), work.data_ptr<int32_t>(), count,
        static_cast<int>(capacity), dst);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void recall_staged(const at::Tensor& host_kv, const at::Tensor& work_host,
                   const std::vector<at::Tensor>& k_buffers,
                   const std::vector<at::Tensor>& v_buffers, const at::Tensor& staging) {
  const HostGeom g = check_host_kv(host_kv);
  FREEKV_CHECK_CPU(work_host);
  check_work(work_host, 4);
  int64_t num_slots = 0;
  const LayerKV dst =
      layer_kv(k_buffers, v_buffers, host_kv.scalar_type(), g.num_heads, g.head_dim, &num_slots);
  TORCH_CHECK(g.num_layers == static_cast<int64_t>(k_buffers.size()), "host_kv.size(1) (",
              g.num_layers, " layers) must equal len(k_buffers) (", k_buffers.size(), ")");
  FREEKV_CHECK_INPUT(staging);
  FREEKV_CHECK_SAME_DEVICE(staging, k_buffers[0]);
  FREEKV_CHECK_DTYPE(staging, host_kv.scalar_type());
  FREEKV_CHECK_DIM(staging, 5);
  FREEKV_CHECK_SIZE(staging, 0, 2);
  FREEKV_CHECK_SIZE(staging, 2, 2);
  FREEKV_CHECK_SIZE(staging, 3, g.page_size);
  FREEKV_CHECK_SIZE(staging, 4, g.head_dim);
  const int64_t per_batch = staging.size(1);
  TORCH_CHECK(per_batch >= 1, "staging.size(1) (chunks per batch) must be >= 1");

  // Valid rows, validated on the host (this variant has the list on the host anyway).
  const int32_t* w = work_host.data_ptr<int32_t>();
  std::vector<int32_t> items;
  items.reserve(static_cast<size_t>(work_host.size(0)) * 4);
  for (int64_t i = 0; i < work_host.size(0); ++i) {
    const int32_t* r = w + 4 * i;
    if (r[0] < 0) continue;
    TORCH_CHECK(r[0] < g.num_pages && r[1] >= 0 && r[1] < g.num_layers && r[2] >= 0 &&
                    r[2] < g.num_heads && r[3] >= 0 && r[3] + g.page_size <= num_slots,
                "work_host row ", i, " = (", r[0], ", ", r[1], ", ", r[2], ", ", r[3],
                ") is out of range");
    items.insert(items.end(), r, r + 4);
  }
  const int64_t n = static_cast<int64_t>(items.size() / 4);
  if (n == 0) return;

  const DeviceGuard guard(staging.device());
  const cudaStream_t stream = current_stream();
  const cudaStream_t copy_stream = side_stream(staging.device());
  at::Tensor items_pinned =
      at::empty({n, 4}, pinned_host_options().dtype(at::kInt));
  std::memcpy(items_pinned.data_ptr<int32_t>(), items.data(), items.size() * sizeof(int32_t));
  const at::Tensor items_dev = items_pinned.to(staging.device(), /*non_blocking=*/true);

  const int64_t esize = host_kv.element_size();
  const int64_t chunk_bytes = 2 * g.page_size * g.head_dim * esize;
  const char* host_base = static_cast<const char*>(host_kv.data_ptr());
  char* stage_base = static_cast<char*>(staging.data_ptr());
  auto chunk_of = [&](int64_t i) {
    const int32_t* r = items.data() + 4 * i;
    return host_chunk_index(r[0], r[1], r[2], static_cast<int>(g.num_layers),
                            static_cast<int>(g.num_heads));
  };

  cudaEvent_t ready, copied[2], scattered[2];
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
  for (int i = 0; i < 2; ++i) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&copied[i], cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&scattered[i], cudaEventDisableTiming));
  }
  C10_CUDA_CHECK(cudaEventRecord(ready, stream));
  C10_CUDA_CHECK(cudaStreamWaitEvent(copy_stream, ready, 0));
  const int64_t num_batches = (n + per_batch - 1) / per_batch;
  for (int64_t u = 0; u < num_batches; ++u) {
    const int buf = static_cast<int>(u & 1);
    const int64_t first = u * per_batch;
    const int64_t count = std::min(per_batch, n - first);
    if (u >= 2) C10_CUDA_CHECK(cudaStreamWaitEvent(copy_stream, scattered[buf], 0));
    char* dst_buf = stage_base + buf * per_batch * chunk_bytes;
    for (int64_t j = 0; j < count;) {
      const int64_t c0 = chunk_of(first + j);
      int64_t run = 1;
      while (j + run < count && chunk_of(first + j + run) == c0 + run) ++run;
      C10_CUDA_CHECK(cudaMemcpyAsync(dst_buf + j * chunk_bytes, host_base + c0 * chunk_bytes,
                                     run * chunk_bytes, cudaMemcpyHostToDevice, copy_stream));
      j += run;
    }
    C10_CUDA_CHECK(cudaEventRecord(copied[buf], copy_stream));
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream, copied[buf], 0));
    const int grid = static_cast<int>(std::min<int64_t>(count, int64_t{sm_count()} * 16));
    dispatch_geometry(g.head_dim, g.page_size, [&](auto rv, auto ps) {
      constexpr int R = decltype(rv)::value, PS = decltype(ps)::value;
      FREEKV_LAUNCH(grid, kCopyThreads, 0, stream, recall_scatter_kernel<R, PS>)(
          reinterpret_cast<const uint4*>(dst_buf), static_cast<int>(g.num_heads),
          items_dev.data_ptr<int32_t>(), static_cast<int>(first), static_cast<int>(count), dst);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    C10_CUDA_CHECK(cudaEventRecord(scattered[buf], stream));
  }
  // Destroying a recorded event is safe: it is released once the device reaches it.
  C10_CUDA_CHECK(cudaEventDestroy(ready));
  for (int i = 0; i < 2; ++i) {
    C10_CUDA_CHECK(cudaEventDestroy(copied[i]));
    C10_CUDA_CHECK(cudaEventDestroy(scattered[i]));
  }
}

void offload_direct(const std::vector<at::Tensor>& k_buffers,
                    const std::vector<at::Tensor>& v_buffers, const at::Tensor& work,
                    const at::Tensor& host_kv) {
  const HostGeom g = check_host_kv(host_kv);
  FREEKV_CHECK_CUDA(work);
  check_work(work, 3);
  int64_t num_slots = 0;
  const LayerKV src =
      layer_kv(k_buffers, v_buffers, host_kv.scalar_type(), g.num_heads, g.head_dim, &num_slots);
  TORCH_CHECK(g.num_layers == static_cast<int64_t>(k_buffers.size()), "host_kv.size(1) (",
              g.num_layers, " layers) must equal len(k_buffers) (", k_buffers.size(), ")");
  FREEKV_CHECK_SAME_DEVICE(work, k_buffers[0]);
  const int64_t count = work.size(0);
  if (count == 0) return;
  TORCH_CHECK(g.num_heads <= 65535, "host_kv.size(2) (KV heads) must be <= 65535");
  const DeviceGuard guard(work.device());
  void* host = mapped_device_ptr(host_kv, "host_kv");
  const cudaStream_t stream = current_stream();
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(count, int64_t{sm_count()} * 16)),
                  static_cast<unsigned>(g.num_heads));
  dispatch_geometry(g.head_dim, g.page_size, [&](auto rv, auto ps) {
    constexpr int R = decltype(rv)::value, PS = decltype(ps)::value;
    FREEKV_LAUNCH(grid, kCopyThreads, 0, stream, offload_direct_kernel<R, PS>)(
        static_cast<uint4*>(host), static_cast<int>(g.num_layers), static_cast<int>(g.num_heads),
        work.data_ptr<int32_t>(), static_cast<int>(count), src);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void offload_staged(const std::vector<at::Tensor>& k_buffers,
                    const std::vector<at::Tensor>& v_buffers, const at::Tensor& work_host,
                    const at::Tensor& staging_host) {
  FREEKV_CHECK_CPU(work_host);
  check_work(work_host, 3);
  FREEKV_CHECK_CPU(staging_host);
  FREEKV_CHECK_CONTIGUOUS(staging_host);
  FREEKV_CHECK_DIM(staging_host, 5);
  TORCH_CHECK(is_pinned_host(staging_host), "staging_host must be pinned (page-locked) host memory");
  const int64_t n = work_host.size(0), p = staging_host.size(2);
  FREEKV_CHECK_SIZE(staging_host, 0, n);
  FREEKV_CHECK_SIZE(staging_host, 1, 2);
  int64_t num_slots = 0;
  const LayerKV src = layer_kv(k_buffers, v_buffers, staging_host.scalar_type(),
                               staging_host.size(3), staging_host.size(4), &num_slots);
  (void)src;
  if (n == 0) return;
  const DeviceGuard guard(k_buffers[0].device());
  const cudaStream_t stream = current_stream();
  const int64_t row_bytes = staging_host.size(3) * staging_host.size(4) * staging_host.element_size();
  const int64_t page_bytes = p * row_bytes;
  char* out = static_cast<char*>(staging_host.data_ptr());
  const int32_t* w = work_host.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int32_t slot = w[3 * i], host_page = w[3 * i + 1], layer = w[3 * i + 2];
    if (host_page < 0) continue;
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(k_buffers.size()) && slot >= 0 &&
                    slot + p <= num_slots,
                "work_host row ", i, " = (", slot, ", ", host_page, ", ", layer,
                ") is out of range");
    for (int kv = 0; kv < 2; ++kv) {
      const char* from = static_cast<const char*>((kv ? v_buffers : k_buffers)[layer].data_ptr());
      C10_CUDA_CHECK(cudaMemcpyAsync(out + (2 * i + kv) * page_bytes, from + slot * row_bytes,
                                     page_bytes, cudaMemcpyDeviceToHost, stream));
    }
  }
}

}  // namespace freekv
