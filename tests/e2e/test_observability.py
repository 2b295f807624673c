"""Observability without Docker: the Prometheus config and a live `/metrics` scrape pass promtool and a
strict parser-based check of the same rules, and every metric the dashboard and the alert rules query
exists on a real server. Without promtool (Debian's `prometheus` package) its checks are skipped, with
that reason, never passed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections import Counter as Tally
from pathlib import Path

import httpx
import pytest
import yaml
from e2e_support import ADMIN, REPO, InProcess, Server, write_random_artifact
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import load_file

from service.client import Client, RateLimitedError, Retry

pytestmark = pytest.mark.e2e

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus); .ci/run installs it"
)
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "adapterserve.json"
NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
QUERIED = re.compile(r"\badapterserve_[a-z0-9_]+")
# promtool's lint: base units only
NON_BASE_UNITS = (
    "_milliseconds",
    "_microseconds",
    "_nanoseconds",
    "_kilobytes",
    "_megabytes",
    "_minutes",
    "_hours",
)


# -- the strict fallbacks of promtool ------------------------------------------------------------------


def lint_exposition(text: str) -> list[str]:
    """What promtool check metrics would complain about, from prometheus_client's own parser."""
    problems: list[str] = []
    seen: Tally[tuple] = Tally()
    for family in text_string_to_metric_families(text):  # raises on malformed exposition
        name = family.name
        if not NAME.match(name) or name != name.lower():
            problems.append(f"{name}: metric names are snake_case")
        if not family.documentation.strip():
            problems.append(f"{name}: no help text")
        if family.type == "unknown":
            problems.append(f"{name}: no TYPE line")
        problems += [f"{name}: use base units" for unit in NON_BASE_UNITS if unit in name]
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            seen[key] += 1
            if family.type == "counter" and not sample.name.endswith("_total"):
                problems.append(f"{sample.name}: counters end in _total")
            if family.type != "counter" and sample.name.endswith("_total"):
                problems.append(f"{sample.name}: only counters end in _total")
        if family.type == "histogram":
            problems += _histogram_problems(family)
    problems += [f"{name}{dict(labels)}: duplicate series" for (name, labels), n in seen.items() if n > 1]
    return problems


def _histogram_problems(family) -> list[str]:
    problems = []
    series: dict[tuple, dict[str, list]] = {}
    for s in family.samples:
        labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        entry = series.setdefault(labels, {"buckets": [], "count": []})
        if s.name.endswith("_bucket"):
            entry["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            entry["count"].append(s.value)
    for labels, entry in series.items():
        buckets = sorted(entry["buckets"])
        counts = [v for _, v in buckets]
        if not buckets or buckets[-1][0] != float("inf"):
            problems.append(f"{family.name}{dict(labels)}: no +Inf bucket")
        elif counts != sorted(counts) or entry["count"] != [counts[-1]]:
            problems.append(f"{family.name}{dict(labels)}: buckets not cumulative or +Inf != count")
    return problems


def lint_prometheus_config(path: Path) -> list[str]:
    """The structure promtool check config verifies, for the parts our config uses."""
    problems = []
    config = yaml.safe_load(path.read_text())
    jobs = [job.get("job_name") for job in config.get("scrape_configs", [])]
    if not jobs or None in jobs or len(set(jobs)) != len(jobs):
        problems.append("every scrape config needs a unique job_name")
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            problems += [
                f"{job['job_name']}: target {t!r} is not host:port"
                for t in static["targets"]
                if not re.fullmatch(r"[A-Za-z0-9.-]+:\d{1,5}", t)
            ]
    for rule_file in config.get("rule_files", []):
        rules_path = path.parent / rule_file
        if not rules_path.is_file():
            problems.append(f"rule file {rule_file} does not exist")
            continue
        for group in yaml.safe_load(rules_path.read_text())["groups"]:
            for rule in group["rules"]:
                if not rule.get("expr") or not (rule.get("alert") or rule.get("record")):
                    problems.append(f"{group['name']}: a rule needs expr and alert or record")
    return problems


@needs_promtool
def test_prometheus_config_passes_promtool():
    done = subprocess.run(
        [PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "rules found" in done.stdout


def test_prometheus_config_passes_the_strict_check():
    assert lint_prometheus_config(PROMETHEUS_CONFIG) == []


def test_the_fallback_lint_catches_what_promtool_would():
    bad = (
        "# TYPE app_requests counter\napp_requests 1\n"
        "# HELP app_latency_milliseconds x\n# TYPE app_latency_milliseconds gauge\napp_latency_milliseconds 1\n"
        '# HELP h x\n# TYPE h histogram\nh_bucket{le="1"} 3\nh_bucket{le="+Inf"} 2\nh_count 2\nh_sum 1\n'
    )
    problems = lint_exposition(bad)
    assert any("no help text" in p for p in problems)
    assert any("use base units" in p for p in problems)
    assert any("+Inf != count" in p for p in problems)


# -- a live server ---------------------------------------------------------------------------------------


def dashboard_metrics() -> set[str]:
    """Every adapterserve series the dashboard and the alert rules query."""
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((REPO / "deploy" / "prometheus-rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {m for e in exprs for m in QUERIED.findall(e)}


def _queue_depth(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return next(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "adapterserve_queue_depth"
    )


@pytest.fixture(scope="module")
def live_scrape(tiny_model_dir, tmp_path_factory) -> dict:
    """A real server driven through loads, evictions and a refused request; its /metrics and what it said.

    One device slot and a host cache of one adapter for two tasks: alternating them loads from the store and evicts.
    A long batch wait, batches of 4 rows and a queue of 4 rows: a request of 3 rows waits for company,
    and a second one meanwhile is refused; full batches of 4 run at once.
    """
    tmp_path = tmp_path_factory.mktemp("observability")
    spec = InProcess(tiny_model_dir).spec
    head = {"type": "classification", "labels": ["no", "yes"]}
    config = {"method": "lora", "r": 2, "alpha": 4.0, "backbone_fingerprint": spec.fingerprint, "head": head}
    dirs = {t: write_random_artifact(tmp_path / t, config, spec, seed=i) for i, t in enumerate(("a", "b"))}
    # A host cache of one adapter: each load of one task evicts the other's decoded copy.
    one = sum(a.nbytes for a in load_file(dirs["a"] / "adapter.safetensors").values())
    server = Server(
        tmp_path,
        backbone=tiny_model_dir,
        slots=2,
        host_cache_bytes=one,
        max_inputs=4,
        max_queue=4,
        max_batch_size=4,
        max_wait_ms=1500,
        warmup="false",
    )
    try:
        server.wait_ready()
        with Client(server.url, key=ADMIN, retry=Retry(attempts=1)) as admin:
            for task, directory in dirs.items():
                admin.upload(task, directory)
            first = threading.Thread(target=admin.predict, args=("a", ["the movie was good"] * 3))
            first.start()
            # the server is another process: polling its metrics is the only way to see the rows queued
            deadline = time.monotonic() + 30
            while _queue_depth(server.url) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            try:
                admin.predict("b", ["a bad plot", "boring"])
                refused = None
            except RateLimitedError as exc:
                refused = exc
            first.join(30)
            versions = [
                admin.predict(task, ["i loved it", "boring", "fun", "bad"]).version
                for task in ("b", "a", "b")
            ]
        return {
            "text": httpx.get(f"{server.url}/metrics", timeout=10).text,
            "refused": refused,
            "versions": versions,
        }
    finally:
        server.kill()


@needs_promtool
def test_live_metrics_pass_promtool(live_scrape):
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=live_scrape["text"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr
    )


def test_live_metrics_pass_the_strict_check_and_cover_the_dashboard(live_scrape):
    text = live_scrape["text"]
    refused = live_scrape["refused"]
    assert refused is not None and refused.retry_after is not None and 1 <= refused.retry_after <= 60
    assert live_scrape["versions"] == [1, 1, 1]
    assert lint_exposition(text) == []

    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    queried = dashboard_metrics()
    assert len(queried) >= 20
    assert sorted(queried - set(samples)) == []
    assert samples["adapterserve_adapter_evictions_total"].value >= 2
    assert samples["adapterserve_adapter_cache_misses_total"].value >= 3
    by_labels = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert by_labels[("adapterserve_rejected_total", (("reason", "queue_full"),))] == 1
    assert by_labels[("adapterserve_device_memory_bytes", (("device", "cpu"), ("kind", "resident")))] > 10e6
