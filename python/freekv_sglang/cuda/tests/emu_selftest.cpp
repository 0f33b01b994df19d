// Self-test of the SIMT emulation (cuda/emu), built by tests/kernels/test_emu_runtime.py with
// the host compiler: the block reductions of freekv/common.cuh, warp exchanges, shared memory
// and atomics give the values a GPU gives, and the errors a GPU would hang on end the launch
// with a message naming the kernel. Prints one line per case: "<case> ok" or "<case> <error>".
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "freekv/common.cuh"

namespace {

__global__ void block_sum_kernel(const float* in, float* out) {
  __shared__ float scratch[32];
  const float s = freekv::block_sum(in[blockIdx.x * blockDim.x + threadIdx.x], scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

__global__ void shuffle_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  const int swapped = __shfl_xor_sync(0xffffffffu, lane * 10, 1);
  const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
  out[threadIdx.x] = swapped + (odd == 0xaaaaaaaau ? 1000 : 0);
}

__global__ void shared_count_kernel(unsigned* out) {
  __shared__ unsigned count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  atomicAdd(&count, 1u);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = count;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();  // half the block never reaches it
  out[threadIdx.x] = 1;
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;  // leaves while the others wait below
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void partial_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1, 1);
}

template <typename F>
void run(const char* name, F&& f) {
  try {
    const std::string problem = f();
    std::printf("%s %s\n", name, problem.empty() ? "ok" : problem.c_str());
  } catch (const std::exception& e) {
    std::printf("%s %s\n", name, e.what());
  }
}

}  // namespace

int main() {
  run("block_sum", [] {
    std::vector<float> in(3 * 96), out(3);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 96);
    FREEKV_EMU_LAUNCH(3, 96, 0, nullptr, block_sum_kernel)(in.data(), out.data());
    for (float v : out)
      if (v != 95.f * 96.f / 2.f) return std::string("wrong sum ") + std::to_string(v);
    return std::string();
  });
  run("shuffle", [] {
    std::vector<int> out(64);
    FREEKV_EMU_LAUNCH(1, 64, 0, nullptr, shuffle_kernel)(out.data());
    for (int t = 0; t < 64; ++t)
      if (out[t] != ((t & 31) ^ 1) * 10 + 1000) return "lane " + std::to_string(t);
    return std::string();
  });
  run("shared_count", [] {
    std::vector<unsigned> out(4);
    FREEKV_EMU_LAUNCH(4, 200, 0, nullptr, shared_count_kernel)(out.data());
    for (unsigned v : out)
      if (v != 200) return "count " + std::to_string(v);
    return std::string();
  });
  run("divergent_barrier", [] {
    std::vector<int> out(32);
    FREEKV_EMU_LAUNCH(1, 32, 0, nullptr, divergent_barrier_kernel)(out.data());
    return std::string("no error");
  });
  run("early_exit", [] {
    std::vector<int> out(32);
    FREEKV_EMU_LAUNCH(1, 32, 0, nullptr, early_exit_kernel)(out.data());
    return std::string("no error");
  });
  run("partial_mask", [] {
    std::vector<int> out(32);
    FREEKV_EMU_LAUNCH(1, 32, 0, nullptr, partial_mask_kernel)(out.data());
    return std::string("no error");
  });
  return 0;
}
