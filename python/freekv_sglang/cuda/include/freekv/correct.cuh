// Fine-grained correction (FreeKV): per (request, KV head), the mean over the GQA group of
// cos(q_t, q_{t-1}); a head is flagged for re-selection when that mean is below tau.
//
// Layouts: q [B][H_q][D]; q_prev [B][H_q][D] (correct_kernel) or one row per budget region
// [R][H_q][D] (correction_masks_kernel); cos_mean [B][H] float32; flags [B][H] uint8 (0/1).
// Query head g belongs to KV head g / G (G = H_q / H, HF repeat_kv order).
// cos(x, y) = sum_i (x_i / max(|x|, eps)) * (y_i / max(|y|, eps)), eps = 1e-8, in float32:
// a zero query has cosine 0; the group mean is clamped to [-1, 1]. One block per (request,
// KV head).
#pragma once

#include "freekv/common.cuh"

namespace freekv {

constexpr int kCorrectThreads = 128;

// Mean over the `group` query heads of KV head h of cos(q[g], q_prev[g]), clamped to [-1, 1]
// (so that rounding never fires tau = -1). q and q_prev point at one request's [H_q][D] rows.
// Every thread of the block gets it; contains __syncthreads().
template <typename T>
FREEKV_DEV float group_cosine(const T* __restrict__ q, const T* __restrict__ q_prev, int h,
                              int group, int head_dim, float* scratch) {
  float acc = 0.f;
  for (int gg = 0; gg < group; ++gg) {
    const int64_t off = static_cast<int64_t>(h * group + gg) * head_dim;
    float dot = 0.f, nx = 0.f, ny = 0.f;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
      const float x = to_float(q[off + i]), y = to_float(q_prev[off + i]);
      dot += x * y;
      nx += x * x;
      ny += y * y;
    }
    dot = block_sum(dot, scratch);
    nx = block_sum(nx, scratch);
    ny = block_sum(ny, scratch);
    acc += dot / (fmaxf(sqrtf(nx), 1e-8f) * fmaxf(sqrtf(ny), 1e-8f));
  }
  return fminf(fmaxf(acc / static_cast<float>(group), -1.f), 1.f);
}

template <typename T>
__global__ void __launch_bounds__(kCorrectThreads)
    correct_kernel(const T* __restrict__ q, const T* __restrict__ q_prev, int num_q_heads,
                   int num_kv_heads, int head_dim, float tau, int use_tau,
                   float* __restrict__ cos_mean, uint8_t* __restrict__ flags) {
  __shared__ float scratch[32];
  const int b = blockIdx.x / num_kv_heads, h = blockIdx.x % num_kv_heads;
  const int64_t row = static_cast<int64_t>(b) * num_q_heads * head_dim;
  const float c =
      group_cosine(q + row, q_prev + row, h, num_q_heads / num_kv_heads, head_dim, scratch);
  if (threadIdx.x == 0) {
    cos_mean[blockIdx.x] = c;
    flags[blockIdx.x] = (use_tau && c < tau) ? 1 : 0;
  }
}

// The correction's three head masks of a decode step, in one launch, over the speculation
// state of the requests' budget regions:
//   regs [B] int64 (region of request b, in [0, R)), seq_lens [B] int64 (this step's length),
//   spec_len [R] int64 (length the region's speculative selection was made for, 0 if none),
//   q_prev [R][H_q][D] (the query that made it);
//   masks [3][B][H] uint8: have_spec (spec_len[regs[b]] == seq_lens[b], for every head),
//   corrected (have_spec and the group cosine below tau), redo (corrected or not have_spec:
//   the heads the correction re-selects). Without a speculation the cosine is not computed.
template <typename T>
__global__ void __launch_bounds__(kCorrectThreads)
    correction_masks_kernel(const T* __restrict__ q, const T* __restrict__ q_prev,
                            const int64_t* __restrict__ regs, const int64_t* __restrict__ seq_lens,
                            const int64_t* __restrict__ spec_len, int num_q_heads, int num_kv_heads,
                            int head_dim, float tau, int use_tau, uint8_t* __restrict__ masks) {
  __shared__ float scratch[32];
  const int b = blockIdx.x / num_kv_heads, h = blockIdx.x % num_kv_heads;
  const int64_t r = regs[b];
  const bool have = spec_len[r] == seq_lens[b];  // uniform over the block
  bool corrected = false;
  if (have && use_tau) {
    const int64_t stride = static_cast<int64_t>(num_q_heads) * head_dim;
    const float c = group_cosine(q + b * stride, q_prev + r * stride, h, num_q_heads / num_kv_heads,
                                 head_dim, scratch);
    corrected = c < tau;
  }
  if (threadIdx.x == 0) {
    const int64_t n = static_cast<int64_t>(gridDim.x);
    masks[blockIdx.x] = have ? 1 : 0;
    masks[n + blockIdx.x] = corrected ? 1 : 0;
    masks[2 * n + blockIdx.x] = (corrected || !have) ? 1 : 0;
  }
}

}  // namespace freekv
