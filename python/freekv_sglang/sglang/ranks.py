"""How the FreeKV runtimes of a tensor-parallel group agree.

Under ``--tp N`` every rank runs its own scheduler and its own FreeKV runtime over its own KV
heads (one host pool, one set of conversion threads, one set of budget regions per rank). The
schedulers must take the same decisions, or the ranks run different batches and hang in the
model's next collective. Each FreeKV decision is kept identical in one of two ways:

- **by construction**: computed only from values that are equal on every rank (the batch, the
  requests' lengths, the agreed memory plan, the order of earlier decisions). Admission and
  host headroom, taking and returning budget regions, holding a request dense, slot reclaim
  and the dense-layer store, and so SGLang's retraction, all work this way. What could differ
  between ranks (when a conversion thread finishes, so when a released row's parked host pages
  come free) is kept out of every one of them;
- **explicitly**: :func:`agree_plan` takes the element-wise minimum of the memory plan's
  sizes (defaults depend on each rank's free memory), and :func:`agree_failures` unions the
  requests whose offload or recall failed on any rank, so that a failure on one rank aborts
  the request on all of them.

Who calls what: :func:`agree_plan` from the memory-reservation hook (scheduler process, once,
at start-up); :func:`agree_failures` from the batch-result hook (scheduler thread, every batch
of every rank: a collective, so it must run on every rank of the group at every call site);
:func:`all_ranks` from the prefix cache's publication (release hook, every rank); :func:`gather`
from the internal-state hook (a ``/server_info`` request, which SGLang hands to every rank).
Both use the tensor-parallel group's CPU (gloo) process group, as SGLang's own scheduler-side
agreements do; with one rank they return their input and communicate nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "RankInfo",
    "agree_failures",
    "agree_plan",
    "all_ranks",
    "gather",
    "rank_info",
    "ranks_on_host",
]


@dataclass(frozen=True)
class RankInfo:
    """Where this scheduler sits: its tensor-parallel rank and group size, its data-parallel
    rank (0 without DP)."""

    tp_rank: int
    tp_size: int
    dp_rank: int

    def labels(self) -> dict[str, str]:
        """Prometheus labels, as SGLang labels its per-rank metrics."""
        return {"tp_rank": str(self.tp_rank), "dp_rank": str(self.dp_rank)}


def rank_info() -> RankInfo:
    """This process's ranks: the tensor-parallel rank and size from SGLang's TP group (one
    rank of one group before SGLang built its groups), the data-parallel replica from SGLang's
    published parallel context (each ``--dp`` replica has its own TP group, so the DP rank is
    read even where the replica has a single TP rank)."""
    group = _tp_group()
    tp_rank, tp_size = (0, 1) if group is None else (group.rank_in_group, group.world_size)
    return RankInfo(int(tp_rank), int(tp_size), _dp_rank())


def _dp_rank() -> int:
    """The data-parallel replica of this scheduler (0 without ``--dp``)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        dp = get_parallel().dp_rank
    except (ImportError, AttributeError, RuntimeError, ValueError):  # not published yet
        dp = None
    return int(dp or 0)


def ranks_on_host(server_args: Any) -> int:
    """Scheduler ranks that share this host: ``tp x dp x pp`` over ``--nnodes``."""
    world = 1
    for name in ("tp_size", "dp_size", "pp_size"):
        world *= int(getattr(server_args, name, 1) or 1)
    nodes = max(int(getattr(server_args, "nnodes", 1) or 1), 1)
    return max(world // nodes, 1)


def _tp_group() -> Any:
    """SGLang's tensor-parallel group coordinator, or None before it exists or with one rank."""
    try:
        from sglang.srt.distributed import parallel_state
    except ImportError:
        return None
    group = getattr(parallel_state, "_TP", None)
    if group is None or int(getattr(group, "world_size", 1)) <= 1:
        return None
    return group


def agree_plan(values: list[int]) -> list[int]:
    """The element-wise minimum of ``values`` over the tensor-parallel group (every rank must
    call it with the same number of values)."""
    group = _tp_group()
    if group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group.cpu_group)
    return [int(x) for x in t.tolist()]


def all_ranks(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank of the tensor-parallel group."""
    group = _tp_group()
    if group is None:
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group.cpu_group)
    return bool(int(t.item()))


def gather(value: Any) -> list[Any] | None:
    """``value`` of every rank of the tensor-parallel group, in rank order (None with one
    rank)."""
    group = _tp_group()
    if group is None:
        return None
    gathered: list[Any] = [None] * int(group.world_size)
    dist.all_gather_object(gathered, value, group=group.cpu_group)
    return gathered


def agree_failures(failures: dict[str, str]) -> dict[str, str]:
    """The failed requests of every rank of the tensor-parallel group (rid -> message, the
    lowest rank's message where several ranks failed the same request).

    One all-reduce of a flag per call; the failure records themselves travel only when some
    rank has one."""
    group = _tp_group()
    if group is None:
        return failures
    flag = torch.tensor([1 if failures else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group.cpu_group)
    if not int(flag.item()):
        return failures
    gathered: list[Any] = [None] * int(group.world_size)
    dist.all_gather_object(gathered, failures, group=group.cpu_group)
    merged: dict[str, str] = {}
    for rank, part in enumerate(gathered):
        for rid, message in (part or {}).items():
            merged.setdefault(
                rid, message if rank == 0 else f"{message} (tensor-parallel rank {rank})"
            )
    return merged
