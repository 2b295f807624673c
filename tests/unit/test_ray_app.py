"""The Ray Serve application's pure parts: which task a request is for, and the merged replica metrics."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("ray.serve")

from service.ray_app import RaySettings, merge_metrics, task_of

pytestmark = pytest.mark.ray


@pytest.mark.parametrize(
    ("method", "path", "body", "task"),
    [
        ("POST", "/v1/tasks/sst2/predict", b"", "sst2"),
        ("GET", "/v2/models/sst2", b"", "sst2"),
        ("POST", "/v2/models/sst2/infer", b"{}", "sst2"),
        ("POST", "/v1/completions", b'{"model": "gen", "prompt": "x"}', "gen"),
        ("POST", "/embed", b'{"model": "emb", "inputs": "x"}', "emb"),
        ("POST", "/embed", b'{"inputs": "x"}', None),
        ("POST", "/v1/embeddings", b"[1, 2]", None),
        ("POST", "/v1/embeddings", b"{not json", None),
        ("POST", "/v1/adapters/sst2", b"--multipart", None),
        ("GET", "/v1/adapters", b"", None),
        ("GET", "/readyz", b"", None),
    ],
)
def test_task_of(method: str, path: str, body: bytes, task: str | None) -> None:
    assert task_of(method, path, body) == task


def test_merged_metrics_keep_every_replica_apart() -> None:
    one = (
        "# HELP adapterserve_requests_total Predict requests.\n# TYPE adapterserve_requests_total counter\n"
        'adapterserve_requests_total{task="a",status="200"} 3.0\n'
        "# HELP adapterserve_ready Ready.\n# TYPE adapterserve_ready gauge\nadapterserve_ready 1.0\n"
    )
    two = one.replace("3.0", "5.0").replace('task="a"', 'task="b"')
    merged = merge_metrics({"r1": one, "r2": two})
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(merged)
        for s in family.samples
    }
    assert samples == {
        ("adapterserve_requests_total", (("replica", "r1"), ("status", "200"), ("task", "a"))): 3.0,
        ("adapterserve_requests_total", (("replica", "r2"), ("status", "200"), ("task", "b"))): 5.0,
        ("adapterserve_ready", (("replica", "r1"),)): 1.0,
        ("adapterserve_ready", (("replica", "r2"),)): 1.0,
    }
    assert merged.count("# TYPE adapterserve_ready gauge") == 1


def test_ray_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERSERVE_RAY_REPLICAS", "3")
    monkeypatch.setenv("ADAPTERSERVE_RAY_MAX_REPLICAS", "8")
    monkeypatch.setenv("ADAPTERSERVE_RAY_GPUS_PER_REPLICA", "1")
    monkeypatch.setenv("ADAPTERSERVE_SLOTS", "64")
    s = RaySettings()
    assert (s.replicas, s.max_replicas, s.gpus_per_replica, s.slots) == (3, 8, 1.0, 64)


@pytest.mark.parametrize(("level", "access"), [("warning", None), ("info", "true")])
def test_serve_logs_at_our_level_with_the_access_log_off_unless_asked(
    monkeypatch: pytest.MonkeyPatch, level: str, access: str | None
) -> None:
    """A line per request in three processes, shipped to the driver, costs CPU per request: off by default."""
    from service.ray_app import build_app

    monkeypatch.setenv("ADAPTERSERVE_LOG_LEVEL", level)
    if access is not None:
        monkeypatch.setenv("ADAPTERSERVE_RAY_ACCESS_LOG", access)
    ingress = build_app(RaySettings(), env={})._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    for deployment in (ingress, engine):
        config = deployment._deployment_config.logging_config
        assert config["log_level"] == level.upper()
        assert config["enable_access_log"] is (access == "true")
