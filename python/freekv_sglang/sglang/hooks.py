"""What a hook table row is, how rows attach to SGLang, and the check that they did.

The adapter's table of every SGLang hook is
:data:`freekv_sglang.sglang.lifecycle.HOOKS`; each row is a :class:`Hook`: the target (a
dotted path for SGLang's ``HookRegistry``, or the name of an argument-resolution step), the
kind of hook, the function, and :class:`When` it attaches.

Who calls what:

- :func:`freekv_sglang.sglang.plugin.register` (once per process, from SGLang's
  ``load_plugins()``, single-threaded) gets the rows that apply to this process from
  ``lifecycle.register``, which calls :func:`attach`, and keeps them with :func:`record`.
  SGLang applies the ``HookRegistry`` hooks right after all plugins ran, and logs a hook that
  fails to attach instead of raising;
- :func:`verify_hooks` (start-up, on the thread that resolves the server arguments and on the
  scheduler thread that builds the attention backend) refuses to start FreeKV unless every
  recorded row attached: FreeKV with a missing hook would serve wrong results or leak host pages.

This is the lowest module of the adapter: it imports none of the others.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sglang.srt.arg_groups import resolution_hooks
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from freekv_sglang.settings import FreeKVStartupError


class Kind(Enum):
    """How a hook wraps its target: SGLang's hook types, or an argument-resolution step."""

    BEFORE = HookType.BEFORE.value
    AFTER = HookType.AFTER.value
    AROUND = HookType.AROUND.value
    #: ``fn(server_args, previous)`` wrapping the resolution step named by the target
    #: (``sglang.srt.arg_groups.resolution_hooks``).
    RESOLUTION = "resolution"


class When(Enum):
    """In which processes a hook attaches (decided once, when the plugin registers)."""

    #: Always: start-up hooks, and hooks that read ``--kv-offload`` when called (the launcher
    #: loads plugins before it parses the flag).
    ALWAYS = "always"
    #: Only with ``FREEKV_KV_OFFLOAD=freekv`` in the environment: the per-step hooks, so that
    #: ``--kv-offload none`` runs no FreeKV code per step.
    FREEKV = "with --kv-offload freekv"
    #: Only on a host where SGLang's rotary layer would need a compiled kernel it lacks
    #: (:func:`freekv_sglang.sglang.cpu_support.needs_rotary_fallback`).
    ROTARY_FALLBACK = "without CUDA and vLLM"
    #: Only on a host without CUDA (:func:`freekv_sglang.sglang.cpu_support.needs_gloo_tp_groups`).
    NO_CUDA = "without CUDA"


@dataclass(frozen=True)
class Hook:
    """One row of the hook table."""

    target: str
    kind: Kind
    function: Callable[..., Any]
    when: When


#: The rows :func:`freekv_sglang.sglang.plugin.register` attached in this process.
_registered: list[Hook] = []


def attach(
    table: Iterable[Hook], active: Collection[When], registry: Any = HookRegistry
) -> list[Hook]:
    """Register every row of ``table`` whose ``when`` is in ``active``; returns those rows.

    ``HookRegistry`` rows go to ``registry``; resolution rows to SGLang's resolution-step
    list, once per process (that list is global and outlives a plugin reload)."""
    rows = [hook for hook in table if hook.when in active]
    for hook in rows:
        if hook.kind is Kind.RESOLUTION:
            if not _resolution_attached(hook):
                resolution_hooks.register_resolution_hook(hook.target)(hook.function)
        else:
            registry.register(hook.target, hook.function, HookType(hook.kind.value))
    return rows


def record(rows: Iterable[Hook]) -> None:
    """Keep ``rows`` as this process's registered hooks (for :func:`verify_hooks`)."""
    _registered.extend(rows)


def registered_hooks() -> tuple[Hook, ...]:
    """The hooks registered in this process."""
    return tuple(_registered)


def registered_targets() -> tuple[str, ...]:
    """The targets of the hooks registered in this process."""
    return tuple(hook.target for hook in _registered)


def _resolution_attached(hook: Hook) -> bool:
    return hook.function in resolution_hooks._HOOKS.get(hook.target, ())


def attached(hook: Hook) -> bool:
    """Whether SGLang applied ``hook``: its target patched, or its resolution step wrapped."""
    if hook.kind is Kind.RESOLUTION:
        return _resolution_attached(hook)
    return hook.target in HookRegistry._patched


def verify_hooks() -> None:
    """Refuse to start FreeKV unless every hook registered in this process attached."""
    if not _registered:
        raise FreeKVStartupError(
            "--kv-offload freekv: the freekv_sglang plugin did not register (is the installed "
            "sglang supported? see the log)"
        )
    missing = sorted({hook.target for hook in _registered if not attached(hook)})
    if missing:
        raise FreeKVStartupError(
            f"--kv-offload freekv: SGLang hooks failed to attach: {', '.join(missing)}"
        )
