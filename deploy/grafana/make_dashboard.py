"""Writes deploy/grafana/dashboards/adapterserve.json: `python deploy/grafana/make_dashboard.py`.

The dashboard is generated so that its queries stay few, regular and reviewable; a test checks the
JSON equals this script's output and that every metric it queries exists on a live server.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "adapterserve.json"
DS = {"type": "prometheus", "uid": "prometheus"}
RATE = "$__rate_interval"


def sel(extra: str = "") -> str:
    """The instance selector of the dashboard's variable, plus `extra` matchers."""
    return '{instance=~"$instance"' + (", " + extra if extra else "") + "}"


ALL = sel()
NOT_2XX = sel('status!~"2.."')


def rate(metric: str, selector: str = ALL) -> str:
    """The per-second rate of a counter or of a histogram's series."""
    return f"rate({metric}{selector}[{RATE}])"


def quantile(q: float, metric: str, *, by: str = "") -> str:
    """A quantile of a histogram, across instances (and per `by` label)."""
    group = "le" + (", " + by if by else "")
    return f"histogram_quantile({q}, sum by ({group}) ({rate(metric + '_bucket')}))"


def quantiles(metric: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    """Targets of several quantiles, legends p50, p95, ..."""
    return [(quantile(q, metric), f"p{round(q * 100)}") for q in qs]


def mean(metric: str) -> str:
    """The mean of a histogram's observations per interval."""
    return f"sum({rate(metric + '_sum')}) / sum({rate(metric + '_count')})"


class Layout:
    """Panels on Grafana's 24-column grid, in rows of 8-high panels."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0

    def row(self, title: str) -> None:
        """Start a titled row."""
        self._wrap()
        self.panels.append(
            {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": self._pos(24, 1)}
        )
        self.y += 1

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        unit: str = "short",
        width: int = 8,
        desc: str = "",
    ) -> None:
        """A time series panel; wraps to the next line when the current one is full."""
        if self.x + width > 24:
            self._wrap()
        self.panels.append(
            {
                "type": "timeseries",
                "title": title,
                "description": desc,
                "datasource": DS,
                "gridPos": self._pos(width, 8),
                "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 10}}, "overrides": []},
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi"},
                },
                "targets": [
                    {"datasource": DS, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)
                ],
            }
        )
        self.x += width

    def _pos(self, width: int, height: int) -> dict:
        return {"h": height, "w": width, "x": self.x, "y": self.y}

    def _wrap(self) -> None:
        if self.x:
            self.y += 8
            self.x = 0


def dashboard() -> dict:
    """The dashboard: traffic, queue and batches, adapter cache, process."""
    d = Layout()
    d.row("Traffic")
    d.panel(
        "Requests/s by task",
        [(f"sum by (task) ({rate('adapterserve_requests_total')})", "{{task}}")],
        unit="reqps",
        desc="Predict requests per second by task (past ADAPTERSERVE_METRICS_MAX_TASKS tasks: other).",
    )
    d.panel(
        "Errors/s by task and status",
        [(f"sum by (task, status) ({rate('adapterserve_requests_total', NOT_2XX)})", "{{task}} {{status}}")],
        unit="reqps",
        desc="Predict answers that were not 2xx.",
    )
    d.panel(
        "Rejected/s by reason",
        [(f"sum by (reason) ({rate('adapterserve_rejected_total')})", "{{reason}}")],
        unit="reqps",
        desc="Requests refused (queue full: 429) or dropped (deadline passed in the queue: 504).",
    )
    d.panel("Predict latency", quantiles("adapterserve_request_duration_seconds"), unit="s", width=12)
    d.panel(
        "p95 predict latency by task",
        [(quantile(0.95, "adapterserve_request_duration_seconds", by="task"), "{{task}}")],
        unit="s",
        width=12,
    )
    d.row("Queue and batches")
    d.panel(
        "Queue depth, requests in flight",
        [
            (f"sum(adapterserve_queue_depth{ALL})", "rows queued"),
            (f"sum(adapterserve_requests_in_flight{ALL})", "requests in flight"),
        ],
    )
    d.panel(
        "Queue wait",
        quantiles("adapterserve_queue_wait_seconds"),
        unit="s",
        desc="Time rows wait for their forward pass.",
    )
    d.panel(
        "Forward pass duration", quantiles("adapterserve_forward_duration_seconds", (0.5, 0.95)), unit="s"
    )
    d.panel(
        "Rows per batch",
        [(mean("adapterserve_batch_size"), "mean"), (quantile(0.95, "adapterserve_batch_size"), "p95")],
        width=12,
        desc="Rows in one forward pass (at most ADAPTERSERVE_MAX_BATCH_SIZE).",
    )
    d.panel(
        "Distinct tasks per batch",
        [(mean("adapterserve_batch_tasks"), "mean"), (quantile(0.95, "adapterserve_batch_tasks"), "p95")],
        width=12,
        desc="How many tasks share one forward pass: what mixed-task batching buys.",
    )
    d.row("Adapter cache")
    hits, misses = (
        rate("adapterserve_adapter_cache_hits_total"),
        rate("adapterserve_adapter_cache_misses_total"),
    )
    d.panel(
        "Device slot hit rate",
        [(f"sum({hits}) / (sum({hits}) + sum({misses}))", "hit rate")],
        unit="percentunit",
        desc="Share of device slot lookups that found the adapter resident.",
    )
    d.panel(
        "Adapter loads/s by source and result",
        [(f"sum by (source, result) ({rate('adapterserve_adapter_loads_total')})", "{{source}} {{result}}")],
        unit="ops",
        desc="Adapters read from the store, or generated from a hypernetwork.",
    )
    d.panel(
        "p95 load duration by source",
        [(quantile(0.95, "adapterserve_adapter_load_duration_seconds", by="source"), "{{source}}")],
        unit="s",
    )
    d.panel(
        "Evictions/s",
        [(f"sum({rate('adapterserve_adapter_evictions_total')})", "evictions")],
        unit="ops",
        desc="Adapters evicted from device slots; steadily high: too few slots for the working set.",
    )
    d.panel(
        "Resident adapters", [(f"sum by (instance) (adapterserve_adapters_resident{ALL})", "{{instance}}")]
    )
    d.panel(
        "Resident adapter bytes",
        [
            (f"sum(adapterserve_adapter_cache_bytes{ALL})", "device slots"),
            (f"sum(adapterserve_adapter_host_cache_bytes{ALL})", "host cache"),
        ],
        unit="bytes",
    )
    d.row("Process")
    d.panel(
        "Device memory",
        [
            (
                f"sum by (instance, device, kind) (adapterserve_device_memory_bytes{ALL})",
                "{{instance}} {{device}} {{kind}}",
            )
        ],
        unit="bytes",
        width=12,
        desc="Per GPU: CUDA memory allocated, reserved and total; the host: resident set and total.",
    )
    d.panel(
        "Ready, uploads/s, tokens/s",
        [
            (f"min(adapterserve_ready{ALL})", "ready"),
            (f"sum by (result) ({rate('adapterserve_uploads_total')})", "uploads {{result}}"),
            (f"sum({rate('adapterserve_tokens_total')})", "tokens/s"),
        ],
        width=12,
    )
    variable = "label_values(adapterserve_ready, instance)"
    return {
        "uid": "adapterserve",
        "title": "adapterserve",
        "tags": ["adapterserve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "instance",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": variable, "refId": "instance"},
                    "definition": variable,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                }
            ]
        },
        "panels": [{**p, "id": i + 1} for i, p in enumerate(d.panels)],
    }


def render() -> str:
    """The dashboard's JSON text, as committed."""
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
