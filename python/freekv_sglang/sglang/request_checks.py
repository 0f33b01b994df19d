"""Per-request checks the FreeKV server adds to SGLang's request validation.

SGLang 0.5.23 lets a few malformed requests through its HTTP-side validation, and each one
then kills the scheduler process, so one client takes the whole server down (the same with
``--kv-offload none``: these are SGLang's gaps, not FreeKV's):

- a prompt of 0 tokens (the model's forward fails on an empty extend);
- ``input_ids`` with a negative id or one at or above the vocabulary size (the embedding
  lookup raises an ``IndexError``);
- ``top_logprobs_num`` (``logprobs`` on ``/v1/completions``) above the vocabulary size, or
  negative, with ``return_logprob`` (``torch.topk`` out of range);
- ``logprob_start_len`` below -1.

:func:`check_request` refuses each with a ``ValueError`` naming the field, which SGLang's
HTTP server answers with a 400. It is called by :func:`validate_before`, a BEFORE hook on
``TokenizerManager._validate_one_request`` (a row of
:data:`freekv_sglang.sglang.lifecycle.HOOKS`), in the HTTP (tokenizer-manager) process, once
per request of a batch, with the request's token ids; only while FreeKV is on, so the plugin
changes nothing for ``--kv-offload none``. The logprob fields are checked on generation
requests (``GenerateReqInput``); embedding requests (``EmbeddingReqInput``) have none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sglang.srt.managers.io_struct import EmbeddingReqInput, GenerateReqInput

from freekv_sglang.settings import settings_from_env

__all__ = ["check_request", "validate_before"]


def _scalar(value: Any) -> Any:
    """A per-request field: SGLang splits batches before validation, but a one-element list
    may remain where a client sent one."""
    if isinstance(value, list | tuple) and len(value) == 1:
        return value[0]
    return value


def check_request(
    obj: GenerateReqInput | EmbeddingReqInput,
    input_ids: Sequence[int] | None,
    vocab_size: int | None,
) -> None:
    """Refuse a request the scheduler cannot survive; ``ValueError`` names the field.

    ``obj`` is one request (after SGLang's batch splitting), ``input_ids`` its prompt's token
    ids (None for embeddings input), ``vocab_size`` the model's (None: the id and top-k bounds
    are not checked)."""
    if input_ids is not None:
        if len(input_ids) == 0:
            raise ValueError("The input is empty (0 tokens); a request needs at least one token.")
        if vocab_size is not None:
            low, high = min(input_ids), max(input_ids)
            if low < 0 or high >= vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"input_ids: token id {bad} is outside the vocabulary; valid ids are 0 to "
                    f"{vocab_size - 1}"
                )
    if not isinstance(obj, GenerateReqInput):
        return
    start = _scalar(obj.logprob_start_len)
    if isinstance(start, int) and start < -1:
        raise ValueError(
            f"logprob_start_len: {start} is not valid; use -1 (no prompt logprobs) or a "
            "position >= 0"
        )
    if not _scalar(obj.return_logprob):
        return
    top = _scalar(obj.top_logprobs_num)
    if isinstance(top, int) and (top < 0 or (vocab_size is not None and top > vocab_size)):
        most = "" if vocab_size is None else f" and at most the vocabulary size, {vocab_size}"
        raise ValueError(
            f"top_logprobs_num (logprobs): {top} is not valid; it must be at least 0{most}"
        )


def validate_before(*args: Any, **kwargs: Any) -> None:
    """BEFORE hook on ``TokenizerManager._validate_one_request(obj, input_ids)`` (HTTP
    process, per request). Registered always (the launcher loads plugins before it parses
    ``--kv-offload``), it reads the setting at call time and does nothing with ``none``."""
    if not settings_from_env().enabled:
        return None
    manager = kwargs.get("self", args[0] if args else None)
    obj = kwargs.get("obj", args[1] if len(args) > 1 else None)
    input_ids = kwargs.get("input_ids", args[2] if len(args) > 2 else None)
    vocab = getattr(getattr(manager, "model_config", None), "vocab_size", None)
    check_request(obj, input_ids, vocab if isinstance(vocab, int) else None)
    return None
