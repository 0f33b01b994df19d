"""Which SGLang versions the adapter's hooks were written against.

Every hook and patch in this package targets the internals of one SGLang release: a target may
move or change its signature in another. :func:`sglang_version_supported` is the guard each
registration consults; a mismatch means "attach nothing and say why", never a half-patched engine.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

logger = logging.getLogger(__name__)

#: SGLang releases whose internals the hooks were read from and tested against.
SUPPORTED_SGLANG_VERSIONS: frozenset[str] = frozenset({"0.5.23"})


def installed_sglang_version() -> str | None:
    """The installed ``sglang`` distribution's version, or ``None`` when it is absent."""
    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def sglang_version_supported(installed: str | None = None) -> bool:
    """Whether the hooks may attach to ``installed`` (default: the installed SGLang)."""
    installed = installed if installed is not None else installed_sglang_version()
    return installed in SUPPORTED_SGLANG_VERSIONS


def unsupported_version_message(installed: str | None) -> str:
    supported = ", ".join(sorted(SUPPORTED_SGLANG_VERSIONS))
    return (
        f"freekv-sglang supports sglang {supported}; found {installed or 'no sglang'}. "
        "Install a supported sglang (pip install 'freekv-sglang[sglang]')."
    )
