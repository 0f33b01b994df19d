"""The one loader of the ``freekv_ops`` CUDA extension (``cuda/csrc`` + ``cuda/include``).

`load_extension()` builds the extension and caches the build on disk (keyed by the hash of
every source file, the torch version, its CUDA version and the target architectures) and in
memory (``functools.cache``): later calls in the process return the same module, later
processes reuse the shared object. It returns ``None`` when CUDA is absent or the build fails
(the reason is kept in `load_error()`). A server builds it at start-up (`require_kernels()`,
called by the adapter before the first request): a failed build stops the start-up with the
compiler's message. There is no silent fallback: an op on CUDA tensors whose kernels are
unavailable raises, unless ``FREEKV_OPS=reference`` chose the pure-torch references.

Build route: ``torch.utils.cpp_extension.load`` when ninja is available; otherwise (a bare GPU
host with only Python, torch and nvcc) the same flags are passed to nvcc directly, one process
per source file in parallel, and the shared object is imported from the cache directory.

Who calls it: the op wrappers in this package, on whatever thread first needs a kernel; the
build runs under the import lock of that first call only (``functools.cache`` is thread-safe
for the result, a concurrent first call may build twice into the same directory, which the
content-keyed directory makes harmless).

The emulated build (`load_emulated_extension()`): the same sources compiled by the host C++
compiler with ``-DFREEKV_EMULATED`` against ``cuda/emu`` (a SIMT runtime that runs each CUDA
thread of a block as a fiber on the CPU), as a CPU torch extension with the same functions.
Ops use it for CPU tensors when ``FREEKV_OPS=emulated``: every launcher's argument checks and
every kernel then run on the CPU, in tests and CI. ``FREEKV_OPS`` picks the implementation:
``auto`` (default: the CUDA extension for CUDA tensors, the references otherwise),
``emulated`` (the emulated extension for CPU tensors; a build failure is an error, not a
fallback) or ``reference`` (the pure-torch references everywhere).

Environment: ``FREEKV_CUDA_DIR`` (the CUDA source tree; default: ``freekv_sglang/cuda``, shipped
in the wheel),
``FREEKV_CACHE_DIR`` (build cache root), ``FREEKV_BUILD_VERBOSE=1``, ``TORCH_CUDA_ARCH_LIST``
(default: the visible device's capability), ``FREEKV_OPS``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "OPS_MODES",
    "cuda_dir",
    "extension_for",
    "load_emulated_extension",
    "load_error",
    "load_extension",
    "ops_mode",
    "require_kernels",
]

#: Values of ``FREEKV_OPS``.
OPS_MODES = ("auto", "emulated", "reference")

_log = logging.getLogger(__name__)
_NAME = "freekv_ops"
_error: list[str] = []
#: How the CUDA extension was obtained in this process: ``{"cached": bool, "seconds": float}``.
_built: dict[str, float | bool] = {}


def cuda_dir() -> Path:
    """The CUDA source tree: ``FREEKV_CUDA_DIR``, else the package's own ``cuda/`` (package
    data of the wheel and the sdist; the checkout's top-level ``cuda`` links to it)."""
    env = os.environ.get("FREEKV_CUDA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "cuda"


def _sources(root: Path) -> list[Path]:
    return sorted((root / "csrc").glob("*.cu"))


def _arch_list() -> list[str]:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return [a.strip() for a in env.replace(";", " ").split() if a.strip()]
    major, minor = torch.cuda.get_device_capability()
    return [f"{major}.{minor}"]


def _gencode(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        num = a.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def _sources_hash(root: Path, tail: str) -> str:
    """Hash of every source file under ``root`` (paths and bytes) and ``tail``."""
    h = hashlib.sha256()
    for f in sorted([*root.rglob("*.cu"), *root.rglob("*.cuh"), *root.rglob("*.h")]):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    h.update(tail.encode())
    return h.hexdigest()[:16]


def _build_key(root: Path, archs: list[str]) -> str:
    return _sources_hash(root, f"{torch.__version__}|{torch.version.cuda}|{','.join(archs)}")


def _cache_root() -> Path:
    base = os.environ.get("FREEKV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "freekv-sglang"
    )
    return Path(base) / "torch-ext"


_CUDA_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
# What torch's builder adds to every CUDA file; the direct nvcc route adds the same.
_TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def _build_with_torch(root: Path, build_dir: Path, archs: list[str], verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(archs))
    return load(
        name=_NAME,
        sources=[str(s) for s in _sources(root)],
        extra_include_paths=[str(root / "include")],
        extra_cflags=["-O3", "-std=c++20"],
        extra_cuda_cflags=_CUDA_FLAGS,
        build_directory=str(build_dir),
        verbose=verbose,
    )


def _libcudart() -> str:
    """The shared CUDA runtime torch loads (linked by path, so that one runtime instance serves
    torch and the extension even where only ``libcudart.so.<major>`` exists, as in the
    ``nvidia-cuda-runtime`` wheels)."""
    from torch.utils import cpp_extension as ce

    site = Path(torch.__file__).resolve().parent.parent / "nvidia"
    try:
        dirs = [*map(Path, ce.library_paths("cuda"))]
    except OSError:  # CUDA_HOME unknown: the wheels' runtime is the one torch loads anyway
        dirs = []
    dirs += sorted(site.glob("*/lib"))
    for d in dirs:
        found = sorted(d.glob("libcudart.so*"))
        if found:
            return str(found[0])
    raise RuntimeError(f"no shared libcudart in {[str(d) for d in dirs]}")


def _build_with_nvcc(root: Path, build_dir: Path, archs: list[str], verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension as ce

    so = build_dir / f"{_NAME}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if not so.exists():
        cuda_home = ce.CUDA_HOME or os.environ.get("CUDA_HOME")
        nvcc = shutil.which("nvcc") or (cuda_home and os.path.join(cuda_home, "bin", "nvcc"))
        if not nvcc or not os.path.exists(nvcc):
            raise RuntimeError("nvcc not found (put it on PATH or set CUDA_HOME)")
        includes = [*ce.include_paths("cuda"), sysconfig.get_paths()["include"]]
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        common = [
            *_CUDA_FLAGS,
            *_TORCH_NVCC_DEFINES,
            *_gencode(archs),
            f"-I{root / 'include'}",
            *[arg for p in includes for arg in ("-isystem", p)],
            # CUDA library headers that ship in torch's nvidia-* wheels, searched last.
            *[
                f"-Xcompiler=-idirafter,{d}"
                for d in sorted(
                    (Path(torch.__file__).resolve().parent.parent / "nvidia").glob("*/include")
                )
            ],
            "-Xcompiler=-fPIC",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-DTORCH_EXTENSION_NAME={_NAME}",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
        ]

        def compile_one(src: Path) -> Path:
            # The directory is keyed by the sources' hash: an object in it is current. Objects
            # are renamed into place, so an interrupted build leaves none half-written.
            obj = build_dir / (src.stem + ".o")
            if obj.exists():
                return obj
            tmp_obj = obj.with_suffix(".tmp.o")
            cmd = [nvcc, *common, "-c", str(src), "-o", str(tmp_obj)]
            if verbose:
                _log.warning("%s", " ".join(cmd))
            subprocess.run(cmd, check=True, capture_output=not verbose)
            tmp_obj.replace(obj)
            return obj

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            objs = list(pool.map(compile_one, _sources(root)))
        libs = [f"-L{p}" for p in ce.library_paths("cuda")]
        tmp = so.with_suffix(".tmp.so")
        cmd = [
            nvcc,
            "-shared",
            *map(str, objs),
            *libs,
            *[f"-Xlinker=-rpath,{p}" for p in ce.library_paths("cuda")],
            "-lc10",
            "-lc10_cuda",
            "-ltorch",
            "-ltorch_cpu",
            "-ltorch_cuda",
            "-ltorch_python",
            "--cudart=none",
            f"-Xlinker={_libcudart()}",
            "-o",
            str(tmp),
        ]
        subprocess.run(cmd, check=True, capture_output=not verbose)
        tmp.replace(so)
    spec = importlib.util.spec_from_file_location(_NAME, so)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {so}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def load_extension() -> ModuleType | None:
    """The compiled ops module, or ``None`` when CUDA or the build is unavailable."""
    if not torch.cuda.is_available():
        _error.append("torch.cuda.is_available() is False")
        return None
    root = cuda_dir()
    if not _sources(root):
        _error.append(f"no CUDA sources under {root}")
        _log.error("freekv ops: %s", _error[-1])
        return None
    archs = _arch_list()
    build_dir = _cache_root() / f"{_NAME}-{_build_key(root, archs)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    verbose = os.environ.get("FREEKV_BUILD_VERBOSE") == "1"
    cached = any(build_dir.glob(f"{_NAME}*.so"))
    t0 = time.perf_counter()
    try:
        from torch.utils.cpp_extension import is_ninja_available

        if is_ninja_available():
            mod = _build_with_torch(root, build_dir, archs, verbose)
        else:
            mod = _build_with_nvcc(root, build_dir, archs, verbose)
        _built.update(cached=cached, seconds=time.perf_counter() - t0)
        return mod
    except Exception as e:  # the build's own output names the cause
        detail = getattr(e, "stderr", None)
        msg = f"{type(e).__name__}: {e}" + (
            f"\n{detail.decode(errors='replace')}" if detail else ""
        )
        _error.append(msg)
        _log.error("freekv ops: CUDA build failed: %s", msg)
        return None


#: Sanitizer flags of the emulated build with ``FREEKV_EMU_SANITIZE=1`` (AddressSanitizer and
#: UndefinedBehaviorSanitizer; the process must preload the compiler's libasan, see
#: ``scripts/emu_sanitize.sh``).
_SANITIZE_FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-fno-omit-frame-pointer",
    "-g",
]


def _sanitized() -> bool:
    return os.environ.get("FREEKV_EMU_SANITIZE") == "1"


def _build_key_emulated(root: Path) -> str:
    # The build's wrapper files include the sources by absolute path: one entry per checkout.
    return _sources_hash(root, f"{torch.__version__}|emulated|{_sanitized()}|{root.resolve()}")


_EMU_FLAGS = ["-O2", "-std=c++20", "-DFREEKV_EMULATED", "-Wall", "-Wno-unknown-pragmas"]


@functools.cache
def load_emulated_extension() -> ModuleType:
    """The ops compiled for the CPU over the SIMT emulation (``cuda/emu``); raises if the
    build fails (an explicit choice has no fallback). Cached like the CUDA build."""
    from torch.utils.cpp_extension import load

    root = cuda_dir()
    sources = _sources(root)
    if not sources:
        raise RuntimeError(f"no CUDA sources under {root}")
    build_dir = _cache_root() / f"{_NAME}_emu-{_build_key_emulated(root)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # The host compiler reads C++ sources: one file per launcher source, including it.
    wrappers = []
    for src in sources:
        w = build_dir / f"{src.stem}_emu.cpp"
        text = f'#include "{src.resolve()}"\n'
        if not w.exists() or w.read_text() != text:
            w.write_text(text)
        wrappers.append(str(w))
    sanitize = _SANITIZE_FLAGS if _sanitized() else []
    return load(
        name=f"{_NAME}_emu",
        sources=wrappers,
        extra_include_paths=[str(root / "emu"), str(root / "include"), str(root / "csrc")],
        extra_cflags=[*_EMU_FLAGS, *sanitize],
        extra_ldflags=sanitize,
        build_directory=str(build_dir),
        verbose=os.environ.get("FREEKV_BUILD_VERBOSE") == "1",
    )


def ops_mode() -> str:
    """``FREEKV_OPS`` (see the module docstring); a value outside :data:`OPS_MODES` raises."""
    mode = os.environ.get("FREEKV_OPS", "auto").strip() or "auto"
    if mode not in OPS_MODES:
        raise ValueError(f"FREEKV_OPS={mode!r}: expected one of {', '.join(OPS_MODES)}")
    return mode


def load_error() -> str | None:
    """Why `load_extension()` returned ``None`` (``None`` if it has not failed)."""
    return _error[-1] if _error else None


def require_kernels(device: torch.device) -> str:
    """Make the kernels the ops will use on ``device`` ready now (a server calls this while it
    starts); returns one line saying which, and how they were obtained. Raises
    ``RuntimeError`` with the build's message when CUDA kernels are needed and unavailable."""
    mode = ops_mode()
    if mode == "reference":
        return "pure-torch references (FREEKV_OPS=reference)"
    if device.type != "cuda":
        if mode == "emulated":
            load_emulated_extension()
            return "kernels compiled for the CPU (FREEKV_OPS=emulated)"
        return "pure-torch references (no CUDA device)"
    if load_extension() is None:
        raise RuntimeError(
            f"the FreeKV CUDA kernels are unavailable: {load_error()}\n(FREEKV_OPS=reference "
            "serves with the pure-torch references instead: correct, but they sync with the host)"
        )
    how = "loaded from the build cache" if _built.get("cached") else "built"
    return f"CUDA kernels {how} in {float(_built.get('seconds', 0.0)):.1f} s"


def extension_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The compiled ops for these tensors, or ``None`` for the pure-torch reference: the CUDA
    extension when every tensor is on a CUDA device (``RuntimeError`` if it is unavailable:
    no silent fallback); with ``FREEKV_OPS=emulated`` the emulated extension when every tensor
    is on the CPU; nothing with ``reference``."""
    mode = ops_mode()
    if not tensors or mode == "reference":
        return None
    if mode == "emulated" and all(t.device.type == "cpu" for t in tensors):
        return load_emulated_extension()
    if not all(t.is_cuda for t in tensors):
        return None
    ext = load_extension()
    if ext is None:
        raise RuntimeError(
            f"the FreeKV CUDA kernels are unavailable ({load_error()}); set FREEKV_OPS=reference "
            "to use the pure-torch references"
        )
    return ext
