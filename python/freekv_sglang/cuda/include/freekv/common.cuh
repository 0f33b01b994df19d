// Shared device helpers: element types, 16-byte vectors, warp/block reductions, error codes.
//
// No torch headers: everything here works on raw pointers and plain integers, so the kernels
// compile (and are compile-checked in CI) without a torch installation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define FREEKV_HD __host__ __device__ __forceinline__
#define FREEKV_DEV __device__ __forceinline__

namespace freekv {

// Largest layer count a launcher may pass in one LayerKV table (passed by value as a kernel
// parameter: 2 * 128 pointers = 2 KiB, well inside the 4 KiB parameter limit).
constexpr int kMaxLayers = 128;

// Per-layer base pointers of SGLang's GPU K and V buffers. Every buffer is NHD with token
// slots as rows: element (slot, head, i) of layer l lives at k[l] + (slot * H + head) * D + i.
struct LayerKV {
  void* k[kMaxLayers];
  void* v[kMaxLayers];
};

// Element conversions for the two 16-bit KV dtypes.
template <typename T>
FREEKV_DEV float to_float(T x);
template <>
FREEKV_DEV float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
FREEKV_DEV float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
FREEKV_DEV T from_float(float x);
template <>
FREEKV_DEV __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
FREEKV_DEV __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two consecutive elements (4-byte aligned) as floats.
template <typename T>
FREEKV_DEV float2 load2(const T* p);
template <>
FREEKV_DEV float2 load2<__half>(const __half* p) {
  return __half22float2(*reinterpret_cast<const __half2*>(p));
}
template <>
FREEKV_DEV float2 load2<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

FREEKV_DEV float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

FREEKV_DEV float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Block-wide sum / max for blockDim.x a multiple of 32 and at most 1024. `scratch` holds 32
// floats of shared memory; every thread gets the result. Contains __syncthreads().
FREEKV_DEV float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  x = warp_sum(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < nw ? scratch[lane] : 0.f;
  return warp_sum(x);
}

FREEKV_DEV float block_max(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < nw ? scratch[lane] : -INFINITY;
  return warp_max(x);
}

// max that propagates NaN, as torch.maximum / amax do (fmaxf drops a NaN operand): the
// references and the kernels agree on every input, including overflowed digests.
FREEKV_DEV float fmax_nan(float a, float b) {
  return (a != a || b != b) ? __uint_as_float(0x7fc00000u) : fmaxf(a, b);
}

// Order-preserving map of a float to an unsigned key (larger float -> larger key; -inf is the
// smallest finite-or-infinite key; NaN is not expected).
FREEKV_DEV uint32_t float_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace freekv
