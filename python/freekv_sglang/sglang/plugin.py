"""Entry point of the ``sglang.srt.plugins`` group: what SGLang runs when it loads plugins.

``sglang.srt.plugins.load_plugins()`` calls :func:`register` once per process: in the launcher
before argument parsing, in ``sglang.Engine``, and again in every spawned scheduler subprocess.
``register`` only *registers* hooks with SGLang's ``HookRegistry``; SGLang applies them right
after all plugins ran. It must therefore be cheap, idempotent and free of side effects beyond
registration, and it registers nothing when the installed SGLang is not a version the hooks were
written for (see :mod:`freekv_sglang.sglang.compat`).
"""

from __future__ import annotations

import logging

from freekv_sglang.sglang import compat

logger = logging.getLogger(__name__)

_registered: list[str] = []


def register() -> None:
    """Register every FreeKV hook with SGLang (idempotent within a process)."""
    if _registered:
        return
    installed = compat.installed_sglang_version()
    if not compat.sglang_version_supported(installed):
        logger.warning(
            "%s; FreeKV hooks not registered", compat.unsupported_version_message(installed)
        )
        return

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from freekv_sglang.sglang import cpu_support, lifecycle

    _registered.extend(cpu_support.register(HookRegistry, HookType))
    _registered.extend(lifecycle.register(HookRegistry, HookType))


def verify_hooks() -> None:
    """Refuse to start FreeKV unless every hook registered in this process attached.

    SGLang's ``HookRegistry`` only logs a hook that fails to attach; FreeKV with a missing hook
    would serve wrong results or leak host pages, so the adapter calls this at start-up.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry

    from freekv_sglang.sglang.args import FreeKVStartupError

    if not _registered:
        raise FreeKVStartupError(
            "--kv-offload freekv: the freekv_sglang plugin did not register (is the installed "
            "sglang supported? see the log)"
        )
    missing = sorted(set(_registered) - set(HookRegistry._patched))
    if missing:
        raise FreeKVStartupError(
            f"--kv-offload freekv: SGLang hooks failed to attach: {', '.join(missing)}"
        )


def registered_targets() -> tuple[str, ...]:
    """The hook targets :func:`register` registered in this process."""
    return tuple(_registered)
