// Recall copy kernel (host HND -> GPU NHD).
//
// Layouts: see layout.cuh. The kernel moves 16-byte vectors and is bit-exact for any 16-bit
// dtype, so it is templated on the geometry only:
//   kRowVecs  = D * 2 / 16   (8, 16, 32 for D = 64, 128, 256)
//   kPageSize = p            (16, 32, 64)
//
// recall_direct_kernel (device-driven): reads the work list on the device and the pinned host
//   pool through its device-mapped address (UVA), writes NHD. No host round trip. Every one of
//   the `num_rows` work rows is visited and rows with host_page < 0 are skipped: the list is
//   fixed-size and padded, and no count travels with it (the work list contract is written
//   once, in python/freekv_sglang/ops/recall.py). One block per work row (grid-stride).
#pragma once

#include "freekv/layout.cuh"

namespace freekv {

constexpr int kCopyThreads = 128;
constexpr int kCopyUnroll = 8;

template <int kRowVecs, int kPageSize>
__global__ void __launch_bounds__(kCopyThreads)
    recall_direct_kernel(const uint4* __restrict__ host, int num_layers, int num_heads,
                         const int32_t* __restrict__ work, int num_rows, LayerKV dst) {
  constexpr int64_t kChunk = 2 * kPageSize * kRowVecs;
  for (int item = blockIdx.x; item < num_rows; item += gridDim.x) {
    const RecallItem w = load_recall_item(work, item);
    if (w.host_page < 0) continue;
    const uint4* src =
        host + host_chunk_index(w.host_page, w.layer, w.head, num_layers, num_heads) * kChunk;
    chunk_hnd_to_nhd<kRowVecs, kPageSize, kCopyUnroll>(src, static_cast<uint4*>(dst.k[w.layer]),
                                                       static_cast<uint4*>(dst.v[w.layer]), w.slot,
                                                       w.head, num_heads);
  }
}

}  // namespace freekv
