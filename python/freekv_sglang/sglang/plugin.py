"""Entry point of the ``sglang.srt.plugins`` group: what SGLang runs when it loads plugins.

``sglang.srt.plugins.load_plugins()`` calls :func:`register` once per process: in the launcher
before argument parsing, in ``sglang.Engine``, and again in every spawned scheduler subprocess.
``register`` only *registers* hooks with SGLang's ``HookRegistry`` (the rows of
:data:`freekv_sglang.sglang.lifecycle.HOOKS` that apply to the process); SGLang applies them
right after all plugins ran. It must therefore be cheap, idempotent and free of side effects
beyond registration.

Every hook targets the internals of one SGLang release: a target may move or change its
signature in another. :func:`register` therefore registers nothing, and says why, when the
installed SGLang is not a version the hooks were written for
(:data:`SUPPORTED_SGLANG_VERSIONS`), never a half-patched engine; the rest of the adapter is
imported only after that check.
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


def register() -> None:
    """Register every FreeKV hook with SGLang (idempotent within a process)."""
    installed = installed_sglang_version()
    if not sglang_version_supported(installed):
        logger.warning("%s; FreeKV hooks not registered", unsupported_version_message(installed))
        return

    from sglang.srt.plugins.hook_registry import HookRegistry

    from freekv_sglang.sglang import hooks, lifecycle

    if hooks.registered_targets():
        return
    hooks.record(lifecycle.register(HookRegistry))
