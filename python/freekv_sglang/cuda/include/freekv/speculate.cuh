// The speculation's commit (FreeKV): after the speculative selection of step t+1, write it and
// its query into the speculation state of the requests' budget regions and add the step's
// counters, in one launch.
//
// Layouts (B requests, R regions, H KV heads, H_q query heads, K selected pages, C = 7
// counters in freekv_sglang.state.COUNTER_NAMES order):
//   regs [B] int64 (region of request b, in [0, R); live requests have distinct regions),
//   live [B] int64 (0: an inert padding row, which writes and counts nothing) or null,
//   next_lens [B] int64, q [B][H_q][D], spec [B][H][K] int64 (the speculative selection),
//   masks [3][B][H] uint8 (have_spec, corrected, redo: the correction's, same step),
//   corr_counts, spec_counts [B][H][3] int64 (the two selections' hits, recalled, selected);
//   spec_pages [R][H][K] int64, spec_len [R] int64, q_prev [R][H_q][D], counts [R][C] int64.
// Counters added to region regs[b], summed over its heads: steps +1, checks +have_spec,
// corrections +corrected, selections +(redo + 1) (the correction's and the speculation's),
// then hits, recalled, selected of both selections. One block per request.
#pragma once

#include "freekv/common.cuh"

namespace freekv {

constexpr int kCommitThreads = 128;
constexpr int kNumCounters = 7;

template <typename T>
__global__ void __launch_bounds__(kCommitThreads)
    commit_speculation_kernel(const int64_t* __restrict__ regs, const int64_t* __restrict__ live,
                              const int64_t* __restrict__ next_lens, const T* __restrict__ q,
                              const int64_t* __restrict__ spec, const uint8_t* __restrict__ masks,
                              const int64_t* __restrict__ corr_counts,
                              const int64_t* __restrict__ spec_counts, int num_q_heads,
                              int num_kv_heads, int head_dim, int top_k,
                              int64_t* __restrict__ spec_pages, int64_t* __restrict__ spec_len,
                              T* __restrict__ q_prev, int64_t* __restrict__ counts) {
  const int b = blockIdx.x, batch = gridDim.x;
  if (live != nullptr && live[b] == 0) return;  // uniform over the block
  const int64_t r = regs[b];
  const int64_t sel = static_cast<int64_t>(num_kv_heads) * top_k;
  for (int64_t i = threadIdx.x; i < sel; i += blockDim.x)
    spec_pages[r * sel + i] = spec[b * sel + i];
  const int64_t qn = static_cast<int64_t>(num_q_heads) * head_dim;
  for (int64_t i = threadIdx.x; i < qn; i += blockDim.x) q_prev[r * qn + i] = q[b * qn + i];
  if (threadIdx.x == 0) spec_len[r] = next_lens[b];
  if (threadIdx.x < kNumCounters) {
    const int c = threadIdx.x;
    int64_t sum = 0;
    if (c == 0) {
      sum = 1;
    } else if (c < 4) {
      const uint8_t* m = masks + static_cast<int64_t>(c - 1) * batch * num_kv_heads;
      for (int h = 0; h < num_kv_heads; ++h) sum += m[b * num_kv_heads + h];
      if (c == 3) sum += num_kv_heads;
    } else {
      for (int h = 0; h < num_kv_heads; ++h) {
        const int64_t at = (static_cast<int64_t>(b) * num_kv_heads + h) * 3 + (c - 4);
        sum += corr_counts[at] + spec_counts[at];
      }
    }
    counts[r * kNumCounters + c] += sum;
  }
}

}  // namespace freekv
