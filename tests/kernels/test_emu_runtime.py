"""The SIMT emulation itself (``cuda/emu``): ``cuda/tests/emu_selftest.cpp`` built with the host
compiler must give a GPU's values for block reductions, warp exchanges, shared memory and
atomics, and end each launch a GPU would hang or misbehave on with an error naming the kernel,
the block and the thread."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA = Path(__file__).resolve().parents[2] / "cuda"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler (c++ or g++) on PATH")
    exe = tmp_path_factory.mktemp("emu") / "emu_selftest"
    subprocess.run(
        [cxx, "-std=c++20", "-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas",
         f"-I{CUDA / 'emu'}", f"-I{CUDA / 'include'}", str(CUDA / "tests" / "emu_selftest.cpp"),
         "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60)
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


@pytest.mark.parametrize("case", ["block_sum", "shuffle", "shared_count"])
def test_values_match_a_gpu(results: dict[str, str], case: str) -> None:
    assert results[case] == "ok", results[case]


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("divergent_barrier", "16 thread(s) wait at __syncthreads: a barrier not every thread"),
        ("early_exit", "5 thread(s) wait at __syncthreads"),
        ("partial_mask", "__shfl_xor_sync with mask 65535 leaves out live lanes"),
    ],
)
def test_errors_name_the_kernel_instead_of_hanging(
    results: dict[str, str], case: str, phrase: str
) -> None:
    msg = results[case]
    assert phrase in msg and f"kernel {case}_kernel, block (0, 0, 0)" in msg, msg
