// KV layouts shared by the host pool and the GPU buffers, and their index math.
//
// Host pool (pinned, written once per page by offload, read by recall), HND per (page, layer):
//   host_kv[num_host_pages][num_layers][H][2][p][D]      (2 = K then V)
//   so one (page, layer, head) chunk is 2 * p * D contiguous elements (16 KiB at p=32, D=128,
//   16-bit dtype): chunk_index(page, layer, head) = (page * num_layers + layer) * H + head.
// GPU buffers (SGLang's MHA pool, FlashInfer page size 1), NHD per layer:
//   k[num_slots][H][D], v[num_slots][H][D]
//   recall writes a page into the p consecutive token slots [slot, slot + p).
// Both dtypes are 16-bit, so a row of D elements is D * 2 bytes = D / 8 16-byte vectors; copies
// move 16-byte vectors (uint4) and are bit-exact.
#pragma once

#include "freekv/common.cuh"

namespace freekv {

// One recall work item: copy host chunk (host_page, layer, head) into token slots
// [slot, slot + p) of head `head` of layer `layer`. Stored as 4 int32 in this order; a row
// with host_page < 0 is padding and is skipped.
struct RecallItem {
  int32_t host_page, layer, head, slot;
};

FREEKV_DEV RecallItem load_recall_item(const int32_t* work, int64_t i) {
  const int32_t* w = work + 4 * i;
  return RecallItem{w[0], w[1], w[2], w[3]};
}

// Index of a (page, layer, head) chunk in the host pool, in chunks.
FREEKV_HD int64_t host_chunk_index(int64_t page, int layer, int head, int num_layers,
                                   int num_heads) {
  return (page * num_layers + layer) * num_heads + head;
}

// Copy one HND chunk `src` ([2][p][D], in 16-byte vectors) into the NHD buffers kd/vd at token
// slots [slot, slot + p) of head `head`. All threads of the block take part; each thread first
// issues kUnroll independent loads and then the stores, so that many loads are in flight (this
// matters when `src` is mapped host memory read over PCIe).
template <int kRowVecs, int kPageSize, int kUnroll>
FREEKV_DEV void chunk_hnd_to_nhd(const uint4* __restrict__ src, uint4* __restrict__ kd,
                                 uint4* __restrict__ vd, int64_t slot, int head, int num_heads) {
  constexpr int kHalf = kPageSize * kRowVecs;
  constexpr int kChunk = 2 * kHalf;
  const int64_t row_stride = static_cast<int64_t>(num_heads) * kRowVecs;
  for (int base = 0; base < kChunk; base += blockDim.x * kUnroll) {
    uint4 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int e = base + u * blockDim.x + threadIdx.x;
      r[u] = e < kChunk ? src[e] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int e = base + u * blockDim.x + threadIdx.x;
      if (e < kChunk) {
        const int kv = e / kHalf;
        const int rem = e - kv * kHalf;
        const int t = rem / kRowVecs;
        const int i = rem - t * kRowVecs;
        uint4* dst = (kv ? vd : kd) + (slot + t) * row_stride + head * kRowVecs + i;
        *dst = r[u];
      }
    }
  }
}

}  // namespace freekv
