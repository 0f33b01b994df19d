"""FreeKV figures as a log line and as Prometheus gauges.

Called by the SGLang adapter's ``report_decode_stats`` hook
(:func:`freekv_sglang.sglang.lifecycle.decode_stats_after`) on the scheduler thread, at
SGLang's decode-log interval. :func:`format_line` renders the runtime's
:meth:`~freekv_sglang.runtime.FreeKVRuntime.stats`; :func:`export` sets one gauge per
figure when ``prometheus_client`` is importable and ``PROMETHEUS_MULTIPROC_DIR`` is set (SGLang
sets it with ``--enable-metrics``, and gauges written by the scheduler process show up on the
server's ``/metrics``). The gauges are created on first use and only read by Prometheus'
collector, so no lock is needed. Nothing here imports SGLang.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

#: Figures exported as gauges ``sglang:freekv_<name>``.
GAUGES: tuple[str, ...] = (
    "correction_rate",
    "pages_recalled",
    "bytes_recalled",
    "resident_hit_rate",
    "host_pages_used",
    "host_pool_usage",
    "rows",
    "device_tokens_in_use",
    "device_tokens_reclaimed",
    "prefix_cache_pages",
    "prefix_hit_tokens_total",
    "prefix_pages_evicted_total",
    "held_dense_steps_total",
    "reclaims_blocked_total",
    "offload_waits_total",
    "host_pages_parked",
)

_gauges: dict[str, Any] = {}


def format_line(s: dict[str, float]) -> str:
    """One log line: ``freekv: correction rate ..., recalled ..., hit rate ..., host pool ...``."""
    return (
        f"freekv: correction rate {s['correction_rate']:.3f} "
        f"({int(s['corrections'])}/{int(s['checks'])} head checks), "
        f"pages recalled {int(s['pages_recalled'])} ({s['bytes_recalled'] / 2**20:.2f} MiB), "
        f"resident hit rate {s['resident_hit_rate']:.3f}, "
        f"host pool {int(s['host_pages_used'])}/{int(s['host_pages_capacity'])} pages "
        f"({100 * s['host_pool_usage']:.1f}%)"
        + (
            f", prefix cache {int(s['prefix_cache_pages'])} pages, "
            f"{int(s['prefix_hit_tokens_total'])} tokens served from it "
            f"({int(s['prefix_pages_adopted_total'])} pages shared), "
            f"{int(s['prefix_pages_evicted_total'])} pages evicted"
            if s.get("prefix_cache_on")
            else ""
        )
    )


def export(s: dict[str, float], labels: dict[str, str] | None = None) -> bool:
    """Set the Prometheus gauges, labelled with ``labels`` (the scheduler's ranks, so that
    the multiprocess registry keeps one series per rank); False when metrics are off or the
    client is missing."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return False
    if importlib.util.find_spec("prometheus_client") is None:
        return False
    from prometheus_client import Gauge

    labels = labels or {}
    for name in GAUGES:
        g = _gauges.get(name)
        if g is None:
            g = Gauge(
                f"sglang:freekv_{name}",
                f"FreeKV {name.replace('_', ' ')} (cumulative since start for counts)",
                labelnames=sorted(labels),
                multiprocess_mode="mostrecent",
            )
            _gauges[name] = g
        (g.labels(**labels) if labels else g).set(float(s[name]))
    return True
