"""The CUDA sources ship with the package: the wheel and the sdist hold every file the kernel
build reads, where the loader looks for them when no checkout is around."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from freekv_sglang.ops._load import cuda_dir

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _cuda_files() -> list[str]:
    root = cuda_dir()
    assert root.resolve() == (ROOT / "python" / "freekv_sglang" / "cuda").resolve()
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    assert any(f.startswith("csrc/") and f.endswith(".cu") for f in files)
    assert any(f.startswith("include/freekv/") and f.endswith(".cuh") for f in files)
    return sorted(files)


@pytest.mark.skipif(shutil.which("maturin") is None, reason="building the packages needs maturin")
@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_the_packages_hold_every_cuda_source(kind: str, tmp_path: Path) -> None:
    cmd = ["maturin", "build", "--release"] if kind == "wheel" else ["maturin", "sdist"]
    subprocess.run([*cmd, "-o", str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    if kind == "wheel":
        (pkg,) = tmp_path.glob("*.whl")
        names = set(zipfile.ZipFile(pkg).namelist())
        prefix = "freekv_sglang/cuda/"
    else:
        (pkg,) = tmp_path.glob("*.tar.gz")
        with tarfile.open(pkg) as tar:
            names = set(tar.getnames())
        prefix = f"{pkg.name.removesuffix('.tar.gz')}/python/freekv_sglang/cuda/"
    missing = [f for f in _cuda_files() if prefix + f not in names]
    assert not missing, f"{kind} lacks {missing}"
