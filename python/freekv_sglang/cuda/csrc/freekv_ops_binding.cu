// Export table of the freekv_ops extension (loaded by freekv_sglang/ops/_load.py). Only
// declarations and the pybind11 table: every launcher lives in its own file.
#include <ATen/core/Tensor.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

namespace freekv {
void recall_direct(const at::Tensor& host_kv, const at::Tensor& work,
                   const std::vector<at::Tensor>& k_buffers,
                   const std::vector<at::Tensor>& v_buffers, int64_t ctas);
void page_digest(const at::Tensor& k_buffer, const at::Tensor& slots, const at::Tensor& pages,
                 const at::Tensor& digests, int64_t page_size, int64_t kind);
void select_pages(const at::Tensor& q, const at::Tensor& digests, const at::Tensor& rows,
                  const at::Tensor& seq_lens, const at::Tensor& slot_to_page,
                  const at::Tensor& page_to_slot, const at::Tensor& host_pages,
                  const at::Tensor& slot_tokens, const std::optional<at::Tensor>& head_mask,
                  int64_t page_size, int64_t num_sink, int64_t num_window, int64_t top_k,
                  int64_t layer, int64_t reduction, double scale, const at::Tensor& raw,
                  const at::Tensor& page_scores, const at::Tensor& selected,
                  const at::Tensor& recall, const at::Tensor& counts, const at::Tensor& work,
                  const std::vector<at::Tensor>& commit,
                  const std::optional<at::Tensor>& commit_live,
                  const std::optional<at::Tensor>& rerank_codes, int64_t rerank_bits,
                  int64_t rerank_candidates);
void correction_flags(const at::Tensor& q, const at::Tensor& q_prev, int64_t num_kv_heads,
                      double tau, bool use_tau, const at::Tensor& cos_mean,
                      const at::Tensor& flags);
void correction_masks(const at::Tensor& q, const at::Tensor& q_prev, const at::Tensor& regs,
                      const at::Tensor& seq_lens, const at::Tensor& spec_len, int64_t num_kv_heads,
                      double tau, bool use_tau, const at::Tensor& masks);
}  // namespace freekv

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FreeKV CUDA ops: recall, digest, select (and the speculation commit), correction";
  m.def("recall_direct", &freekv::recall_direct);
  m.def("page_digest", &freekv::page_digest);
  m.def("select_pages", &freekv::select_pages);
  m.def("correction_flags", &freekv::correction_flags);
  m.def("correction_masks", &freekv::correction_masks);
}
