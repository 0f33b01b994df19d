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
        [64, 1024], [None, 0.9], page_size=16, sink=16, window=16, dense_layers=(0,)
    )
    res = bench_accuracy.run(model, tok, cases, variants, gen, batch=2, log=lambda *_: None)
    rows = {r["variant"]: r for r in res["variants"]}
    dense = rows["dense"]
    assert dense["token_agreement"] == 1.0 and dense["mass_recall"] is None
    tokens = {}
    for c in cases:
        text = dense["outputs"][c.case_id]
        tokens[c.case_id] = tok(text, add_special_tokens=False)["input_ids"]
    # The harness's dense path (ragged batch of 2, own caches) is transformers' greedy decode.
    for name in ("dense", "freekv-b1024-tauoff", "freekv-b1024-tau0.9", "quest-b1024"):
        for c in cases:
            assert rows[name]["outputs"][c.case_id] == tok.decode(
                ref[c.case_id], skip_special_tokens=True
            ), (name, c.case_id)
    assert rows["sink+window-b1024"]["token_agreement"] == 1.0  # 1024 covers every prompt
    small = rows["freekv-b64-tau0.9"]
    assert 0.0 < small["mass_recall"] < 1.0
    assert small["rel_err"] > 0.0
    assert 0.0 <= small["correction_rate"] <= 1.0
    assert 0.0 < small["page_miss_rate"] <= 1.0
    assert rows["freekv-b64-tauoff"]["correction_rate"] == 0.0
    sw = rows["sink+window-b64"]
    assert sw["mass_recall"] < small["mass_recall"]
    report = {
        "model": "tiny",
        "command": "test",
        "host": "test",
        "size": {
            "full": False,
            "num_cases": 3,
            "min_tokens": 1,
            "max_tokens": 2,
            "kinds": "x",
            "gen_tokens": gen,
        },
        "settings": {"page_size": 16, "sink_tokens": 16, "window_tokens": 16, "dense_layers": [0]},
        "wall_seconds": 1.0,
        **res,
    }
    md = bench_accuracy.markdown(report)
    assert md.count("\n| ") == len(variants) + 1
