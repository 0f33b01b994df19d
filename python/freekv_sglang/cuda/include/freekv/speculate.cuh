// The speculation's commit (FreeKV), the tail of the speculative selection's select/delta
// kernel (freekv/select.cuh): once a (request, KV head) block's selection is final, it writes
// that selection and its query rows into the speculation state of the request's budget region
// and adds its share of the step's counters. No launch of its own.
//
// Layouts (B requests, R regions, H KV heads, G query heads per KV head, D head dim, K selected
// pages, C = 7 counters in freekv_sglang.state.COUNTER_NAMES order):
//   live [B] int64 (0: an inert padding row, which writes and counts nothing) or null,
//   q [B][H*G][D] 16-bit elements (copied bitwise), masks [3][B][H] uint8 (have_spec,
//   corrected, redo: the same step's correction), corr_counts [B][H][3] int64 (the correction's
//   selection: hits, recalled, selected); spec_pages [R][H][K] int64, spec_len [R] int64,
//   q_prev [R][H*G][D], counts [R][C] int64. Live requests have distinct regions.
// Counters of head h of request b, added to region rows[b]: steps +1 (head 0 only), checks
// +have_spec, corrections +corrected, selections +(redo + 1) (the correction's and this
// selection), then hits, recalled, selected of both selections (atomic: the heads of a request
// add to one row).
#pragma once

#include "freekv/common.cuh"

namespace freekv {

constexpr int kNumCounters = 7;

struct CommitArgs {
  const int64_t* live;  // may be null
  const uint16_t* q;    // null: no commit
  const uint8_t* masks;
  const int64_t* corr_counts;
  int64_t* spec_pages;
  int64_t* spec_len;
  uint16_t* q_prev;
  int64_t* counts;
};

// Called by every thread of the select block of (b, h), after its selection is final:
// `sorted` holds its `kk` selected pages best first and `hit` whether each was resident.
FREEKV_DEV void commit_head(const CommitArgs& c, int b, int h, int batch, int num_kv_heads,
                            int group, int head_dim, int top_k, int64_t row, int64_t next_len,
                            const int* sorted, const uint8_t* hit, int kk) {
  if (c.live != nullptr && c.live[b] == 0) return;  // uniform over the block
  const int H = num_kv_heads;
  int64_t* pages = c.spec_pages + (row * H + h) * top_k;
  for (int k = threadIdx.x; k < top_k; k += blockDim.x) pages[k] = k < kk ? sorted[k] : -1;
  const int64_t rows_q = static_cast<int64_t>(group) * head_dim;  // this head's query rows
  const int64_t all_q = rows_q * H;
  const uint16_t* src = c.q + b * all_q + h * rows_q;
  uint16_t* dst = c.q_prev + row * all_q + h * rows_q;
  for (int64_t i = threadIdx.x; i < rows_q; i += blockDim.x) dst[i] = src[i];
  if (threadIdx.x == 0) {
    if (h == 0) c.spec_len[row] = next_len;
    int hits = 0;
    for (int k = 0; k < kk; ++k) hits += hit[k];
    const int64_t bh = static_cast<int64_t>(b) * H + h, plane = static_cast<int64_t>(batch) * H;
    const int64_t* cc = c.corr_counts + bh * 3;
    const int64_t add[kNumCounters] = {
        h == 0 ? 1 : 0, c.masks[bh],         c.masks[plane + bh], c.masks[2 * plane + bh] + 1,
        cc[0] + hits,   cc[1] + (kk - hits), cc[2] + kk};
    auto* out = reinterpret_cast<unsigned long long*>(c.counts + row * kNumCounters);
    for (int i = 0; i < kNumCounters; ++i)
      if (add[i] != 0) atomicAdd(out + i, static_cast<unsigned long long>(add[i]));
  }
}

}  // namespace freekv
