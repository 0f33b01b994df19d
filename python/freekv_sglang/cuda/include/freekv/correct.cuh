// Fine-grained correction flags (FreeKV): per (request, KV head), the mean over the GQA group
// of cos(q_t, q_{t-1}); a head is flagged for re-selection when that mean is below tau.
//
// Layouts: q, q_prev [B][H_q][D]; cos_mean [B][H] float32; flags [B][H] uint8 (0/1).
// Query head g belongs to KV head g / G (G = H_q / H, HF repeat_kv order).
// cos(x, y) = sum_i (x_i / max(|x|, eps)) * (y_i / max(|y|, eps)), eps = 1e-8, in float32:
// a zero query has cosine 0; the group mean is clamped to [-1, 1]. One block per (request,
// KV head).
#pragma once

#include "freekv/common.cuh"

namespace freekv {

constexpr int kCorrectThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kCorrectThreads)
    correct_kernel(const T* __restrict__ q, const T* __restrict__ q_prev, int num_q_heads,
                   int num_kv_heads, int head_dim, float tau, int use_tau,
                   float* __restrict__ cos_mean, uint8_t* __restrict__ flags) {
  __shared__ float scratch[32];
  const int b = blockIdx.x / num_kv_heads, h = blockIdx.x % num_kv_heads;
  const int group = num_q_heads / num_kv_heads;
  float acc = 0.f;
  for (int gg = 0; gg < group; ++gg) {
    const int64_t off = (static_cast<int64_t>(b) * num_q_heads + h * group + gg) * head_dim;
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
  if (threadIdx.x == 0) {
    // Clamped to [-1, 1] so that rounding never fires tau = -1.
    const float c = fminf(fmaxf(acc / static_cast<float>(group), -1.f), 1.f);
    cos_mean[blockIdx.x] = c;
    flags[blockIdx.x] = (use_tau && c < tau) ? 1 : 0;
  }
}

}  // namespace freekv
