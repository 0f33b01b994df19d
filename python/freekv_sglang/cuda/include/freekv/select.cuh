// Page selection on the device: Quest scores over a ragged batch, GQA reduction, per-KV-head
// top-k, delta against the resident set, and the recall work list. No host synchronisation.
//
// Layouts (B requests, H_q query heads, H KV heads, G = H_q / H, D head dim, N host pool pages,
// R budget regions (the rows of the residency stores), P pages per region, K selected pages,
// S >= K budget slots):
//   q            [B][H_q][D]        T      query of the step (query head g -> KV head g / G)
//   digests      [N][2][H][D]       T      per host pool page: lo (min) | hi (max) per KV head
//   rows         [B]                int64  budget region of each request (distinct, < R)
//   seq_lens     [B]                int64  tokens at which the selection will be attended
//   slot_to_page [R][H][S]          int64  residency (in/out), -1 = empty slot
//   page_to_slot [R][H][P]          int64  inverse map (in/out), -1 = not resident
//   host_pages   [R][P]             int64  host pool page of each logical page: the digest of
//                                          logical page j of request b is
//                                          digests[host_pages[rows[b]][j]]
//   slot_tokens  [R][S]             int64  first GPU token slot of each budget slot
//   raw          [B][H_q][P]        f32    scratch: Quest scores (written for the selectable
//                                          candidates of the flagged heads only; nothing else
//                                          in it is defined)
//   page_scores  [B][H][P]          f32    reduced score, -inf where not selectable
//   selected     [B][H][K]          int64  selected pages best first, -1 padded
//   recall       [B][H][S]          int64  page copied into each slot, -1 = keep
//   counts       [B][H][3]          int64  hits, recalled, selected
//   work         [B*H*S][4]         int32  the recall work list: row (b*H + h)*S + s is
//                                          (host_page, layer, head, slot) for budget slot s of
//                                          head h of request b, all -1 where the slot keeps its
//                                          page (the contract, shared with recall_direct, is
//                                          written once in python/freekv_sglang/ops/recall.py)
//   head_mask    [B][H]             uint8  optional: only flagged heads are scored and
//                                          re-selected (correction); the others keep their
//                                          residency and emit the no-op outputs (-inf, -1, 0).
//   commit                                 optional, without head_mask (speculation): the
//                                          selection and q written into the regions'
//                                          speculation state, with the step's counters
//                                          (freekv/speculate.cuh)
// Candidates of request b are pages j with sink <= j < min(ceil(L/p) - window, P) whose host
// page host_pages[rows[b]][j] is in [0, N); a page whose host page is < 0 or >= N is not
// selectable: it is scored like a non-candidate (-inf, never selected, left out of the softmax)
// and no digest is read for it.
// Score:   s[g][j] = sum_i max(q_i * lo_i, q_i * hi_i)  (float32).
// Reduce:  0 softmax_mean: softmax over candidates of scale * s per query head, mean over G;
//          1 mean, 2 max of the raw scores over the group.
// Top-k:   K largest reduced scores; equal scores are taken lowest page first; best first.
// Delta:   selected pages already resident keep their slot. Each missing page (best first)
//          takes the next victim slot in ascending (slot score, slot index) order, where a
//          slot kept for a selected page scores +inf, an empty slot -inf and any other slot
//          its page's reduced score.
// Re-ranking (optional: the selection's second stage, stated in torch by
// python/freekv_sglang/ops/rerank.py): between the reduction and the top-k, the `candidates`
// best pages under the reduced scores (equal scores lowest page first; only pages above -inf)
// are scored again from a `bits`-bit copy of their keys, and their reduced logits replace the
// page scores (-inf at every other page), on which top-k, delta and commit then run.
//   codes        [N][H][p][D*bits/8] uint8 per host pool page (indexed like the digests, whose
//                                          lo/hi are its range): element i of token t is the
//                                          `bits` bits at bit (i % (8/bits)) * bits of byte
//                                          i / (8/bits) of row t
//   Key:     k[t][i] = lo_i + code * max((hi_i - lo_i) / (2^bits - 1), FLT_MIN)
//   Logit:   l[g][j] = max over the page's p tokens t of sum_i q_i * k[t][i]  (float32; raw
//            holds it at the candidates of the flagged heads), reduced over the group as the
//            bound's scores are.
#pragma once

#include "freekv/common.cuh"
#include "freekv/speculate.cuh"

namespace freekv {

constexpr int kScoreThreads = 256;
constexpr int kSelectThreads = 256;
constexpr int kMaxGroup = 128;
constexpr int kMaxSelect = 512;  // bound on K, on S and on the re-ranked candidates
constexpr int kMaxHeadDim = 256;
constexpr float kMinStep = 1.17549435e-38f;  // FLT_MIN: the smallest step of a key code

// Whether logical page j of a region row has a digest in the store: its host page in [0, N).
FREEKV_DEV bool has_host_page(const int64_t* __restrict__ host_row, int j, int64_t num_host_pages) {
  const int64_t hp = host_row[j];
  return hp >= 0 && hp < num_host_pages;
}

// One past the last candidate page of a request of seq_len tokens: its pages end
// num_window pages before the last, and never beyond the region's max_pages (the header's
// candidate rule; every kernel of this file uses it).
FREEKV_DEV int candidate_end(int64_t seq_len, int page_size, int num_window, int max_pages) {
  const int64_t np = (seq_len + page_size - 1) / page_size;
  return static_cast<int>(min(np - num_window, static_cast<int64_t>(max_pages)));
}

// Grid (x: tiles over (page, KV head) pairs, y: request); one warp per (page, KV head): the
// digest rows are read once and scored against the G query heads of the group.
template <typename T>
__global__ void __launch_bounds__(kScoreThreads)
    quest_score_kernel(const T* __restrict__ q, const T* __restrict__ digests,
                       int64_t num_host_pages, const int64_t* __restrict__ rows,
                       const int64_t* __restrict__ seq_lens, const int64_t* __restrict__ host_pages,
                       const uint8_t* __restrict__ head_mask, int num_q_heads, int num_kv_heads,
                       int head_dim, int max_pages, int page_size, int num_sink, int num_window,
                       float* __restrict__ raw) {
  const int b = blockIdx.y;
  const int group = num_q_heads / num_kv_heads;
  const int end = candidate_end(seq_lens[b], page_size, num_window, max_pages);
  const int span = max(end - num_sink, 0);
  const int64_t* host_row = host_pages + rows[b] * max_pages;
  const int64_t hd = static_cast<int64_t>(num_kv_heads) * head_dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int pi = blockIdx.x * warps + warp; pi < span * num_kv_heads; pi += gridDim.x * warps) {
    const int j = num_sink + pi / num_kv_heads, h = pi % num_kv_heads;
    // Both tests are uniform over the warp: an unflagged head's select block reads no score.
    if (head_mask != nullptr && head_mask[b * num_kv_heads + h] == 0) continue;
    if (!has_host_page(host_row, j, num_host_pages)) continue;
    const T* lo_p = digests + host_row[j] * 2 * hd + static_cast<int64_t>(h) * head_dim;
    const T* hi_p = lo_p + hd;
    float2 lo[4], hi[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = 64 * r + 2 * lane;
      if (i < head_dim) {
        lo[r] = load2(lo_p + i);
        hi[r] = load2(hi_p + i);
      } else {
        lo[r] = hi[r] = make_float2(0.f, 0.f);
      }
    }
    for (int gg = 0; gg < group; ++gg) {
      const int qh = h * group + gg;
      const T* qp = q + (static_cast<int64_t>(b) * num_q_heads + qh) * head_dim;
      float s = 0.f;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int i = 64 * r + 2 * lane;
        if (i < head_dim) {
          const float2 x = load2(qp + i);
          s += fmax_nan(x.x * lo[r].x, x.x * hi[r].x) + fmax_nan(x.y * lo[r].y, x.y * hi[r].y);
        }
      }
      s = warp_sum(s);
      if (lane == 0) raw[(static_cast<int64_t>(b) * num_q_heads + qh) * max_pages + j] = s;
    }
  }
}

// Eight 16-bit values of one 16-byte vector (p 16-byte aligned) as floats. The vector's bytes
// are copied into values of T, not read through a pointer of another type (no aliasing).
template <typename T>
FREEKV_DEV void load8(const T* p, float (&out)[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  T h[8];
  memcpy(h, &v, sizeof(v));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = load2(h + 2 * i);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// The same scores for head_dim kD in {64, 128, 256} with 16-byte loads (q and the digests
// 16-byte aligned, as the launcher checks): kLanes = kD / 8 lanes read one (page, KV head)
// row, a warp scores 32 / kLanes pairs at once, and each score is a sum over its kLanes lanes.
// Grid and arguments as quest_score_kernel's.
template <typename T, int kD>
__global__ void __launch_bounds__(kScoreThreads)
    quest_score_vec_kernel(const T* __restrict__ q, const T* __restrict__ digests,
                           int64_t num_host_pages, const int64_t* __restrict__ rows,
                           const int64_t* __restrict__ seq_lens,
                           const int64_t* __restrict__ host_pages,
                           const uint8_t* __restrict__ head_mask, int num_q_heads, int num_kv_heads,
                           int max_pages, int page_size, int num_sink, int num_window,
                           float* __restrict__ raw) {
  constexpr int kLanes = kD / 8, kPerWarp = 32 / kLanes;
  static_assert(kLanes * kPerWarp == 32, "kD must be 64, 128 or 256");
  const int b = blockIdx.y;
  const int group = num_q_heads / num_kv_heads;
  const int end = candidate_end(seq_lens[b], page_size, num_window, max_pages);
  const int total = max(end - num_sink, 0) * num_kv_heads;
  const int64_t* host_row = host_pages + rows[b] * max_pages;
  const int64_t hd = static_cast<int64_t>(num_kv_heads) * kD;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int sub = lane / kLanes, sl = lane % kLanes;
  // The bound is uniform over the warp: every lane takes part in the shuffles.
  for (int base = (blockIdx.x * warps + warp) * kPerWarp; base < total;
       base += gridDim.x * warps * kPerWarp) {
    const int pi = base + sub;
    const int j = num_sink + pi / num_kv_heads, h = pi % num_kv_heads;
    const bool live = pi < total &&
                      (head_mask == nullptr || head_mask[b * num_kv_heads + h] != 0) &&
                      has_host_page(host_row, j, num_host_pages);
    float lo[8], hi[8];
    if (live) {
      const T* lo_p = digests + host_row[j] * 2 * hd + static_cast<int64_t>(h) * kD + sl * 8;
      load8(lo_p, lo);
      load8(lo_p + hd, hi);
    }
    for (int gg = 0; gg < group; ++gg) {
      const int qh = h * group + gg;
      float s = 0.f;
      if (live) {
        float x[8];
        load8(q + (static_cast<int64_t>(b) * num_q_heads + qh) * kD + sl * 8, x);
#pragma unroll
        for (int e = 0; e < 8; ++e) s += fmax_nan(x[e] * lo[e], x[e] * hi[e]);
      }
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (live && sl == 0) raw[(static_cast<int64_t>(b) * num_q_heads + qh) * max_pages + j] = s;
    }
  }
}

struct SelectArgs {
  float* raw;  // read by the reduction; the re-ranking writes its logits into it
  const int64_t* rows;
  const int64_t* seq_lens;
  const uint8_t* head_mask;  // may be null
  const int64_t* host_pages;
  const int64_t* slot_tokens;
  int64_t* slot_to_page;
  int64_t* page_to_slot;
  float* page_scores;
  int64_t* selected;
  int64_t* recall;
  int64_t* counts;
  int32_t* work;
  int64_t num_host_pages;
  int num_q_heads, num_kv_heads, head_dim, max_pages, page_size, num_sink, num_window;
  int top_k, num_slots, layer, reduction;
  float scale;
  CommitArgs commit;  // commit.q null: no commit (freekv/speculate.cuh)
};

// The second stage's inputs (the header's Re-ranking); codes null: no second stage.
template <typename T>
struct RerankArgs {
  const T* q;            // [B][H_q][D]
  const T* digests;      // [N][2][H][D]
  const uint8_t* codes;  // [N][H][p][D * bits / 8]
  int bits;              // 2 or 4
  int candidates;        // 1 <= candidates <= kMaxSelect
};

// Shared scratch of block_top_k.
struct TopKShared {
  unsigned hist[256];
  uint32_t prefix;
  int rem, cnt;
};

// The kk largest of ps[lo, hi) (kk at most how many of them are above -inf), equal scores
// lowest page first: their pages into page[0, kk) and their order-preserving keys into
// key[0, kk), in no particular order. A 4-pass MSB radix select on float_key finds the kk-th
// largest key and how many keys equal to it to take. Every thread of the block calls it.
FREEKV_DEV void block_top_k(const float* ps, int lo, int hi, int kk, TopKShared& sh, int* page,
                            uint32_t* key) {
  const int tid = threadIdx.x;
  __syncthreads();  // the previous call's readers of sh are done
  if (tid == 0) {
    sh.prefix = 0u;
    sh.rem = kk;
    sh.cnt = 0;
  }
  uint32_t mask = 0u;
  for (int shift = 24; shift >= 0 && kk > 0; shift -= 8) {
    for (int i = tid; i < 256; i += blockDim.x) sh.hist[i] = 0u;
    __syncthreads();
    // Read by every thread before the barrier after which one lane of warp 0 rewrites them.
    const uint32_t prefix = sh.prefix;
    const int rem = sh.rem;
    for (int j = lo + tid; j < hi; j += blockDim.x) {
      const uint32_t k = float_key(ps[j]);
      if ((k & mask) == prefix) atomicAdd(&sh.hist[(k >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid < 32) {
      // The bin holding the sh.rem-th largest key, found by warp 0: lane L holds bins
      // 255 - 8L down to 248 - 8L (lane 0 the highest), a scan over the lanes counts the keys
      // in higher bins, and the one lane whose bins reach sh.rem walks its eight.
      const int lane = tid;
      int cnt[8], local = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        cnt[i] = static_cast<int>(sh.hist[255 - 8 * lane - i]);
        local += cnt[i];
      }
      int incl = local, all = local;  // inclusive scan by lane (xor butterfly)
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_xor_sync(0xffffffffu, all, o);
        if (lane & o) incl += y;
        all += y;
      }
      int above = incl - local;
      if (above < rem && incl >= rem) {
        for (int i = 0; i < 8; ++i) {
          if (above + cnt[i] >= rem) {
            sh.prefix = prefix | (static_cast<uint32_t>(255 - 8 * lane - i) << shift);
            sh.rem = rem - above;
            break;
          }
          above += cnt[i];
        }
      }
    }
    mask |= 255u << shift;
    __syncthreads();
  }
  const uint32_t thr = kk > 0 ? sh.prefix : 0u;  // written before the radix passes' barriers
  if (kk > 0) {
    for (int j = lo + tid; j < hi; j += blockDim.x) {
      const uint32_t k = float_key(ps[j]);
      if (k > thr) {
        const int pos = atomicAdd(&sh.cnt, 1);
        page[pos] = j;
        key[pos] = k;
      }
    }
  }
  __syncthreads();
  if (kk > 0 && tid < 32) {
    // Keys equal to the threshold, lowest page first (warp 0, 32 pages at a time).
    const int base = sh.cnt, rem = sh.rem;
    int taken = 0;
    for (int c = lo; c < hi && taken < rem; c += 32) {
      const int j = c + tid;
      const bool eq = j < hi && float_key(ps[j]) == thr;
      const unsigned ballot = __ballot_sync(0xffffffffu, eq);
      const int before = __popc(ballot & ((1u << tid) - 1u));
      if (eq && taken + before < rem) {
        page[base + taken + before] = j;
        key[base + taken + before] = thr;
      }
      taken += __popc(ballot);
    }
  }
  __syncthreads();
}

// The header's group reduction over n items of one (request, KV head) block: item i is logical
// page page_of(i), or no page (< 0: reduced to -inf, left out of the softmax); out(i, score)
// receives each reduced score. raw points at the group's first query head ([G][P]). Every
// thread of the block calls it (the softmax's block reductions).
template <typename PageOf, typename Out>
FREEKV_DEV void reduce_group(const float* raw, int P, int group, int reduction, float scale, int n,
                             PageOf page_of, Out out, float* s_red, float* s_m, float* s_z) {
  const int tid = threadIdx.x;
  if (reduction == 0) {
    for (int gg = 0; gg < group; ++gg) {
      const float* r = raw + static_cast<int64_t>(gg) * P;
      float mx = -INFINITY;
      for (int i = tid; i < n; i += blockDim.x) {
        const int j = page_of(i);
        if (j >= 0) mx = fmaxf(mx, scale * r[j]);
      }
      mx = block_max(mx, s_red);
      float z = 0.f;
      for (int i = tid; i < n; i += blockDim.x) {
        const int j = page_of(i);
        if (j >= 0) z += expf(scale * r[j] - mx);
      }
      z = block_sum(z, s_red);
      if (tid == 0) {
        s_m[gg] = mx;
        s_z[gg] = z;
      }
    }
    __syncthreads();
    for (int i = tid; i < n; i += blockDim.x) {
      const int j = page_of(i);
      if (j < 0) {
        out(i, -INFINITY);
        continue;
      }
      float acc = 0.f;
      for (int gg = 0; gg < group; ++gg) {
        // A query head whose softmax is undefined (a NaN or +inf score, or no finite one)
        // contributes nothing, as the reference's nan_to_num(softmax) does.
        if (s_z[gg] != s_z[gg]) continue;
        acc += expf(scale * raw[static_cast<int64_t>(gg) * P + j] - s_m[gg]) / s_z[gg];
      }
      out(i, acc / static_cast<float>(group));
    }
  } else {
    for (int i = tid; i < n; i += blockDim.x) {
      const int j = page_of(i);
      if (j < 0) {
        out(i, -INFINITY);
        continue;
      }
      float acc = reduction == 1 ? 0.f : -INFINITY;
      for (int gg = 0; gg < group; ++gg) {
        const float x = raw[static_cast<int64_t>(gg) * P + j];
        acc = reduction == 1 ? acc + x : fmax_nan(acc, x);
      }
      out(i, reduction == 1 ? acc / static_cast<float>(group) : acc);
    }
  }
  __syncthreads();
}

// Query heads of a group scored per pass over a candidate page's codes.
constexpr int kRerankHeads = 8;

// The second stage's shared rows: per warp, lo and the code step per element of the candidate
// page it scores; per block, the pass's query heads as floats.
template <int kThreads>
struct RerankShared {
  float lo[kThreads / 32][kMaxHeadDim];
  float step[kThreads / 32][kMaxHeadDim];
  float q[kRerankHeads][kMaxHeadDim];
};

// The second stage's logits (the header's Key and Logit) of the m candidate pages cand[0, m)
// of KV head h of request b, into raw_group[g * P + page] for the group's G query heads. The
// group is taken kRerankHeads query heads per pass; in a pass, one warp per candidate page
// (the warps take pages in rounds) and one lane per token, which decodes each key element once
// and adds it into every head's dot product. Every thread of the block calls it (each round's
// barriers guard the warps' rows and the pass's heads in sh).
template <typename T, int kThreads>
FREEKV_DEV void rerank_logits(const SelectArgs& a, const RerankArgs<T>& r, int b, int h,
                              const int* cand, int m, float* raw_group,
                              RerankShared<kThreads>& sh) {
  constexpr int kWarps = kThreads / 32;
  const int H = a.num_kv_heads, D = a.head_dim, p = a.page_size, P = a.max_pages;
  const int group = a.num_q_heads / H;
  const int per = 8 / r.bits, row_bytes = D / per;
  const unsigned code_mask = (1u << r.bits) - 1u;
  const float levels = static_cast<float>((1 << r.bits) - 1);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t hd = static_cast<int64_t>(H) * D;
  const int64_t* host_row = a.host_pages + a.rows[b] * P;
  const T* q_group = r.q + (static_cast<int64_t>(b) * a.num_q_heads + h * group) * D;
  for (int g0 = 0; g0 < group; g0 += kRerankHeads) {
    const int heads = min(kRerankHeads, group - g0);
    __syncthreads();  // the previous pass's readers of sh.q are done
    for (int x = threadIdx.x; x < heads * D; x += kThreads)
      sh.q[x / D][x % D] = to_float(q_group[static_cast<int64_t>(g0) * D + x]);
    for (int base = 0; base < m; base += kWarps) {  // uniform: every warp meets each barrier
      const int ci = base + warp;
      // Candidates are selectable pages: their host page is in [0, N).
      const int64_t hp = ci < m ? host_row[cand[ci]] : 0;
      if (ci < m) {
        const T* lo_p = r.digests + hp * 2 * hd + static_cast<int64_t>(h) * D;
        for (int i = lane; i < D; i += 32) {
          const float lo = to_float(lo_p[i]), hi = to_float(lo_p[hd + i]);
          const float st = (hi - lo) / levels;
          sh.lo[warp][i] = lo;
          sh.step[warp][i] = st != st ? st : fmaxf(st, kMinStep);  // a NaN step stays NaN
        }
      }
      __syncthreads();
      if (ci < m) {  // uniform over the warp: its lanes all take part in the shuffles
        const uint8_t* page_codes = r.codes + (hp * H + h) * static_cast<int64_t>(p) * row_bytes;
        float best[kRerankHeads];
#pragma unroll
        for (int g = 0; g < kRerankHeads; ++g) best[g] = -INFINITY;
        for (int t = lane; t < p; t += 32) {
          const uint8_t* row = page_codes + static_cast<int64_t>(t) * row_bytes;
          float acc[kRerankHeads] = {};
          for (int c = 0; c < row_bytes; ++c) {
            const unsigned byte = row[c];
            for (int e = 0; e < per; ++e) {
              const int i = c * per + e;
              const float code = static_cast<float>((byte >> (e * r.bits)) & code_mask);
              const float k = sh.lo[warp][i] + code * sh.step[warp][i];
#pragma unroll
              for (int g = 0; g < kRerankHeads; ++g)
                if (g < heads) acc[g] += sh.q[g][i] * k;
            }
          }
#pragma unroll
          for (int g = 0; g < kRerankHeads; ++g) best[g] = fmax_nan(best[g], acc[g]);
        }
#pragma unroll
        for (int g = 0; g < kRerankHeads; ++g) {
          if (g >= heads) break;  // uniform over the block
          float v = best[g];
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) v = fmax_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
          if (lane == 0) raw_group[static_cast<int64_t>(g0 + g) * P + cand[ci]] = v;
        }
      }
      __syncthreads();
    }
  }
}

// One block per (request, KV head). kRerank: with the second stage (r.codes not null), whose
// shared rows only this instantiation holds (sm_90: 48,272 bytes and 94 registers against the
// plain selection's 23,696 and 40; ptxas -v).
template <typename T, int kThreads, bool kRerank>
__global__ void __launch_bounds__(kThreads) select_delta_kernel(SelectArgs a, RerankArgs<T> r) {
  __shared__ float s_red[32];
  __shared__ float s_m[kMaxGroup], s_z[kMaxGroup];
  __shared__ TopKShared s_topk;
  __shared__ int s_sel_page[kMaxSelect];
  __shared__ uint32_t s_sel_key[kMaxSelect];
  __shared__ int s_sorted[kMaxSelect];
  __shared__ uint8_t s_hit[kMaxSelect];
  __shared__ int s_need_rank[kMaxSelect];
  __shared__ int s_target[kMaxSelect];
  __shared__ long long s_evicted[kMaxSelect];
  __shared__ uint8_t s_keep[kMaxSelect];
  __shared__ int s_rec[kMaxSelect];
  __shared__ float s_slot_key[kMaxSelect];
  __shared__ int s_victim[kMaxSelect];

  const int H = a.num_kv_heads, P = a.max_pages, K = a.top_k, S = a.num_slots;
  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int tid = threadIdx.x;
  const int group = a.num_q_heads / H;
  const int64_t row = a.rows[b];
  const int64_t* host_row = a.host_pages + row * P;
  const int lo_c = a.num_sink;
  const int hi_c = candidate_end(a.seq_lens[b], a.page_size, a.num_window, P);
  const bool active = a.head_mask == nullptr || a.head_mask[bh] != 0;
  float* ps = a.page_scores + static_cast<int64_t>(bh) * P;
  int64_t* recall = a.recall + static_cast<int64_t>(bh) * S;
  int32_t* work = a.work + static_cast<int64_t>(bh) * S * 4;
  // The group's Quest scores [G][P]; the re-ranking writes its logits into them.
  float* raw = a.raw + (static_cast<int64_t>(b) * a.num_q_heads + h * group) * P;

  for (int j = tid; j < P; j += blockDim.x)
    if (!active || j < lo_c || j >= hi_c) ps[j] = -INFINITY;
  if (!active) {
    for (int k = tid; k < K; k += blockDim.x) a.selected[static_cast<int64_t>(bh) * K + k] = -1;
    for (int s = tid; s < S; s += blockDim.x) {
      recall[s] = -1;
      for (int c = 0; c < 4; ++c) work[4 * s + c] = -1;
    }
    if (tid < 3) a.counts[static_cast<int64_t>(bh) * 3 + tid] = 0;
    return;
  }

  // 1. Reduced score per candidate page; a page without a host page in [0, N) is no candidate.
  const auto page_of = [&](int i) {
    const int j = lo_c + i;
    return has_host_page(host_row, j, a.num_host_pages) ? j : -1;
  };
  reduce_group(
      raw, P, group, a.reduction, a.scale, hi_c - lo_c, page_of,
      [&](int i, float v) { ps[lo_c + i] = v; }, s_red, s_m, s_z);
  // A NaN score (an overflowed digest: inf - inf) ranks lowest, as -inf: page scores are then
  // totally ordered for the top-k and for the victim ranking below. Only pages scoring above
  // -inf are selected. Returns how many do.
  const auto selectable_pages = [&]() {
    float finite_or_inf = 0.f;
    for (int j = lo_c + tid; j < hi_c; j += blockDim.x) {
      if (ps[j] != ps[j]) ps[j] = -INFINITY;
      finite_or_inf += ps[j] != -INFINITY ? 1.f : 0.f;
    }
    return static_cast<int>(block_sum(finite_or_inf, s_red));
  };
  int selectable = selectable_pages();

  // 1b. Re-ranking: the best candidates' logits from the key codes replace the page scores.
  if constexpr (kRerank) {
    __shared__ RerankShared<kThreads> s_rerank;
    float* s_cand_score = s_slot_key;  // the candidates' reduced scores (free until step 3)
    const int m = min(r.candidates, selectable);
    block_top_k(ps, lo_c, hi_c, m, s_topk, s_sel_page, s_sel_key);
    rerank_logits<T, kThreads>(a, r, b, h, s_sel_page, m, raw, s_rerank);
    reduce_group(
        raw, P, group, a.reduction, a.scale, m, [&](int i) { return s_sel_page[i]; },
        [&](int i, float v) { s_cand_score[i] = v; }, s_red, s_m, s_z);
    for (int j = lo_c + tid; j < hi_c; j += blockDim.x) ps[j] = -INFINITY;
    __syncthreads();
    for (int i = tid; i < m; i += blockDim.x) ps[s_sel_page[i]] = s_cand_score[i];
    __syncthreads();
    selectable = selectable_pages();
  }

  // 2. Top-k: the kk best pages, then their order (best first, equal scores lowest page first).
  const int kk = min(K, selectable);
  block_top_k(ps, lo_c, hi_c, kk, s_topk, s_sel_page, s_sel_key);
  for (int t = tid; t < kk; t += blockDim.x) {
    const uint32_t kt = s_sel_key[t];
    const int pt = s_sel_page[t];
    int rank = 0;
    for (int u = 0; u < kk; ++u) {
      const uint32_t ku = s_sel_key[u];
      rank += (ku > kt || (ku == kt && s_sel_page[u] < pt)) ? 1 : 0;
    }
    s_sorted[rank] = pt;
  }
  __syncthreads();
  for (int k = tid; k < K; k += blockDim.x)
    a.selected[static_cast<int64_t>(bh) * K + k] = k < kk ? s_sorted[k] : -1;

  // 3. Delta against the residency of (row, h).
  int64_t* s2p = a.slot_to_page + (row * H + h) * S;
  int64_t* p2s = a.page_to_slot + (row * H + h) * P;
  for (int k = tid; k < kk; k += blockDim.x) s_hit[k] = p2s[s_sorted[k]] >= 0 ? 1 : 0;
  for (int s = tid; s < S; s += blockDim.x) {
    s_keep[s] = 0;
    s_rec[s] = -1;
  }
  __syncthreads();
  for (int k = tid; k < kk; k += blockDim.x) {
    if (s_hit[k]) {
      const int64_t sl = p2s[s_sorted[k]];
      if (sl < S) s_keep[sl] = 1;
    }
  }
  __syncthreads();
  for (int s = tid; s < S; s += blockDim.x) {
    const int64_t pg = s2p[s];
    s_slot_key[s] = s_keep[s] ? INFINITY : (pg >= 0 ? ps[pg] : -INFINITY);
  }
  __syncthreads();
  for (int s = tid; s < S; s += blockDim.x) {
    const float ks = s_slot_key[s];
    int rank = 0;
    for (int u = 0; u < S; ++u) {
      const float ku = s_slot_key[u];
      rank += (ku < ks || (ku == ks && u < s)) ? 1 : 0;
    }
    s_victim[rank] = s;
  }
  for (int k = tid; k < kk; k += blockDim.x) {
    int r = 0;
    for (int u = 0; u < k; ++u) r += s_hit[u] ? 0 : 1;
    s_need_rank[k] = r;
  }
  __syncthreads();
  for (int k = tid; k < kk; k += blockDim.x) {
    if (!s_hit[k]) {
      const int tgt = s_victim[s_need_rank[k]];
      s_target[k] = tgt;
      s_evicted[k] = s2p[tgt];
    }
  }
  __syncthreads();
  for (int k = tid; k < kk; k += blockDim.x) {
    if (!s_hit[k]) {
      const int tgt = s_target[k];
      s2p[tgt] = s_sorted[k];
      s_rec[tgt] = s_sorted[k];
      if (s_evicted[k] >= 0) p2s[s_evicted[k]] = -1;
    }
  }
  __syncthreads();
  for (int k = tid; k < kk; k += blockDim.x)
    if (!s_hit[k]) p2s[s_sorted[k]] = s_target[k];

  // 4. Outputs: recall per slot, the work rows, the counts.
  for (int s = tid; s < S; s += blockDim.x) {
    const int rec = s_rec[s];
    recall[s] = rec;
    int32_t* w = work + 4 * s;
    if (rec >= 0) {
      w[0] = static_cast<int32_t>(host_row[rec]);  // in [0, N): only such pages are selected
      w[1] = a.layer;
      w[2] = h;
      w[3] = static_cast<int32_t>(a.slot_tokens[row * S + s]);
    } else {
      w[0] = w[1] = w[2] = w[3] = -1;
    }
  }
  if (tid == 0) {
    int hits = 0;
    for (int k = 0; k < kk; ++k) hits += s_hit[k];
    int64_t* c = a.counts + static_cast<int64_t>(bh) * 3;
    c[0] = hits;
    c[1] = kk - hits;
    c[2] = kk;
  }
  // 5. The speculation's commit (a selection of every head: no head_mask).
  if (a.commit.q != nullptr)
    commit_head(a.commit, b, h, static_cast<int>(gridDim.x) / H, H, group, a.head_dim, K, row,
                a.seq_lens[b], s_sorted, s_hit, kk);
}

}  // namespace freekv
