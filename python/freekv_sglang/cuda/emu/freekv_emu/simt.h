// A SIMT runtime for the host compiler: runs this project's CUDA kernels on the CPU.
//
// What it provides (the subset cuda/include/freekv uses, nothing more):
// - the kernel keywords (__global__, __device__, __host__, __forceinline__, __launch_bounds__)
//   and block-shared memory (__shared__: one copy per OS thread, reused block after block);
// - threadIdx, blockIdx, blockDim and gridDim;
// - __syncthreads, __shfl_xor_sync, __ballot_sync, __popc, atomicAdd, min/max on integers,
//   __float_as_uint / __uint_as_float;
// - launch(): runs a grid block by block; every CUDA thread of a block is a fiber (its own
//   stack and registers), switched cooperatively at barriers and warp exchanges, so a barrier
//   or a shuffle sees exactly the values the other threads produced before reaching it, as on
//   a GPU. Blocks run one after another on the launching thread (deterministic order).
//
// Errors a GPU would turn into a hang or undefined behaviour end the launch with an exception
// naming the kernel and the block: a barrier some thread of the block never reaches (the
// scheduler finds no thread able to run), a thread that exits while others wait at a barrier,
// a warp exchange whose mask leaves out a live lane, a block larger than 1024 threads.
//
// Not emulated: memory spaces (device and host pointers are both host memory), timing, the
// copy engine, concurrency between blocks or streams (launches are synchronous and in order).
#pragma once

#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// Under AddressSanitizer every stack switch is announced, so that it tracks the fiber stacks.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FREEKV_EMU_START_SWITCH(save, bottom, size) \
  __sanitizer_start_switch_fiber(save, bottom, size)
#define FREEKV_EMU_FINISH_SWITCH(save, bottom, size) \
  __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define FREEKV_EMU_START_SWITCH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define FREEKV_EMU_FINISH_SWITCH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#endif

#define __global__ inline
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned x, y, z;
};

namespace freekv_emu {

// Fiber stacks: kernels keep small frames (a few hundred bytes of registers and arrays).
constexpr std::size_t kStackBytes = 64 * 1024;
constexpr unsigned kMaxThreads = 1024;

struct Barrier {
  unsigned arrived = 0;
  unsigned generation = 0;
};

struct Fiber {
  ucontext_t ctx{};
  char* stack = nullptr;
  void* asan_fake = nullptr;  // AddressSanitizer's fake stack of this fiber while switched out
  uint3 tid{};
  unsigned linear = 0;
  bool done = false;
  const Barrier* waits_on = nullptr;  // blocked until waits_on->generation != waits_gen
  unsigned waits_gen = 0;
};

struct Block {
  const char* kernel = "";
  dim3 grid, block;
  uint3 bid{};
  std::function<void()> body;
  std::vector<Fiber> fibers;
  ucontext_t sched{};
  void* sched_fake = nullptr;  // AddressSanitizer's bookkeeping of the scheduler's stack
  const void* sched_bottom = nullptr;
  std::size_t sched_size = 0;
  Fiber* current = nullptr;
  unsigned exited = 0;
  Barrier block_bar;
  std::vector<Barrier> warp_bar;
  std::vector<unsigned> warp_size;
  std::vector<uint64_t> warp_buf[2];  // [warp * 32 + lane], by barrier generation parity
  std::string error;
};

// Per OS thread: the block being run and the fiber stacks (kept across launches).
inline thread_local Block* tl_block = nullptr;
inline thread_local std::vector<std::unique_ptr<char[]>> tl_stacks;

inline Block& block() { return *tl_block; }
inline const uint3& thread_idx() { return tl_block->current->tid; }

std::string where(const Block& b);

// Ends the current fiber's block with `message` (never returns to the kernel).
[[noreturn]] inline void fail(const std::string& message) {
  Block& b = block();
  if (b.error.empty()) b.error = message + " (" + where(b) + ")";
  FREEKV_EMU_START_SWITCH(nullptr, b.sched_bottom, b.sched_size);  // this fiber never resumes
  setcontext(&b.sched);
  std::abort();  // unreachable: setcontext does not return on success
}

inline std::string where(const Block& b) {
  std::string s = "kernel ";
  s += b.kernel;
  s += ", block (" + std::to_string(b.bid.x) + ", " + std::to_string(b.bid.y) + ", " +
       std::to_string(b.bid.z) + ")";
  if (b.current != nullptr) {
    const uint3 t = b.current->tid;
    s += ", thread (" + std::to_string(t.x) + ", " + std::to_string(t.y) + ", " +
         std::to_string(t.z) + ")";
  }
  return s;
}

// The current fiber waits at `bar` with `expected` participants; the last one releases all.
inline void arrive(Barrier& bar, unsigned expected) {
  Block& b = block();
  Fiber* f = b.current;
  const unsigned gen = bar.generation;
  if (++bar.arrived == expected) {
    bar.arrived = 0;
    ++bar.generation;
    return;
  }
  f->waits_on = &bar;
  f->waits_gen = gen;
  FREEKV_EMU_START_SWITCH(&f->asan_fake, b.sched_bottom, b.sched_size);
  swapcontext(&f->ctx, &b.sched);
  FREEKV_EMU_FINISH_SWITCH(f->asan_fake, &b.sched_bottom, &b.sched_size);
}

inline void syncthreads() {
  Block& b = block();
  if (b.exited != 0) {
    fail("__syncthreads reached after " + std::to_string(b.exited) +
         " thread(s) of the block exited: a barrier not every thread reaches");
  }
  arrive(b.block_bar, static_cast<unsigned>(b.fibers.size()));
}

inline unsigned warp_of_current(unsigned mask, const char* op) {
  Block& b = block();
  const unsigned w = b.current->linear / 32;
  const unsigned n = b.warp_size[w];
  const unsigned live = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
  if ((mask & live) != live) {
    fail(std::string(op) + " with mask " + std::to_string(mask) +
         " leaves out live lanes of the warp (the emulation supports full-warp masks)");
  }
  return w;
}

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "__shfl_xor_sync of a value over 8 bytes");
  Block& b = block();
  const unsigned w = warp_of_current(mask, "__shfl_xor_sync");
  const unsigned lane = b.current->linear % 32;
  Barrier& bar = b.warp_bar[w];
  std::vector<uint64_t>& buf = b.warp_buf[bar.generation & 1u];
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  buf[w * 32 + lane] = bits;
  arrive(bar, b.warp_size[w]);
  const unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  T out = value;  // a lane outside the warp's live lanes: the caller's own value
  if (src < b.warp_size[w]) std::memcpy(&out, &buf[w * 32 + src], sizeof(T));
  return out;
}

inline unsigned ballot(unsigned mask, int predicate) {
  Block& b = block();
  const unsigned w = warp_of_current(mask, "__ballot_sync");
  const unsigned lane = b.current->linear % 32;
  Barrier& bar = b.warp_bar[w];
  std::vector<uint64_t>& buf = b.warp_buf[bar.generation & 1u];
  buf[w * 32 + lane] = predicate ? 1u : 0u;
  arrive(bar, b.warp_size[w]);
  unsigned out = 0;
  for (unsigned l = 0; l < b.warp_size[w]; ++l) out |= static_cast<unsigned>(buf[w * 32 + l]) << l;
  return out & mask;
}

inline void fiber_main() {
  Block& b = block();
  FREEKV_EMU_FINISH_SWITCH(nullptr, &b.sched_bottom, &b.sched_size);
  b.body();
  Fiber* f = b.current;
  f->done = true;
  ++b.exited;
  if (b.block_bar.arrived != 0) {
    fail("thread exited while " + std::to_string(b.block_bar.arrived) +
         " thread(s) wait at __syncthreads: a barrier not every thread reaches");
  }
  const unsigned w = f->linear / 32;
  if (b.warp_bar[w].arrived != 0) {
    fail("thread exited while lanes of its warp wait in a warp exchange");
  }
  // uc_link returns to the scheduler; this fiber's stack is done.
  FREEKV_EMU_START_SWITCH(nullptr, b.sched_bottom, b.sched_size);
}

// Runs one block to completion; returns an error message, empty on success.
inline std::string run_block(Block& b) {
  const unsigned n = b.block.x * b.block.y * b.block.z;
  const unsigned warps = (n + 31) / 32;
  b.fibers.assign(n, Fiber{});
  b.exited = 0;
  b.block_bar = Barrier{};
  b.warp_bar.assign(warps, Barrier{});
  b.warp_size.assign(warps, 32);
  if (n % 32 != 0) b.warp_size.back() = n % 32;
  b.warp_buf[0].assign(static_cast<std::size_t>(warps) * 32, 0);
  b.warp_buf[1].assign(static_cast<std::size_t>(warps) * 32, 0);
  b.error.clear();
  while (tl_stacks.size() < n) tl_stacks.emplace_back(new char[kStackBytes]);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = uint3{i % b.block.x, (i / b.block.x) % b.block.y, i / (b.block.x * b.block.y)};
    f.stack = tl_stacks[i].get();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  unsigned finished = 0;
  while (finished < n) {
    bool progressed = false;
    for (Fiber& f : b.fibers) {
      if (f.done) continue;
      if (f.waits_on != nullptr && f.waits_on->generation == f.waits_gen) continue;
      f.waits_on = nullptr;
      b.current = &f;
      FREEKV_EMU_START_SWITCH(&b.sched_fake, f.stack, kStackBytes);
      swapcontext(&b.sched, &f.ctx);
      FREEKV_EMU_FINISH_SWITCH(b.sched_fake, nullptr, nullptr);
      progressed = true;
      if (!b.error.empty()) return b.error;
      if (f.done) ++finished;
    }
    if (!progressed) {
      b.current = nullptr;
      return "deadlock: " + std::to_string(n - finished) + " thread(s) wait at a barrier (" +
             std::to_string(b.block_bar.arrived) + " at __syncthreads) that the other " +
             std::to_string(finished) + " thread(s) never reach (" + where(b) + ")";
    }
  }
  b.current = nullptr;
  return {};
}

// Runs kernel(args...) over the grid, block by block. Throws std::runtime_error on a kernel
// error (see the file comment).
template <typename... Params, typename... Args>
void launch(const char* name, dim3 grid, dim3 blk, void (*kernel)(Params...), Args&&... args) {
  const unsigned n = blk.x * blk.y * blk.z;
  if (n == 0 || n > kMaxThreads) {
    throw std::runtime_error(std::string("kernel ") + name + ": block of " + std::to_string(n) +
                             " threads (1 to 1024 allowed)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
    throw std::runtime_error(std::string("kernel ") + name + ": empty grid");
  }
  // Arguments are copied once, as a launch copies kernel parameters.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  Block b;
  b.kernel = name;
  b.grid = grid;
  b.block = blk;
  b.body = [&]() { std::apply(kernel, params); };
  Block* outer = tl_block;
  tl_block = &b;
  std::string error;
  for (unsigned z = 0; z < grid.z && error.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && error.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && error.empty(); ++x) {
        b.bid = uint3{x, y, z};
        error = run_block(b);
      }
    }
  }
  tl_block = outer;
  if (!error.empty()) throw std::runtime_error("emulated CUDA: " + error);
}

// FREEKV_LAUNCH(grid, block, smem, stream, kernel)(args...)
struct Launch {
  const char* name;
  dim3 grid, block;
  template <typename... Params>
  auto operator()(void (*kernel)(Params...)) const {
    return [name = name, grid = grid, block = block, kernel](auto&&... args) {
      launch(name, grid, block, kernel, std::forward<decltype(args)>(args)...);
    };
  }
};

}  // namespace freekv_emu

#define threadIdx (::freekv_emu::thread_idx())
#define blockIdx (::freekv_emu::block().bid)
#define blockDim (::freekv_emu::block().block)
#define gridDim (::freekv_emu::block().grid)

inline void __syncthreads() { ::freekv_emu::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return ::freekv_emu::shfl_xor(mask, value, lane_mask);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return ::freekv_emu::ballot(mask, predicate);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
template <typename T>
inline T atomicAdd(T* address, T value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// CUDA's integer min/max overloads (device code calls them unqualified).
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

#define FREEKV_EMU_LAUNCH(grid, block, smem, stream, ...) \
  (::freekv_emu::Launch{#__VA_ARGS__, dim3(grid), dim3(block)}(__VA_ARGS__))
