"""The request checks the FreeKV server adds to SGLang's validation, case by case: each
refusal names the field and what is allowed; everything SGLang serves safely passes."""

from __future__ import annotations

import pytest

pytest.importorskip("sglang", reason="the checks read SGLang's request types")

from sglang.srt.managers.io_struct import EmbeddingReqInput, GenerateReqInput

from freekv_sglang.sglang.request_checks import check_request

VOCAB = 2048


def req(**fields: object) -> GenerateReqInput:
    """One generation request after SGLang's batch splitting (fields as a client sends them)."""
    base: dict[str, object] = {
        "return_logprob": False,
        "top_logprobs_num": 0,
        "logprob_start_len": -1,
    }
    return GenerateReqInput(**{**base, **fields})  # type: ignore[arg-type]


REFUSED = {
    "empty prompt": (req(), [], "The input is empty"),
    "id at the vocabulary size": (req(), [5, VOCAB, 7], f"token id {VOCAB} is outside"),
    "negative id": (req(), [5, -3, 7], "token id -3 is outside the vocabulary; valid ids are 0"),
    "top logprobs above the vocabulary": (
        req(return_logprob=True, top_logprobs_num=1_000_000),
        [5],
        f"top_logprobs_num (logprobs): 1000000 is not valid; it must be at least 0 and at most "
        f"the vocabulary size, {VOCAB}",
    ),
    "negative top logprobs": (
        req(return_logprob=True, top_logprobs_num=-1),
        [5],
        "top_logprobs_num (logprobs): -1",
    ),
    "logprob_start_len -2": (req(logprob_start_len=-2), [5], "logprob_start_len: -2"),
    "logprob_start_len as a one-element list": (
        req(logprob_start_len=[-7]),
        [5],
        "logprob_start_len: -7",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_requests_name_the_field(case: str) -> None:
    obj, ids, phrase = REFUSED[case]
    with pytest.raises(ValueError) as info:
        check_request(obj, ids, VOCAB)
    assert phrase in str(info.value), str(info.value)


ACCEPTED = {
    "plain prompt": (req(), [0, 5, VOCAB - 1]),
    "all top logprobs": (req(return_logprob=True, top_logprobs_num=VOCAB), [5]),
    "large top logprobs without logprobs": (req(top_logprobs_num=1_000_000), [5]),
    "prompt logprobs from position 0": (req(return_logprob=True, logprob_start_len=0), [5]),
    "embeddings input (no token ids)": (req(), None),
    "fields unset, as SGLang's defaults": (GenerateReqInput(), [5]),
    "embedding request (no logprob fields)": (EmbeddingReqInput(), [5, 7]),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_requests_pass(case: str) -> None:
    obj, ids = ACCEPTED[case]
    check_request(obj, ids, VOCAB)


def test_embedding_requests_get_the_token_checks() -> None:
    with pytest.raises(ValueError, match="token id 2048 is outside"):
        check_request(EmbeddingReqInput(), [1, VOCAB], VOCAB)
    with pytest.raises(ValueError, match="The input is empty"):
        check_request(EmbeddingReqInput(), [], VOCAB)


def test_without_a_vocabulary_size_only_the_bounds_that_need_none_are_checked() -> None:
    check_request(req(return_logprob=True, top_logprobs_num=10**6), [10**9], None)
    with pytest.raises(ValueError, match="logprob_start_len"):
        check_request(req(logprob_start_len=-5), [1], None)
