// FlashInfer page-table arrays for the attended sets, built on the device.
//
// Input per request b (padded to M pages):
//   page_starts [B][M] int32   first token slot of each attended page (sink, selected, window;
//                              a page is p consecutive token slots)
//   num_pages   [B]    int32   attended pages of request b (>= 1)
//   last_len    [B]    int32   tokens in its last page, 1..p
// Output, FlashInfer's paged_kv_t vocabulary (pass straight to
// BatchDecodeWithPagedKVCacheWrapper.plan):
//   token_level = 1 (SGLang's FlashInfer backend, page size 1): kv_indices are token slots,
//     kv_indptr[b + 1] - kv_indptr[b] = (num_pages - 1) * p + last_len, kv_last_page_len = 1.
//   token_level = 0 (page size p): kv_indices[j] = page_starts / p, kv_last_page_len = last_len.
// One block per request; block b sums the lengths of requests < b itself (no separate scan).
#pragma once

#include "freekv/common.cuh"

namespace freekv {

constexpr int kPageTableThreads = 256;

FREEKV_DEV int request_len(const int32_t* num_pages, const int32_t* last_len, int b,
                           int page_size, int token_level) {
  return token_level ? (num_pages[b] - 1) * page_size + last_len[b] : num_pages[b];
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    page_table_kernel(const int32_t* __restrict__ page_starts, int max_pages,
                      const int32_t* __restrict__ num_pages, const int32_t* __restrict__ last_len,
                      int page_size, int token_level, int32_t* __restrict__ kv_indptr,
                      int32_t* __restrict__ kv_indices, int32_t* __restrict__ kv_last_page_len) {
  __shared__ long long warp_part[32];
  const int b = blockIdx.x;
  // Offset of request b: the lengths of requests 0 .. b-1, summed exactly in 64-bit integers.
  long long part = 0;
  for (int u = threadIdx.x; u < b; u += blockDim.x)
    part += request_len(num_pages, last_len, u, page_size, token_level);
  for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_part[warp] = part;
  __syncthreads();
  long long offset = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) offset += warp_part[w];
  const int n = num_pages[b];
  const int len = request_len(num_pages, last_len, b, page_size, token_level);
  if (threadIdx.x == 0) {
    if (b == 0) kv_indptr[0] = 0;
    kv_indptr[b + 1] = static_cast<int32_t>(offset + len);
    kv_last_page_len[b] = token_level ? 1 : last_len[b];
  }
  const int32_t* starts = page_starts + static_cast<int64_t>(b) * max_pages;
  if (token_level) {
    for (int e = threadIdx.x; e < len; e += blockDim.x) {
      const int m = e / page_size, t = e - m * page_size;
      kv_indices[offset + e] = starts[m] + t;
    }
  } else {
    for (int m = threadIdx.x; m < n; m += blockDim.x) kv_indices[offset + m] = starts[m] / page_size;
  }
}

}  // namespace freekv
