"""The real SGLang server on CPU, started the way a user starts it, with our plugin installed.

The session's shared dense server (``conftest.py``: the tiny model, ``--kv-offload none``,
which is also the default). Every request is greedy, so a repeated request must give the same
completion token for token.
"""

from __future__ import annotations

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture
def tiny_server(dense_server):
    return dense_server


def test_generate_is_well_formed_and_repeatable(tiny_server):
    prompt = "The river city garden remember the passkey number"
    first = tiny_server.generate(prompt, max_new_tokens=12)
    second = tiny_server.generate(prompt, max_new_tokens=12)
    assert first["meta_info"]["completion_tokens"] == 12
    assert first["meta_info"]["finish_reason"]["type"] == "length"
    assert len(first["output_ids"]) == 12
    assert first["text"].strip()
    assert first["output_ids"] == second["output_ids"]
    assert first["text"] == second["text"]


def test_batched_generate_matches_one_at_a_time(tiny_server):
    prompts = [f"Story {i}: the mountain letter window morning {i * 7}" for i in range(4)]
    r = requests.post(
        f"{tiny_server.base_url}/generate",
        json={"text": prompts, "sampling_params": {"temperature": 0, "max_new_tokens": 8}},
        timeout=600,
    )
    r.raise_for_status()
    batched = [item["output_ids"] for item in r.json()]
    alone = [tiny_server.generate(p, max_new_tokens=8)["output_ids"] for p in prompts]
    assert batched == alone


def test_openai_chat_on_tiny_model(tiny_server):
    first = tiny_server.chat("Tell me about the river.", max_tokens=10)
    second = tiny_server.chat("Tell me about the river.", max_tokens=10)
    choice = first["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert first["usage"]["completion_tokens"] == 10
    assert choice["message"]["content"] == second["choices"][0]["message"]["content"]
