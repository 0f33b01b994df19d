// Page digests of filled pages, written into the per-host-page digest store.
//
// Layouts (N = the host pool's capacity in pages):
//   k        [num_slots][H][D]     one layer's GPU key buffer (NHD, token slots)
//   digests  [N][2][H][D]          digest store, one entry per host pool page: lo|hi, head, dim
//   slots    [n]                   int64: the first token slot of item i's page in k
//   pages    [n]                   int64: the host pool page whose digest item i writes;
//                                  pages[i] < 0 skips the item, and so does pages[i] >= N
//                                  (callers must pass pages < N; the kernel never writes
//                                  outside the store)
// kind 0 (minmax): lo = element-wise min, hi = element-wise max over the p tokens (exact).
// kind 1 (mean):   lo = hi = mean over the p tokens, summed in float32 in token order.
// One block per item; threads stride over the H * D elements of a token row (coalesced).
#pragma once

#include "freekv/common.cuh"

namespace freekv {

constexpr int kDigestThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDigestThreads)
    digest_kernel(const T* __restrict__ k, int num_heads, int head_dim, int page_size,
                  const int64_t* __restrict__ slots, const int64_t* __restrict__ pages, int count,
                  T* __restrict__ digests, int64_t num_pages, int kind) {
  const int64_t hd = static_cast<int64_t>(num_heads) * head_dim;
  for (int item = blockIdx.x; item < count; item += gridDim.x) {
    const int64_t page = pages[item];
    if (page < 0 || page >= num_pages) continue;
    const T* base = k + slots[item] * hd;
    T* out = digests + page * 2 * hd;
    for (int64_t e = threadIdx.x; e < hd; e += blockDim.x) {
      if (kind == 0) {
        float lo = to_float(base[e]), hi = lo;
        for (int t = 1; t < page_size; ++t) {
          const float x = to_float(base[t * hd + e]);
          lo = fminf(lo, x);
          hi = fmaxf(hi, x);
        }
        out[e] = from_float<T>(lo);
        out[hd + e] = from_float<T>(hi);
      } else {
        float s = 0.f;
        for (int t = 0; t < page_size; ++t) s += to_float(base[t * hd + e]);
        const T m = from_float<T>(s / static_cast<float>(page_size));
        out[e] = m;
        out[hd + e] = m;
      }
    }
  }
}

}  // namespace freekv
