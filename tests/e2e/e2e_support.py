"""Helpers of the end-to-end tests: a real `adapterserve serve` process on 127.0.0.1, expected outputs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import classify_each

from adapters.backbone import load_backbone
from adapters.model import BankConfig, MultiTaskModel
from bench.common import wait_ready
from store.artifact import expected_tensors, parse_config
from store.safetensors_io import write_safetensors

REPO = Path(__file__).resolve().parents[2]
ADMIN = "e2e-admin-key-0123456789"
API = "e2e-api-key-0123456789ab"
START_TIMEOUT_S = 120.0
# fmt: off
WORDS = [
    "the", "a", "movie", "film", "plot", "actor", "good", "bad", "great", "awful", "boring", "fun", "is", "was",
    "not", "very", "and", "but", "story", "music", "ending", "loved", "hated", "it", "this", "i",
]
# fmt: on


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `adapterserve serve` subprocess, configured only through ADAPTERSERVE_* variables."""

    def __init__(self, root: Path, *, backbone: Path | None, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / f"server-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERSERVE_")}
        env |= {
            "HF_HUB_OFFLINE": "1",
            "ADAPTERSERVE_STORE": str(root / f"store-{self.port}"),
            "ADAPTERSERVE_ADMIN_KEYS": ADMIN,
            "ADAPTERSERVE_SEED_DIR": "",
            "ADAPTERSERVE_DEVICE": "cpu",
            "ADAPTERSERVE_LOG_LEVEL": "warning",
        }
        if backbone is not None:
            env["ADAPTERSERVE_BACKBONE"] = str(backbone)
        env |= {f"ADAPTERSERVE_{k.upper()}": str(v) for k, v in settings.items()}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> Server:
        """Poll /readyz until it answers 200 (the process is external, so polling is the only way)."""
        wait_ready(self.proc, url=self.url, log=self.log, timeout=START_TIMEOUT_S, interval=0.1)
        return self

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """Make sure the process is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def write_random_artifact(directory: Path, config: dict, spec, *, seed: int, scale: float = 0.5) -> Path:
    """An artifact directory with random float32 tensors of the shapes the config implies."""
    rng = np.random.default_rng(seed)
    shapes = expected_tensors(parse_config(config), spec)
    arrays = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    write_safetensors(directory / "adapter.safetensors", arrays)
    return directory


class InProcess:
    """Expected outputs computed in this process: one adapter, one input at a time."""

    def __init__(self, backbone_dir: Path | None) -> None:
        self.model = MultiTaskModel(load_backbone(backbone_dir, device="cpu"), banks=BankConfig(slots=2))
        self.spec = self.model.spec
        self.tok = self.model.backbone.tokenizer

    def outputs(self, directory: Path, inputs: list, *, all_scores: bool = False) -> list[dict]:
        """Decoded outputs for `inputs` with the artifact in `directory`."""
        return classify_each(self.model, directory, inputs, all_scores=all_scores)


def assert_close(got: list[dict], want: list[dict], *, tol: float = 1e-4) -> None:
    """Same labels; scores and values within `tol` (the server batches and pads)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.get("label") == w.get("label"), (g, w)
        for field in ("score", "value"):
            if field in w:
                assert abs(g[field] - w[field]) < tol, (field, g, w)
        for k, p in w.get("scores", {}).items():
            assert abs(g["scores"][k] - p) < tol
