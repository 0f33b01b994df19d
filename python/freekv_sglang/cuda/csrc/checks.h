// Argument checks and dispatch shared by the launchers (torch-facing; kernels live in
// cuda/include/freekv and know nothing of torch).
//
// Every check names the argument in its message. Launchers run on the caller's current CUDA
// stream (c10::cuda::getCurrentCUDAStream) under a device guard for their first tensor.
#pragma once

// Light torch headers only (not ATen/ATen.h or torch/extension.h): the launchers need tensors,
// streams and guards, and parsing all of ATen makes each file take minutes to build.
#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifdef FREEKV_EMULATED
#include "freekv_emu/torch.h"  // the same names over the CPU emulation (cuda/emu)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>

#include "freekv/common.cuh"

#define FREEKV_CHECK_CUDA(x) \
  TORCH_CHECK(::freekv::on_device(x), #x " must be a CUDA tensor, got device ", (x).device())
#define FREEKV_CHECK_CPU(x) \
  TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got device ", (x).device())
#define FREEKV_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define FREEKV_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define FREEKV_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dimensions, got shape ", (x).sizes())
#define FREEKV_CHECK_SIZE(x, i, n) \
  TORCH_CHECK((x).size(i) == (n), #x ".size(", (i), ") must be ", (n), ", got shape ", (x).sizes())
#define FREEKV_CHECK_SAME_DEVICE(x, y)                                                    \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on one device, got ", \
              (x).device(), " and ", (y).device())
#define FREEKV_CHECK_INPUT(x) \
  FREEKV_CHECK_CUDA(x);       \
  FREEKV_CHECK_CONTIGUOUS(x)

#ifndef FREEKV_EMULATED
namespace freekv {

// The device-facing calls of the launchers, named once so that the emulated build
// (cuda/emu/freekv_emu/torch.h) can give them CPU meanings; everything else is shared.
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
// A tensor on the device the kernels run on.
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
inline bool is_pinned_host(const at::Tensor& t) { return t.is_pinned(); }

}  // namespace freekv

// FREEKV_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...): every launch goes through
// it (the emulated build runs the kernel on the CPU instead).
#define FREEKV_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace freekv {

// Calls f(T*) with T = __half or __nv_bfloat16 for a 16-bit KV dtype.
template <typename F>
void dispatch_kv_dtype(at::ScalarType dt, const char* name, F&& f) {
  if (dt == at::kHalf) {
    f(static_cast<__half*>(nullptr));
  } else if (dt == at::kBFloat16) {
    f(static_cast<__nv_bfloat16*>(nullptr));
  } else {
    TORCH_CHECK(false, name, " must be float16 or bfloat16, got ", dt);
  }
}

// Calls f(row_vecs, page_size) with compile-time constants for head_dim 64/128/256 (16-bit
// elements, so D / 8 vectors of 16 bytes per row) and page_size 16/32/64.
template <typename F>
void dispatch_geometry(int64_t head_dim, int64_t page_size, F&& f) {
  auto with_page = [&](auto rv) {
    switch (page_size) {
      case 16:
        f(rv, std::integral_constant<int, 16>{});
        break;
      case 32:
        f(rv, std::integral_constant<int, 32>{});
        break;
      case 64:
        f(rv, std::integral_constant<int, 64>{});
        break;
      default:
        TORCH_CHECK(false, "page_size must be 16, 32 or 64, got ", page_size);
    }
  };
  switch (head_dim) {
    case 64:
      with_page(std::integral_constant<int, 8>{});
      break;
    case 128:
      with_page(std::integral_constant<int, 16>{});
      break;
    case 256:
      with_page(std::integral_constant<int, 32>{});
      break;
    default:
      TORCH_CHECK(false, "head_dim must be 64, 128 or 256, got ", head_dim);
  }
}

// A tensor on `like`'s device, contiguous, of dtype `dt` and exactly `shape`; every message
// names the argument.
inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dt,
                         std::initializer_list<int64_t> shape, const at::Tensor& like) {
  TORCH_CHECK(on_device(t) && t.device() == like.device(), name, " must be on ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dt, name, " must have dtype ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), name, " must have shape ", at::IntArrayRef(shape), ", got ",
              t.sizes());
}

// Validates one layer's K and V buffer lists (SGLang's MHA pool: per layer [num_slots][H][D],
// contiguous, one dtype and device) and packs their base pointers.
inline LayerKV layer_kv(const std::vector<at::Tensor>& k_buffers,
                        const std::vector<at::Tensor>& v_buffers, at::ScalarType dtype,
                        int64_t num_heads, int64_t head_dim, int64_t* num_slots) {
  TORCH_CHECK(!k_buffers.empty(), "k_buffers must hold one tensor per layer, got none");
  TORCH_CHECK(k_buffers.size() == v_buffers.size(), "k_buffers and v_buffers must have one ",
              "tensor per layer each, got ", k_buffers.size(), " and ", v_buffers.size());
  TORCH_CHECK(k_buffers.size() <= static_cast<size_t>(kMaxLayers), "at most ", kMaxLayers,
              " layers are supported, got ", k_buffers.size());
  LayerKV t{};
  *num_slots = k_buffers[0].dim() == 3 ? k_buffers[0].size(0) : -1;
  for (size_t l = 0; l < k_buffers.size(); ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const at::Tensor& x = kv ? v_buffers[l] : k_buffers[l];
      const char* name = kv ? "v_buffers" : "k_buffers";
      TORCH_CHECK(on_device(x), name, "[", l, "] must be a CUDA tensor, got ", x.device());
      TORCH_CHECK(x.device() == k_buffers[0].device(), name, "[", l,
                  "] must be on the device of k_buffers[0]");
      TORCH_CHECK(x.is_contiguous(), name, "[", l, "] must be contiguous");
      TORCH_CHECK(x.scalar_type() == dtype, name, "[", l, "] must have dtype ", dtype, ", got ",
                  x.scalar_type());
      TORCH_CHECK(x.dim() == 3 && x.size(0) == *num_slots && x.size(1) == num_heads &&
                      x.size(2) == head_dim,
                  name, "[", l, "] must have shape [", *num_slots, ", ", num_heads, ", ", head_dim,
                  "], got ", x.sizes());
      TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, name, "[", l,
                  "] must be 16-byte aligned");
      (kv ? t.v : t.k)[l] = x.data_ptr();
    }
  }
  return t;
}

// The device address of a pinned host tensor (UVA mapping), with a clear error otherwise.
inline void* mapped_device_ptr(const at::Tensor& host, const char* name) {
  TORCH_CHECK(host.device().is_cpu(), name, " must be a CPU (pinned host) tensor, got ",
              host.device());
  cudaPointerAttributes attr{};
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, host.data_ptr()));
  TORCH_CHECK(attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr, name,
              " must be page-locked host memory mapped into the device address space ",
              "(torch pin_memory(), cudaHostAlloc or cudaHostRegister)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(attr.devicePointer) % 16 == 0, name,
              " must be 16-byte aligned");
  return attr.devicePointer;
}

// Multiprocessors of the current device (launch sizing).
inline int sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

}  // namespace freekv
