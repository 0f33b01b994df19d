// Recall (host HND -> GPU NHD) and offload (GPU NHD -> host HND) copy kernels.
//
// Layouts: see layout.cuh. All kernels move 16-byte vectors and are bit-exact for any 16-bit
// dtype, so they are templated on the geometry only:
//   kRowVecs  = D * 2 / 16   (8, 16, 32 for D = 64, 128, 256)
//   kPageSize = p            (16, 32, 64)
//
// recall_direct_kernel (variant a, device-driven): reads the work list on the device and the
//   pinned host pool through its device-mapped address (UVA), writes NHD. No host round trip;
//   the grid is sized by the work list's capacity and `num_work` (device int32, may be null)
//   bounds it at run time. One block per work item (grid-stride).
// recall_scatter_kernel (variant b, second half): after the copy engine moved `count` chunks
//   into a device staging buffer ([count][2][p][D]), scatters them HND -> NHD; chunk j belongs
//   to work row `first + j`.
// offload_direct_kernel: block (item, head) reads NHD token slots of one page and writes the
//   HND chunk straight into mapped pinned host memory.
#pragma once

#include "freekv/layout.cuh"

namespace freekv {

constexpr int kCopyThreads = 128;
constexpr int kCopyUnroll = 8;

template <int kRowVecs, int kPageSize>
__global__ void __launch_bounds__(kCopyThreads)
    recall_direct_kernel(const uint4* __restrict__ host, int num_layers, int num_heads,
                         const int32_t* __restrict__ work, const int32_t* __restrict__ num_work,
                         int capacity, LayerKV dst) {
  constexpr int64_t kChunk = 2 * kPageSize * kRowVecs;
  const int n = num_work ? min(*num_work, capacity) : capacity;
  for (int item = blockIdx.x; item < n; item += gridDim.x) {
    const RecallItem w = load_recall_item(work, item);
    if (w.host_page < 0) continue;
    const uint4* src =
        host + host_chunk_index(w.host_page, w.layer, w.head, num_layers, num_heads) * kChunk;
    chunk_hnd_to_nhd<kRowVecs, kPageSize, kCopyUnroll>(src, static_cast<uint4*>(dst.k[w.layer]),
                                                       static_cast<uint4*>(dst.v[w.layer]),
                                                       w.slot, w.head, num_heads);
  }
}

template <int kRowVecs, int kPageSize>
__global__ void __launch_bounds__(kCopyThreads)
    recall_scatter_kernel(const uint4* __restrict__ staging, int num_heads,
                          const int32_t* __restrict__ work, int first, int count, LayerKV dst) {
  constexpr int64_t kChunk = 2 * kPageSize * kRowVecs;
  for (int j = blockIdx.x; j < count; j += gridDim.x) {
    const RecallItem w = load_recall_item(work, first + j);
    if (w.host_page < 0) continue;
    chunk_hnd_to_nhd<kRowVecs, kPageSize, kCopyUnroll>(
        staging + j * kChunk, static_cast<uint4*>(dst.k[w.layer]),
        static_cast<uint4*>(dst.v[w.layer]), w.slot, w.head, num_heads);
  }
}

template <int kRowVecs, int kPageSize>
__global__ void __launch_bounds__(kCopyThreads)
    offload_direct_kernel(uint4* __restrict__ host, int num_layers, int num_heads,
                          const int32_t* __restrict__ work, int count, LayerKV src) {
  constexpr int64_t kChunk = 2 * kPageSize * kRowVecs;
  const int head = blockIdx.y;
  for (int item = blockIdx.x; item < count; item += gridDim.x) {
    const OffloadItem w = load_offload_item(work, item);
    if (w.host_page < 0) continue;
    uint4* dst = host + host_chunk_index(w.host_page, w.layer, head, num_layers, num_heads) * kChunk;
    chunk_nhd_to_hnd<kRowVecs, kPageSize, kCopyUnroll>(
        static_cast<const uint4*>(src.k[w.layer]), static_cast<const uint4*>(src.v[w.layer]), dst,
        w.slot, head, num_heads);
  }
}

}  // namespace freekv
