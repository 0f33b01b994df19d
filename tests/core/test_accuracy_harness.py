"""The accuracy harness and its data set, on a tiny random Llama with a word-level tokenizer
built here: the dense path reproduces transformers' own greedy decoding, FreeKV within budget
reproduces dense tokens, and the passkey data set is deterministic and well-formed."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from benchmarks import bench_accuracy, passkey


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = " ".join(
        [
            passkey._PASSKEY_INTRO,
            passkey._PASSKEY_FILLER,
            passkey._NEEDLE_INTRO,
            *passkey._ADJ,
            *passkey._ANIMALS,
            *passkey._PLACES,
            *passkey._VERBS,
            *passkey._EXTRAS,
            "The pass key is Remember it What is the secret number of the",
        ]
    )
    words = sorted(set(re.findall(r"[A-Za-z]+|[^\sA-Za-z0-9]", text)))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", *list("0123456789"), *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")


def _model(vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(cfg).eval()


def test_passkey_cases_are_deterministic_and_well_formed() -> None:
    tok = _tokenizer()
    lengths = (512, 1024)
    a = passkey.make_cases(tok, lengths=lengths)
    b = passkey.make_cases(tok, lengths=lengths)
    assert a == b
    assert len(a) == len(lengths) * len(passkey.DEPTHS) * len(passkey.KINDS)
    assert len({c.case_id for c in a}) == len(a)
    for c in a:
        assert c.target_tokens - 40 <= c.num_tokens <= c.target_tokens
        assert re.fullmatch(r"\d{5}", c.answer)
        assert c.prompt.count(c.answer) == 2 if c.kind == "passkey" else 1
        assert c.prompt.rstrip().endswith("is")
        # the needle sits at the requested depth of the document
        at = c.prompt.index(c.answer) / len(c.prompt)
        assert abs(at - c.depth) < 0.12, (c.case_id, at)
    other = passkey.make_cases(tok, lengths=lengths, seed=1)
    assert [c.answer for c in other] != [c.answer for c in a]
    assert len(passkey.make_cases(tok, lengths=passkey.LENGTHS[:1])) == 10
    assert passkey.pick(a, 4) == [a[0], a[5], a[10], a[15]]


@pytest.mark.slow
def test_harness_dense_matches_transformers_and_freekv_within_budget_is_exact() -> None:
    tok = _tokenizer()
    model = _model(len(tok))
    cases = passkey.pick(passkey.make_cases(tok, lengths=(384, 512)), 3)
    gen = 6
    # transformers' own greedy decoding with its SDPA attention and KV cache
    model.set_attn_implementation("sdpa")
    ref = {}
    for c in cases:
        out = model.generate(
            torch.tensor([list(c.input_ids)]),
            max_new_tokens=gen + 1,
            do_sample=False,
            pad_token_id=0,
        )
        ref[c.case_id] = out[0, c.num_tokens :].tolist()
    variants = bench_accuracy.make_variants(
        [64, 1024], 0.9, page_size=16, sink=16, window=16, dense_layers=(0,),
        select_scales=("sqrt_d", "raw"),
    )  # fmt: skip
    res = bench_accuracy.run(model, tok, cases, variants, gen, batch=2, log=lambda *_: None)
    rows = {r["variant"]: r for r in res["variants"]}
    dense = rows["dense"]
    assert dense["token_agreement"] == 1.0 and dense["mass_recall"] is None
    # The harness's dense path (ragged batch of 2, own caches) is transformers' greedy decode,
    # and every variant whose budget covers the prompts is dense.
    for name in ("dense", "freekv-b1024", "freekv-raw-b1024", "sync-b1024", "oracle-b1024"):
        for c in cases:
            assert rows[name]["outputs"][c.case_id] == tok.decode(
                ref[c.case_id], skip_special_tokens=True
            ), (name, c.case_id)
        assert rows[name]["same_text_as_dense"] == 1.0
    small = rows["freekv-b64"]
    assert 0.0 < small["mass_recall"] < 1.0
    assert small["rel_err"] > 0.0
    assert 0.0 <= small["correction_rate"] <= 1.0
    assert 0.0 < small["page_miss_rate"] <= 1.0
    # No selection of 64 tokens holds more attention mass than the oracle's; sink + window
    # alone holds less than any selection.
    oracle = rows["oracle-b64"]["mass_recall"]
    for name in ("freekv-b64", "freekv-raw-b64", "sync-b64", "sync-raw-b64"):
        assert rows["sink+window"]["mass_recall"] < rows[name]["mass_recall"] <= oracle, name
    report = {
        "model": "tiny",
        "command": "test",
        "host": "test",
        "size": {"num_cases": 3, "min_tokens": 1, "max_tokens": 2, "kinds": "x", "gen_tokens": gen},
        "settings": {
            "page_size": 16, "sink_tokens": 16, "window_tokens": 16, "dense_layers": [0],
            "tau": 0.9,
        },
        "wall_seconds": 1.0,
        **res,
    }  # fmt: skip
    md = bench_accuracy.markdown(report)
    assert md.count("\n| ") == len(variants) + 1


def _reference_setup(
    selection: str, group: int, seed: int = 0
) -> tuple[Any, Any, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A one-layer state over random caches of 2 requests past their 64-token budget."""
    from freekv_sglang.config import FreeKVConfig
    from freekv_sglang.state import FreeKVState

    h, d, length = 2, 16, 200
    cfg = FreeKVConfig(page_size=8, sink_tokens=8, window_tokens=16, budget_tokens=64,
                       tau=0.8, dense_layers=(), selection=selection)  # fmt: skip
    st = FreeKVState(cfg, num_layers=1, num_q_heads=h * group, num_kv_heads=h, head_dim=d,
                     max_requests=2, max_seq_len=length)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(2, length, h, d, generator=gen)
    v = torch.randn(2, length, h, d, generator=gen)
    qs = [torch.randn(2, h * group, d, generator=gen) * 2 for _ in range(6)]
    return cfg, st, k, v, qs


def test_first_decode_step_selects_with_its_own_query_as_the_server_does() -> None:
    from freekv_sglang.attention import freekv_attention, prime_after_prefill

    lens0 = torch.tensor([150, 121])
    rows = torch.arange(2)
    runs = {}
    for selection in ("speculative", "current"):
        _, st, k, v, qs = _reference_setup(selection, group=3)
        st.add_request(rows)
        prime_after_prefill(st, 0, rows, k, lens0)
        ls = st.layers[0]
        assert bool((ls.slot_to_page[rows] == -1).all()) and not bool(ls.has_prev[rows].any())
        out = freekv_attention(qs[0], k, v, lens0 + 1, st, 0, rows)
        runs[selection] = (out, st.counters())
    (spec_out, spec), (cur_out, cur) = runs["speculative"], runs["current"]
    # Nothing to correct yet: the speculative mode's first step is the synchronous selection,
    # every selected page recalled (the budget region starts empty).
    assert torch.equal(spec_out, cur_out)
    assert spec["checks"] == 0 and spec["corrections"] == 0
    assert spec["pages_recalled"] == cur["pages_recalled"] == cur["pages_selected"] > 0


def test_selection_scale_matters_only_across_a_group() -> None:
    from freekv_sglang.attention import freekv_attention, prime_after_prefill

    rows = torch.arange(2)
    lens0 = torch.tensor([150, 121])
    outs: dict[tuple[int, str], list[torch.Tensor]] = {}
    for group in (1, 3):
        for name, scale in (("sqrt_d", None), ("raw", 1.0)):
            _, st, k, v, qs = _reference_setup("current", group=group, seed=1)
            st.add_request(rows)
            prime_after_prefill(st, 0, rows, k, lens0)
            outs[(group, name)] = [
                freekv_attention(q, k, v, lens0 + 1 + t, st, 0, rows, select_scale=scale)
                for t, q in enumerate(qs)
            ]
    # One query head per KV head: the softmax keeps each head's order, so the pages are the
    # same whatever its temperature. Across a group of three the temperature changes the mean.
    for a, b in zip(outs[(1, "sqrt_d")], outs[(1, "raw")], strict=True):
        assert torch.equal(a, b)
    assert any(
        not torch.equal(a, b) for a, b in zip(outs[(3, "sqrt_d")], outs[(3, "raw")], strict=True)
    )


def test_oracle_pages_are_the_candidates_of_most_attention_mass() -> None:
    from freekv_sglang.attention import oracle_pages
    from freekv_sglang.retrieval import candidate_mask

    cfg, _, _, _, _ = _reference_setup("current", group=3)
    gen = torch.Generator().manual_seed(2)
    b, h, g, length, n_pages = 2, 2, 3, 150, 25
    probs = torch.softmax(torch.randn(b, h, g, length, generator=gen) * 3, dim=-1)
    seq = torch.tensor([150, 131])
    probs[1, ..., 131:] = 0.0
    sel = oracle_pages(probs, seq, n_pages, cfg)
    cand = candidate_mask(seq, n_pages, cfg)
    for i in range(b):
        for j in range(h):
            mass = [float(probs[i, j, :, p * 8 : (p + 1) * 8].sum()) for p in range(n_pages)]
            ok = [p for p in range(n_pages) if cand[i, p]]
            want = sorted(ok, key=lambda p: -mass[p])[: cfg.num_selected_pages]
            assert sorted(sel.pages[i, j].tolist()) == sorted(want), (i, j)
            assert torch.isneginf(sel.page_scores[i, j, ~cand[i]]).all()


def test_server_benchmark_runs_dense_once_and_each_budget() -> None:
    from benchmarks import bench_passkey_server as ps
    from benchmarks import bench_serving_cpu as serving

    keys = ps.variant_keys(["dense", "freekv", "sync"], [512, 2048])
    assert keys == [("dense", "dense", None), ("freekv-b512", "freekv", 512),
                    ("sync-b512", "sync", 512), ("freekv-b2048", "freekv", 2048),
                    ("sync-b2048", "sync", 2048)]  # fmt: skip
    a = serving.argparse.Namespace(budget=2048, sink=64, window=64, page_size=32, tau=0.8,
                                   dense_layers="0")  # fmt: skip
    flags = serving.server_args("sync", a, ["--freekv-selection", "current"])
    assert flags[flags.index("--freekv-budget") + 1] == "2048"
