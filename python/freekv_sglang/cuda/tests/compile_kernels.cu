// Compile check of every kernel template without torch: instantiates each kernel for both
// 16-bit dtypes, head_dim 64/128/256 (8/16/32 vectors of 16 bytes per row) and page size
// 16/32/64. Built by scripts/compile_cuda.sh for sm_80 and sm_90 with warnings as errors; the
// object is discarded.
#include "freekv/correct.cuh"
#include "freekv/digest.cuh"
#include "freekv/recall.cuh"
#include "freekv/select.cuh"

#define FREEKV_COPY_KERNELS(R, P) reinterpret_cast<const void*>(&freekv::recall_direct_kernel<R, P>)
#define FREEKV_COPY_ROW(R) \
  FREEKV_COPY_KERNELS(R, 16), FREEKV_COPY_KERNELS(R, 32), FREEKV_COPY_KERNELS(R, 64)
#define FREEKV_MATH_KERNELS(T)                                                \
  reinterpret_cast<const void*>(&freekv::digest_kernel<T>),                   \
      reinterpret_cast<const void*>(&freekv::quest_score_kernel<T>),          \
      reinterpret_cast<const void*>(&freekv::quest_score_vec_kernel<T, 64>),  \
      reinterpret_cast<const void*>(&freekv::quest_score_vec_kernel<T, 128>), \
      reinterpret_cast<const void*>(&freekv::quest_score_vec_kernel<T, 256>), \
      reinterpret_cast<const void*>(&freekv::correct_kernel<T>),              \
      reinterpret_cast<const void*>(&freekv::correction_masks_kernel<T>)

#define FREEKV_SELECT_KERNELS(T)                                                                 \
  reinterpret_cast<const void*>(&freekv::select_delta_kernel<T, freekv::kSelectThreads, false>), \
      reinterpret_cast<const void*>(&freekv::select_delta_kernel<T, freekv::kSelectThreads, true>)

extern const void* const freekv_compiled_kernels[];
const void* const freekv_compiled_kernels[] = {
    FREEKV_COPY_ROW(8),
    FREEKV_COPY_ROW(16),
    FREEKV_COPY_ROW(32),
    FREEKV_MATH_KERNELS(__half),
    FREEKV_MATH_KERNELS(__nv_bfloat16),
    FREEKV_SELECT_KERNELS(__half),
    FREEKV_SELECT_KERNELS(__nv_bfloat16),
};
