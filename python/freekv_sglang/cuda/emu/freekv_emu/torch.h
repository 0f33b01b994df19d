// The launchers' device-facing calls for the emulated build (included by cuda/csrc/checks.h
// under FREEKV_EMULATED): tensors "on the device" are CPU tensors, streams are the ordered
// no-op stream of cuda_runtime.h, and "pinned" host memory is any CPU memory (the kernels read
// host memory directly, as through a UVA mapping). These three are the only launcher checks
// that differ from the CUDA build; cuda/README.md lists them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace freekv {

struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline bool on_device(const at::Tensor& t) { return t.device().is_cpu(); }
inline bool is_pinned_host(const at::Tensor& t) { return t.device().is_cpu(); }

}  // namespace freekv

#define C10_CUDA_CHECK(expr)                                                                  \
  do {                                                                                        \
    const cudaError_t freekv_err_ = (expr);                                                   \
    TORCH_CHECK(freekv_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(freekv_err_)); \
  } while (0)
// Emulated launches are synchronous and throw on a kernel error.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define FREEKV_LAUNCH FREEKV_EMU_LAUNCH
