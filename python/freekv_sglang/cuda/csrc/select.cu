// Launcher of device-side selection (freekv/select.cuh): a Quest-score kernel and one
// select/delta kernel per (request, KV head). Called from freekv_sglang.ops.select on the
// stream that produced q (the forward stream, or the selection stream after it waited on an
// event recorded there); it updates the residency in place and writes the recall work list
// that recall_direct consumes on the same stream without a host round trip (the work list
// contract: python/freekv_sglang/ops/recall.py). Layouts: freekv/select.cuh. With `commit` (the
// speculative selection) the select kernel also commits the selection and the step's counters
// into the regions' speculation state (freekv/speculate.cuh): no launch of its own. With
// `rerank_codes` it runs the selection's second stage between the reduction and the top-k
// (freekv/select.cuh, Re-ranking), in the same launch.
#include <limits>

#include "checks.h"
#include "freekv/select.cuh"

namespace freekv {

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
                  int64_t rerank_candidates) {
  FREEKV_CHECK_INPUT(q);
  FREEKV_CHECK_DIM(q, 3);
  FREEKV_CHECK_INPUT(digests);
  FREEKV_CHECK_DIM(digests, 4);
  FREEKV_CHECK_SAME_DEVICE(digests, q);
  FREEKV_CHECK_DTYPE(digests, q.scalar_type());
  const int64_t b = q.size(0), h_q = q.size(1), d = q.size(2);
  const int64_t n = digests.size(0), h = digests.size(2);
  FREEKV_CHECK_SIZE(digests, 1, 2);
  FREEKV_CHECK_SIZE(digests, 3, d);
  TORCH_CHECK(n < (int64_t{1} << 31), "digests.size(0) (host pages, ", n,
              ") must be < 2^31: work rows hold host pages as int32");
  TORCH_CHECK(h >= 1 && h_q % h == 0, "digests.size(2) (KV heads, ", h,
              ") must divide q.size(1) (query heads, ", h_q, ")");
  TORCH_CHECK(h_q / h <= kMaxGroup, "GQA group size must be <= ", kMaxGroup, ", got ", h_q / h);
  TORCH_CHECK(d % 2 == 0 && d <= kMaxHeadDim, "head_dim must be even and <= ", kMaxHeadDim,
              ", got ", d);
  check_tensor(rows, "rows", at::kLong, {b}, q);
  check_tensor(seq_lens, "seq_lens", at::kLong, {b}, q);
  FREEKV_CHECK_INPUT(host_pages);
  FREEKV_CHECK_DIM(host_pages, 2);
  const int64_t rr = host_pages.size(0), p = host_pages.size(1);
  FREEKV_CHECK_INPUT(slot_to_page);
  FREEKV_CHECK_DIM(slot_to_page, 3);
  const int64_t s = slot_to_page.size(2);
  FREEKV_CHECK_DIM(page_to_slot, 3);
  TORCH_CHECK(page_to_slot.size(2) == p, "page_to_slot.size(2) (", page_to_slot.size(2),
              ") must equal host_pages.size(1) (pages per region, P = ", p, ")");
  check_tensor(host_pages, "host_pages", at::kLong, {rr, p}, q);
  check_tensor(slot_to_page, "slot_to_page", at::kLong, {rr, h, s}, q);
  check_tensor(page_to_slot, "page_to_slot", at::kLong, {rr, h, p}, q);
  check_tensor(slot_tokens, "slot_tokens", at::kLong, {rr, s}, q);
  TORCH_CHECK(rr >= 1, "the residency stores must have at least one row (budget region)");
  TORCH_CHECK(top_k >= 1 && top_k <= s && s <= kMaxSelect, "need 1 <= top_k <= S <= ", kMaxSelect,
              " (S = slot_to_page.size(2)), got top_k=", top_k, ", S=", s);
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "reduction must be 0 (softmax_mean), 1 (mean) or 2 (max), got ", reduction);
  TORCH_CHECK(page_size >= 1 && num_sink >= 0 && num_window >= 0,
              "page_size must be >= 1 and num_sink, num_window >= 0");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(page_size <= kIntMax && num_sink <= kIntMax && num_window <= kIntMax && p <= kIntMax,
              "page_size, num_sink, num_window and host_pages.size(1) must be < 2^31 (the "
              "kernels index pages with int)");
  const uint8_t* mask = nullptr;
  if (head_mask.has_value()) {
    check_tensor(*head_mask, "head_mask", at::kBool, {b, h}, q);
    mask = reinterpret_cast<const uint8_t*>(head_mask->data_ptr<bool>());
  }
  check_tensor(raw, "raw", at::kFloat, {b, h_q, p}, q);
  check_tensor(page_scores, "page_scores", at::kFloat, {b, h, p}, q);
  check_tensor(selected, "selected", at::kLong, {b, h, top_k}, q);
  check_tensor(recall, "recall", at::kLong, {b, h, s}, q);
  check_tensor(counts, "counts", at::kLong, {b, h, 3}, q);
  check_tensor(work, "work", at::kInt, {b * h * s, 4}, q);
  // The speculation's commit: masks, corr_counts, spec_pages, spec_len, q_prev, counts.
  CommitArgs c{};
  TORCH_CHECK(commit.empty() || commit.size() == 6, "commit must hold 6 tensors (masks, ",
              "corr_counts, spec_pages, spec_len, q_prev, counts), got ", commit.size());
  TORCH_CHECK(commit.empty() || !head_mask.has_value(),
              "a commit needs every head selected: head_mask must be None");
  if (!commit.empty()) {
    check_tensor(commit[0], "masks", at::kBool, {3, b, h}, q);
    check_tensor(commit[1], "corr_counts", at::kLong, {b, h, 3}, q);
    check_tensor(commit[2], "spec_pages", at::kLong, {rr, h, top_k}, q);
    check_tensor(commit[3], "spec_len", at::kLong, {rr}, q);
    check_tensor(commit[4], "q_prev", q.scalar_type(), {rr, h_q, d}, q);
    check_tensor(commit[5], "counts", at::kLong, {rr, kNumCounters}, q);
    if (commit_live.has_value()) {
      check_tensor(*commit_live, "live", at::kLong, {b}, q);
      c.live = commit_live->data_ptr<int64_t>();
    }
    c.q = static_cast<const uint16_t*>(q.data_ptr());
    c.masks = reinterpret_cast<const uint8_t*>(commit[0].data_ptr<bool>());
    c.corr_counts = commit[1].data_ptr<int64_t>();
    c.spec_pages = commit[2].data_ptr<int64_t>();
    c.spec_len = commit[3].data_ptr<int64_t>();
    c.q_prev = static_cast<uint16_t*>(commit[4].data_ptr());
    c.counts = commit[5].data_ptr<int64_t>();
  } else {
    TORCH_CHECK(!commit_live.has_value(), "live is a commit's argument: commit is empty");
  }
  // The second stage: codes [N, H, page_size, D * bits / 8] uint8 beside the digests.
  const uint8_t* codes = nullptr;
  if (rerank_codes.has_value()) {
    TORCH_CHECK(rerank_bits == 2 || rerank_bits == 4, "rerank bits must be 2 or 4, got ",
                rerank_bits);
    TORCH_CHECK(d % (8 / rerank_bits) == 0, "head_dim (", d, ") must be a multiple of ",
                8 / rerank_bits, " for ", rerank_bits, "-bit key codes (", 8 / rerank_bits,
                " per byte)");
    TORCH_CHECK(rerank_candidates >= 1 && rerank_candidates <= kMaxSelect,
                "need 1 <= rerank candidates <= ", kMaxSelect, ", got ", rerank_candidates);
    check_tensor(*rerank_codes, "rerank codes", at::kByte, {n, h, page_size, d * rerank_bits / 8},
                 q);
    codes = rerank_codes->data_ptr<uint8_t>();
  }
  if (b == 0) return;
  const DeviceGuard guard(q.device());
  const cudaStream_t stream = current_stream();
  const int warps = kScoreThreads / 32;
  const int64_t pairs = p * h;
  // 16-byte loads where the rows allow them (head_dim 64/128/256, q and digests 16-byte aligned;
  // rows of D 16-bit values are then aligned too), two passes of a warp's pairs per warp.
  const bool aligned = reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(digests.data_ptr()) % 16 == 0;
  dispatch_kv_dtype(q.scalar_type(), "q", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto vec = [&](auto dd) {
      constexpr int kD = decltype(dd)::value;
      const int64_t per_block = int64_t{warps} * 2 * (32 / (kD / 8));
      const int64_t vt =
          std::max<int64_t>(1, std::min<int64_t>((pairs + per_block - 1) / per_block, 65535));
      const dim3 grid(static_cast<unsigned>(vt), static_cast<unsigned>(b));
      FREEKV_LAUNCH(grid, kScoreThreads, 0, stream, quest_score_vec_kernel<T, kD>)(
          static_cast<const T*>(q.data_ptr()), static_cast<const T*>(digests.data_ptr()), n,
          rows.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), host_pages.data_ptr<int64_t>(),
          mask, static_cast<int>(h_q), static_cast<int>(h), static_cast<int>(p),
          static_cast<int>(page_size), static_cast<int>(num_sink), static_cast<int>(num_window),
          raw.data_ptr<float>());
    };
    if (aligned && d == 64) {
      vec(std::integral_constant<int, 64>{});
    } else if (aligned && d == 128) {
      vec(std::integral_constant<int, 128>{});
    } else if (aligned && d == 256) {
      vec(std::integral_constant<int, 256>{});
    } else {  // 4-byte loads, one warp a pair, four pairs a warp
      const int64_t tiles =
          std::max<int64_t>(1, std::min<int64_t>((pairs + warps * 4 - 1) / (warps * 4), 65535));
      const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(b));
      FREEKV_LAUNCH(grid, kScoreThreads, 0, stream, quest_score_kernel<T>)(
          static_cast<const T*>(q.data_ptr()), static_cast<const T*>(digests.data_ptr()), n,
          rows.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), host_pages.data_ptr<int64_t>(),
          mask, static_cast<int>(h_q), static_cast<int>(h), static_cast<int>(d),
          static_cast<int>(p), static_cast<int>(page_size), static_cast<int>(num_sink),
          static_cast<int>(num_window), raw.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  SelectArgs a{};
  a.raw = raw.data_ptr<float>();
  a.rows = rows.data_ptr<int64_t>();
  a.seq_lens = seq_lens.data_ptr<int64_t>();
  a.head_mask = mask;
  a.host_pages = host_pages.data_ptr<int64_t>();
  a.slot_tokens = slot_tokens.data_ptr<int64_t>();
  a.slot_to_page = slot_to_page.data_ptr<int64_t>();
  a.page_to_slot = page_to_slot.data_ptr<int64_t>();
  a.page_scores = page_scores.data_ptr<float>();
  a.selected = selected.data_ptr<int64_t>();
  a.recall = recall.data_ptr<int64_t>();
  a.counts = counts.data_ptr<int64_t>();
  a.work = work.data_ptr<int32_t>();
  a.num_host_pages = n;
  a.num_q_heads = static_cast<int>(h_q);
  a.num_kv_heads = static_cast<int>(h);
  a.head_dim = static_cast<int>(d);
  a.commit = c;
  a.max_pages = static_cast<int>(p);
  a.page_size = static_cast<int>(page_size);
  a.num_sink = static_cast<int>(num_sink);
  a.num_window = static_cast<int>(num_window);
  a.top_k = static_cast<int>(top_k);
  a.num_slots = static_cast<int>(s);
  a.layer = static_cast<int>(layer);
  a.reduction = static_cast<int>(reduction);
  a.scale = static_cast<float>(scale);
  dispatch_kv_dtype(q.scalar_type(), "q", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    RerankArgs<T> r{};
    r.q = static_cast<const T*>(q.data_ptr());
    r.digests = static_cast<const T*>(digests.data_ptr());
    r.codes = codes;
    r.bits = static_cast<int>(rerank_bits);
    r.candidates = static_cast<int>(rerank_candidates);
    if (codes != nullptr) {
      FREEKV_LAUNCH(static_cast<unsigned>(b * h), kSelectThreads, 0, stream,
                    select_delta_kernel<T, kSelectThreads, true>)(a, r);
    } else {
      FREEKV_LAUNCH(static_cast<unsigned>(b * h), kSelectThreads, 0, stream,
                    select_delta_kernel<T, kSelectThreads, false>)(a, r);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace freekv
