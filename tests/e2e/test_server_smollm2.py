"""The real SGLang server on CPU, started the way a user starts it, with our plugin installed.

The real SmolLM2-135M-Instruct, one server for the whole module (a start costs about a
minute on two cores). Every request is greedy, so a repeated request must give the same completion token for token.
"""

from __future__ import annotations

import pytest

from freekv_sglang.testing.models import smollm2_path
from freekv_sglang.testing.server import launch_server

# A server start is part of the first test's time; on two loaded cores it can take minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def smollm2_server():
    with launch_server(smollm2_path(), max_total_tokens=8192) as server:
        yield server
    assert server.leftovers == [], f"processes left after shutdown: {server.leftovers}"


def test_smollm2_answers_a_real_question(smollm2_server):
    body = smollm2_server.chat("What is the capital of France?", max_tokens=24)
    answer = body["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
    again = smollm2_server.chat("What is the capital of France?", max_tokens=24)
    assert again["choices"][0]["message"]["content"] == answer


def test_smollm2_generate_endpoint(smollm2_server):
    out = smollm2_server.generate("The capital of France is", max_new_tokens=6)
    assert out["meta_info"]["prompt_tokens"] > 0
    assert "Paris" in out["text"], out["text"]
