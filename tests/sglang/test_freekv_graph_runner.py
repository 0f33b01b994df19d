"""FreeKV's torch-native backend driven as SGLang's decode graph runner drives it, on the CPU.

SGLang 0.5.23's ``DecodeCudaGraphRunner`` calls ``init_cuda_graph_state(max_bs, ...)`` once,
then per captured batch size (largest first) builds a dummy batch in its persistent input
buffers (request rows 0, lengths ``get_cuda_graph_seq_len_fill_value()``), calls
``init_forward_metadata_out_graph(batch, in_capture=True)`` and captures the forward (the
in-graph metadata step, then every layer's attention). Before each replay it copies the real
batch into those buffers, padded to the next captured size with row 0 and the fill length,
builds the replay view (``build_replay_fb_view``: no rids) and calls
``init_forward_metadata_out_graph(view)``; ``graph.replay()`` then re-runs the captured ops on
the same buffers.

This test does exactly that with the real backend (SGLang's KV pool, request-to-token pool and
FreeKV's token allocator under a stand-in model runner; three layers, the first dense), minus
the CUDA graph itself: a "replay" re-runs the forward on the capture's batch object and input
buffers. What a replay relies on is asserted instead: the ops each replay records
(:func:`freekv_sglang.testing.static_ops.recording`, strict: every tensor read outside the
named persistent buffers is logged with its address) equal those of the capture of its batch
size, and none reads a device value on the host. The batches change from step to step (sizes
1 to 4, padded; requests within budget and over it, one crossing it; lengths and pages
recalled differ; reclaimed pages read from the dense-layer store), and the outputs of every
real row equal, bit for bit, those of a twin backend driven eagerly on the unpadded batches
(SGLang's eager path in graph mode), and are close to those of a backend without graph state
(today's eager path: SGLang's per-request SDPA, and FreeKV's step over the sparse rows alone).
The counters agree too: padding rows count nothing. It runs through the ops' references
(float32) and, marked slow, through the CUDA kernels compiled for the CPU (the emulated build:
bf16, head dim 128), whose launches with the padded batches' inert rows (several of them on
the one scratch region) are recorded too.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.model_executor.runner.decode_cuda_graph_runner import (
    build_replay_fb_view,
)

from freekv_sglang.ops import _load
from freekv_sglang.runtime import FreeKVRuntime, facade
from freekv_sglang.runtime import stats as stats_mod
from freekv_sglang.settings import FreeKVSettings
from freekv_sglang.sglang import lifecycle
from freekv_sglang.sglang.attention_backend import FreeKVTorchNativeBackend
from freekv_sglang.sglang.memory import FreeKVTokenAllocator, with_region_rows
from freekv_sglang.testing.static_ops import recording

pytestmark = pytest.mark.ops_reference

LAYERS, HQ, H, P = 3, 4, 2, 16
# Head dim and dtype of the case (set by the test): float32 and 32 for the references, bf16
# and 128 for the CUDA kernels' emulated build (what they take).
D, DTYPE = 32, torch.float32
ROWS, WIDTH, SLOTS = 6, 512, 4096
CAPTURE_BS = (1, 2, 4)
SETTINGS = FreeKVSettings(
    kv_offload="freekv", budget=96, sink=16, window=32, page_size=P, tau=0.9,
    dense_layers=(0,), host_pool_gb=0.05, conversion_threads=2, sparse_requests=5,
)  # fmt: skip
# The decode batches: (request row, rid) per step; lengths grow by one per step taken.
PROMPTS = {0: 92, 2: 200, 3: 301, 5: 150}
BATCHES = [[0, 2, 3], [2], [3, 0], [0, 2, 3, 5], [5, 3], [2, 0, 5], [3], [0, 2, 3, 5], [5, 0]]


class _Runner:
    """What the backend reads of SGLang's model runner, with SGLang's own pools."""

    def __init__(self) -> None:
        self.device = "cpu"
        self.use_mla_backend = False
        self.server_args = None
        self.model_config = SimpleNamespace(num_attention_heads=HQ, model_path=None)
        regions = FreeKVRuntime.region_tokens(SETTINGS.retrieval_config(), 5)
        self.token_to_kv_pool = with_region_rows(
            lambda n: MHATokenToKVPool(n, 1, DTYPE, H, D, LAYERS, "cpu", False, enable_alt_stream=False),
            SLOTS, regions,
        )  # fmt: skip
        self.req_to_token_pool = SimpleNamespace(
            req_to_token=torch.zeros(ROWS, WIDTH, dtype=torch.int32)
        )
        self.max_total_num_tokens = SLOTS
        self.token_to_kv_pool_allocator = FreeKVTokenAllocator(
            SLOTS, DTYPE, "cpu", self.token_to_kv_pool, False
        )


def _layer(i: int) -> Any:
    return SimpleNamespace(
        layer_id=i, tp_q_head_num=HQ, tp_k_head_num=H, tp_v_head_num=H, head_dim=D,
        qk_head_dim=D, v_head_dim=D, scaling=0.8 * D**-0.5, logit_cap=0.0, is_cross_attention=False,
        sliding_window_size=None, k_scale=None, v_scale=None,
    )  # fmt: skip


def _randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(DTYPE)


class _Twin:
    """One backend and what drives it: ``graph`` (driven as the graph runner), ``eager``
    (graph state, driven eagerly) or ``plain`` (no graph state: today's eager path)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.mr = _Runner()
        self.be = FreeKVTorchNativeBackend(self.mr, SETTINGS)
        facade._current = None  # three runtimes in one process: none is "the" runtime
        self.lens: dict[int, int] = {}
        if kind != "plain":
            self.be.init_cuda_graph_state(max(CAPTURE_BS), max(CAPTURE_BS))
        if kind == "graph":
            bs = max(CAPTURE_BS)
            self.buf = SimpleNamespace(
                input_ids=torch.zeros(bs, dtype=torch.int64),
                positions=torch.zeros(bs, dtype=torch.int64),
                req_pool_indices=torch.zeros(bs, dtype=torch.int64),
                seq_lens=torch.ones(bs, dtype=torch.int64),
                seq_lens_cpu=torch.ones(bs, dtype=torch.int64),
                out_cache_loc=torch.zeros(bs, dtype=torch.int64),
                encoder_lens=None,
                mamba_track_indices=None,
                # Each layer's attention inputs (in a model, made by the graph's earlier ops).
                q=torch.zeros(LAYERS, bs, HQ * D, dtype=DTYPE),
                k=torch.zeros(LAYERS, bs, H, D, dtype=DTYPE),
                v=torch.zeros(LAYERS, bs, H, D, dtype=DTYPE),
            )
            self.captured: dict[int, Any] = {}  # batch size -> (capture batch, its record)

    @property
    def rt(self) -> Any:
        return self.be.freekv

    def prefill(self, row: int, n: int, rid: str, g: torch.Generator) -> None:
        """What the backend sees of a prefill: the batch adopted, each layer noted, its K/V
        written and offloaded (SGLang's own extend attention is not needed here)."""
        slots = self.mr.token_to_kv_pool_allocator.alloc(n)
        self.mr.req_to_token_pool.req_to_token[row, :n] = slots.to(torch.int32)
        self.rt.begin_forward([row], [n], [rid])
        pool = self.mr.token_to_kv_pool
        for layer in range(LAYERS):
            self.be._note_layer(_layer(layer))  # as forward_extend does: the model's scale
            pool.get_key_buffer(layer)[slots] = _randn(n, H, D, generator=g)
            pool.get_value_buffer(layer)[slots] = _randn(n, H, D, generator=g)
            self.be._offload(layer)
        self.lens[row] = n

    def named(self) -> dict[str, torch.Tensor]:
        """Every buffer that lives across steps (what a graph may read)."""
        named = {f"rt.{i}": t for i, t in enumerate(stats_mod.device_tensors(self.rt))}
        pool = self.mr.token_to_kv_pool
        for i in range(LAYERS):
            named[f"k_pool.{i}"] = pool.get_key_buffer(i)
            named[f"v_pool.{i}"] = pool.get_value_buffer(i)
        named["host_kv"] = self.rt.offload.host_kv
        named["req_to_token"] = self.mr.req_to_token_pool.req_to_token
        named.update({f"in.{k}": t for k, t in vars(self.buf).items() if t is not None})
        named.update({f"graph.{k}": t for k, t in self.be._graph.buffers().items()})
        return named

    def run_layers(self, fb: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
        return [self.be.forward_decode(q[i], k[i], v[i], _layer(i), fb) for i in range(LAYERS)]

    def capture(self, bs: int) -> None:
        """The graph runner's capture of batch size ``bs`` (its dummy batch)."""
        buf = self.buf
        buf.req_pool_indices.zero_()
        buf.seq_lens.fill_(self.be.get_cuda_graph_seq_len_fill_value())
        buf.seq_lens_cpu.fill_(self.be.get_cuda_graph_seq_len_fill_value())
        buf.out_cache_loc.zero_()
        fb = SimpleNamespace(
            forward_mode=ForwardMode.DECODE, batch_size=bs,
            req_pool_indices=buf.req_pool_indices[:bs], seq_lens=buf.seq_lens[:bs],
            seq_lens_cpu=buf.seq_lens_cpu[:bs], out_cache_loc=buf.out_cache_loc[:bs],
            encoder_lens=None, seq_lens_sum=bs, orig_seq_lens=buf.seq_lens[:bs],
        )  # fmt: skip
        self.be.init_forward_metadata_out_graph(fb, in_capture=True)
        self.graph_ops(fb, bs, {})  # the warm-up forward SGLang runs before each capture
        named = self.named()  # the buffers as captured: a replay must read these very ones
        rec, _ = self.graph_ops(fb, bs, named)
        self.captured[bs] = (fb, rec, named)

    def graph_ops(
        self, fb: Any, bs: int, named: dict[str, torch.Tensor]
    ) -> tuple[Any, list[torch.Tensor]]:
        """What the graph of ``bs`` holds: the in-graph metadata step and every layer's
        attention, on the capture's batch and input buffers; recorded."""
        buf = self.buf
        ext = _load.load_emulated_extension() if _load.ops_mode() == "emulated" else None
        with recording(named, ext, strict=True) as rec:
            self.be.init_forward_metadata_in_graph(fb)
            out = self.run_layers(fb, buf.q[:, :bs], buf.k[:, :bs], buf.v[:, :bs])
        return rec, out

    def decode(self, rows: list[int], q: Any, k: Any, v: Any) -> list[torch.Tensor]:
        """One decode step of ``rows`` (q, k, v: per layer, per row); each layer's output."""
        for r in rows:
            self.lens[r] += 1
        lens = [self.lens[r] for r in rows]
        slots = self.mr.token_to_kv_pool_allocator.alloc(len(rows))
        r2t = self.mr.req_to_token_pool.req_to_token
        for r, n, s in zip(rows, lens, slots.tolist(), strict=True):
            r2t[r, n - 1] = s
        raw = len(rows)
        if self.kind != "graph":
            fb = SimpleNamespace(
                forward_mode=ForwardMode.DECODE, batch_size=raw,
                req_pool_indices=torch.tensor(rows), req_pool_indices_cpu=torch.tensor(rows),
                seq_lens=torch.tensor(lens), seq_lens_cpu=torch.tensor(lens),
                out_cache_loc=slots, encoder_lens=None, rids=[f"r{r}" for r in rows],
            )  # fmt: skip
            self.be.init_forward_metadata(fb)
            return self.run_layers(fb, q, k, v)
        return self._replay(rows, lens, slots, q, k, v)

    def _replay(self, rows: list[int], lens: list[int], slots: Any, q: Any, k: Any, v: Any):
        raw = len(rows)
        bs = min(b for b in CAPTURE_BS if b >= raw)
        buf = self.buf
        # SGLang's registry fill: the real rows, then padding (row 0, the fill length, slot 0).
        buf.req_pool_indices[:bs] = torch.tensor(rows + [0] * (bs - raw))
        buf.seq_lens[:bs] = torch.tensor(lens + [1] * (bs - raw))
        buf.seq_lens_cpu[:bs] = buf.seq_lens[:bs]
        buf.out_cache_loc[:bs] = torch.cat((slots, torch.zeros(bs - raw, dtype=torch.int64)))
        batch = SimpleNamespace(
            forward_mode=ForwardMode.DECODE, batch_size=raw, seq_lens_sum=sum(lens),
            seq_lens_cpu=torch.tensor(lens), max_seq_len_host=max(lens), out_cache_loc=slots,
            out_cache_loc_virtual=None, kv_loc_plan=None, kv_loc_cols=None,
            max_seq_len_override=None, spec_info=None, lora_ids=None,
            can_run_decode_cuda_graph=True,
        )  # fmt: skip
        batch.req_pool_indices_cpu = torch.tensor(rows)  # the scheduler's host copy
        # SGLang's view, through FreeKV's hook on it: the rows on the host, padded as SGLang
        # pads them (so the host part reads no device value).
        view = lifecycle.replay_view_around(
            build_replay_fb_view,
            forward_batch=batch, buffers=buf, bs=bs, raw_bs=raw, num_tokens=bs,
            global_num_tokens_cpu=None, seq_len_fill_value=1,
            capture_forward_mode=ForwardMode.DECODE, is_encoder_decoder=False,
        )  # fmt: skip
        assert not hasattr(view, "rids") and view.num_padding == bs - raw
        assert view.req_pool_indices_cpu.tolist() == rows + [0] * (bs - raw)
        self.be.init_forward_metadata_out_graph(view)
        for i in range(LAYERS):
            buf.q[i, :raw], buf.k[i, :raw], buf.v[i, :raw] = q[i], k[i], v[i]
        buf.q[:, raw:bs] = 7.0  # padding rows carry what the model made of them
        fb, rec_cap, named = self.captured[bs]
        rec, outs = self.graph_ops(fb, bs, named)  # graph.replay()
        self.last_record = (rec_cap, rec, bs)
        return [o[:raw] for o in outs]


def _same_record(cap: Any, rep: Any, what: str) -> None:
    assert rep.forbidden == [], f"{what}: host reads {rep.forbidden}"
    assert len(rep.log) == len(cap.log), f"{what}: {len(rep.log)} ops, capture {len(cap.log)}"
    for j, (a, b) in enumerate(zip(cap.log, rep.log, strict=True)):
        assert a == b, f"{what}, op {j}: {b} differs from the capture's {a}"


@pytest.mark.parametrize(
    ("ops", "dtype", "head_dim", "tol"),
    [
        pytest.param("reference", torch.float32, 32, 1e-5, id="reference"),
        pytest.param("emulated", torch.bfloat16, 128, 2e-2, id="emulated", marks=pytest.mark.slow),
    ],
)
def test_graph_runner_capture_and_replay_equal_the_eager_path(
    ops: str, dtype: torch.dtype, head_dim: int, tol: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FREEKV_OPS", ops)
    monkeypatch.setattr(f"{__name__}.D", head_dim)
    monkeypatch.setattr(f"{__name__}.DTYPE", dtype)
    twins = {kind: _Twin(kind) for kind in ("graph", "eager", "plain")}
    graph = twins["graph"]
    for bs in sorted(CAPTURE_BS, reverse=True):  # SGLang captures the largest first
        graph.capture(bs)
        cap = graph.captured[bs][1]
        assert cap.forbidden == [] and cap.log
        if ops == "emulated":  # the kernels' launches are in the record
            launches = {e[0] for e in cap.log if str(e[0]).startswith("freekv_ops.")}
            assert {"freekv_ops.select_pages", "freekv_ops.recall_direct"} <= launches
    assert graph.rt.live_rows == 0  # the dummy batches adopted no request
    assert graph.rt.stats()["checks"] == 0
    for row, n in PROMPTS.items():
        for twin in twins.values():
            twin.prefill(row, n, f"r{row}", torch.Generator().manual_seed(row))
    g = torch.Generator().manual_seed(0)
    base = {r: torch.randn(LAYERS, HQ * D, generator=g) for r in PROMPTS}  # float32
    seen_bs, sparse_mix = set(), 0
    for step, rows in enumerate(BATCHES):
        # Queries drift, some far (the correction flags differ from step to step).
        for r in rows:
            base[r] = base[r] + (2.0 if step % 3 == 1 else 0.1) * torch.randn(
                LAYERS, HQ * D, generator=g
            )
        q = [torch.stack([base[r][i] for r in rows]).to(DTYPE) for i in range(LAYERS)]
        k = [_randn(len(rows), H, D, generator=g) for _ in range(LAYERS)]
        v = [_randn(len(rows), H, D, generator=g) for _ in range(LAYERS)]
        outs = {kind: twin.decode(rows, q, k, v) for kind, twin in twins.items()}
        cap, rec, bs = graph.last_record
        _same_record(cap, rec, f"step {step} (bs {bs}, {len(rows)} requests)")
        seen_bs.add(bs)
        sparse = [graph.rt.is_sparse(r) for r in rows]
        sparse_mix += any(sparse) and not all(sparse)
        for i in range(LAYERS):
            assert torch.equal(outs["graph"][i], outs["eager"][i]), (step, i)
            torch.testing.assert_close(outs["graph"][i], outs["plain"][i], rtol=tol, atol=tol)
        stats = {kind: twin.rt.stats() for kind, twin in twins.items()}
        for key in ("checks", "corrections", "pages_recalled", "offload_jobs_total"):
            assert stats["graph"][key] == stats["eager"][key], (step, key)
        for key in ("checks", "corrections", "pages_recalled"):
            assert stats["graph"][key] == stats["plain"][key], (step, key)
    assert seen_bs == set(CAPTURE_BS)
    assert sparse_mix > 0  # batches mixing requests over and within budget replayed
    final = graph.rt.stats()
    assert final["pages_recalled"] > 0 and final["corrections"] > 0
    assert final["device_tokens_reclaimed"] > 0  # dense layers read the dense-layer store
    assert graph.rt.is_sparse(0)  # row 0 (also the padding row) crossed the budget
    for twin in twins.values():
        for row in PROMPTS:
            twin.rt.release(row)
        assert twin.rt.check_pools()
        twin.rt.close()
