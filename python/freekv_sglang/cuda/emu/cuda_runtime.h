// Emulated CUDA runtime API for the host compiler (see freekv_emu/simt.h): the types and calls
// the kernels and launchers of this project use. Streams are ordered no-ops (every emulated
// launch and memset completes before the call returns); memory is host memory, so a "device"
// pointer of a host buffer is its own address.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "freekv_emu/simt.h"

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

using cudaStream_t = struct freekv_emu_stream*;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};

namespace freekv_emu {
// Multiprocessors the emulated device reports: small, so that grid-stride loops sized from it
// run several times per block in tests.
constexpr int kEmulatedSMs = 2;
}  // namespace freekv_emu

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid argument";
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = freekv_emu::kEmulatedSMs;
  return cudaSuccess;
}
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* ptr) {
  attr->type = cudaMemoryTypeHost;
  attr->device = 0;
  attr->devicePointer = const_cast<void*>(ptr);
  attr->hostPointer = const_cast<void*>(ptr);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t n, cudaStream_t) {
  if (n != 0) std::memset(dst, value, n);
  return cudaSuccess;
}

inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
