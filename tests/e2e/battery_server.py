"""`adapterserve serve` with fault hooks, for the crash and shutdown battery.

Run as a script it installs the hooks named by its environment, then serves:

- BATTERY_CRASH_AT=<step>: SIGKILL the process when an upload reaches that step of LocalStore.put_version.
- BATTERY_ENGINE_GATE=<path>: every batch waits until that file exists, so requests pile up in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from e2e_support import ADMIN, REPO, free_port

from bench.common import wait_ready


def _install_hooks() -> None:
    crash_at = os.environ.get("BATTERY_CRASH_AT")
    if crash_at:
        import store.local as local

        def crash(step: str) -> None:
            if step == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)

        local._crash_point = crash
    gate = os.environ.get("BATTERY_ENGINE_GATE")
    if gate:
        from service.engine import Engine

        original = Engine._run

        def gated(self, rows):
            # The worker thread polls a file: the test process has no other way in.
            while not os.path.exists(gate):
                time.sleep(0.01)
            return original(self, rows)

        Engine._run = gated


class HookedServer:
    """One server process over a given store, configured by ADAPTERSERVE_* and BATTERY_* variables."""

    def __init__(
        self, *, store: Path, backbone: Path, log: Path, hooks: dict[str, str], **settings: object
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ADAPTERSERVE_", "BATTERY_"))}
        env |= {
            "HF_HUB_OFFLINE": "1",
            "ADAPTERSERVE_STORE": str(store),
            "ADAPTERSERVE_BACKBONE": str(backbone),
            "ADAPTERSERVE_ADMIN_KEYS": ADMIN,
            "ADAPTERSERVE_SEED_DIR": "",
            "ADAPTERSERVE_DEVICE": "cpu",
            "ADAPTERSERVE_LOG_LEVEL": "warning",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent), str(REPO / "tests")]),
            **hooks,
        }
        env |= {f"ADAPTERSERVE_{k.upper()}": str(v) for k, v in settings.items()}
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        """The tail of what the server printed."""
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 120.0) -> HookedServer:
        """Poll /readyz until 200 (an external process: polling is the only way to see it)."""
        wait_ready(self.proc, url=self.url, log=self.log, timeout=timeout, interval=0.05)
        return self

    def close(self) -> None:
        """Make sure the process is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


if __name__ == "__main__":
    _install_hooks()
    from service.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
