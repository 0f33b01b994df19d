"""Servers shared by the end-to-end modules.

A CPU server start costs one to two minutes of this host's two cores (three processes each
import SGLang), so the two configurations most modules need are started once per session, side
by side, on first use, and stopped at the end:

- ``dense_server``: the tiny model with ``--kv-offload none``;
- ``freekv_server``: the same with ``--kv-offload freekv`` at a 128-token budget
  (``testing.server.FREEKV_SERVER_ARGS``: 32 sink + 4 selected pages of 16 + 32 window, no
  dense layer) and the prefix cache on (the default), so prompts of a few dozen tokens fit the
  budget and ~1K-token prompts take the sparse path.

Both have 16384 device tokens and the model's 8K context. Every server and engine of these
modules runs with ``FREEKV_VERIFY_PAGES=1`` (:mod:`freekv_sglang.integrity`): a prefix-cache
page that does not hold what was offloaded into it is refused and counted in
``page_check_failures_total``, which the prefix-cache tests require to stay 0. Modules that need another
configuration (a small pool, fault injection, retraction mode) start their own. A test on a
shared server must not assume it is the first to use it: idle checks compare the host pool
with the prefix cache, and log checks read only what was logged during the test
(``ServerHandle.log_mark``/``log_since``). The servers live outside pytest's process tree, so
an ``sglang.Engine`` shut down by a test does not take them with it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from freekv_sglang.integrity import ENV_VAR
from freekv_sglang.testing.models import tiny_llama_path
from freekv_sglang.testing.server import (
    FREEKV_SERVER_ARGS,
    ServerHandle,
    launch_server,
    launch_servers,
)

SHARED_MAX_TOTAL_TOKENS = 16384


@pytest.fixture(scope="session", autouse=True)
def _verify_pages() -> Iterator[None]:
    """Page checks on for every server (they inherit the environment) and engine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, "1")
        yield


@pytest.fixture(scope="session")
def shared_servers() -> Iterator[dict[str, ServerHandle]]:
    pytest.importorskip("sglang", reason="end-to-end tests need sglang")
    managers = {
        "dense": launch_server(
            tiny_llama_path(),
            "--kv-offload",
            "none",
            max_total_tokens=SHARED_MAX_TOTAL_TOKENS,
            startup_timeout_s=1800,
        ),
        "freekv": launch_server(
            tiny_llama_path(),
            *FREEKV_SERVER_ARGS,
            max_total_tokens=SHARED_MAX_TOTAL_TOKENS,
            startup_timeout_s=1800,
        ),
    }
    with launch_servers(managers) as handles:
        yield handles
    for name, handle in handles.items():
        assert handle.leftovers == [], f"{name}: processes left after shutdown"


@pytest.fixture(scope="session")
def dense_server(shared_servers: dict[str, ServerHandle]) -> ServerHandle:
    return shared_servers["dense"]


@pytest.fixture(scope="session")
def freekv_server(shared_servers: dict[str, ServerHandle]) -> ServerHandle:
    return shared_servers["freekv"]
