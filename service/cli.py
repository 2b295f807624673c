"""`adapterserve` command line: `serve`, `upload`, `train`, `train-hyper`, `import` and `bench`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType

import uvicorn

__all__ = ["main"]

log = logging.getLogger("adapterserve")
_PROGRESS_MIN_BYTES = 4 << 20


def _serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    if args.ray:
        from service.ray_app import run

        logging.basicConfig(level=settings.log_level.upper())
        return run(replicas=args.replicas, host=settings.host, port=settings.port)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=max(int(settings.drain_timeout_s), 1),
        limit_concurrency=settings.max_connections,
    )
    server = DrainingServer(config, drain=lambda: app.state.service.drain(settings.drain_timeout_s))
    server.run()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but SIGTERM/SIGINT first drain in-flight work and the process then exits 0.

    uvicorn alone stops listening at once and re-raises the signal after shutdown (exit 143); here
    /readyz turns 503 while admitted requests finish, then the server stops. A second signal forces
    the exit.
    """

    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Remember the loop, so a signal handler can schedule the drain on it."""
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain, then exit; a second one (or one during start-up): exit now."""
        if self._drain_task is not None or self._loop is None or not self.started:
            self.force_exit = self._drain_task is not None
            self.should_exit = True
            return
        log.info("signal %s: draining before exit", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None and self._loop is not None:
            self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except Exception:
            log.exception("drain failed")
        self.should_exit = True


def _upload(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.client import Client, ClientError

    key = args.key or os.environ.get("ADAPTERSERVE_KEY")
    bars: list[tqdm] = []

    def progress(sent: int, total: int) -> None:
        if not bars:
            # a bar only where there is something to watch: large files, on a terminal
            small = total < _PROGRESS_MIN_BYTES
            bars.append(
                tqdm(total=total, unit="B", unit_scale=True, desc=args.task, disable=True if small else None)
            )
        bars[0].n = sent  # a retry sends the file again from its start
        bars[0].refresh()

    with Client(args.url, key=key) as client:
        try:
            result = client.upload(
                args.task, args.directory, activate=not args.no_activate, progress=progress
            )
        except ClientError as exc:
            print(f"adapterserve upload: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"adapterserve upload: {exc.strerror or exc}: {exc.filename or args.url}", file=sys.stderr)
            return 1
        finally:
            for bar in bars:
                bar.close()
    print(result.model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="adapterserve", description="Serve many adapters on one backbone.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service (settings from ADAPTERSERVE_* variables)")
    serve.add_argument("--host", help="address to bind (ADAPTERSERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (ADAPTERSERVE_PORT, default 8000)")
    serve.add_argument(
        "--ray", action="store_true", help="run as a Ray Serve application (a local cluster, or RAY_ADDRESS)"
    )
    serve.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="engine replicas with --ray (ADAPTERSERVE_RAY_REPLICAS, default 2)",
    )
    serve.set_defaults(func=_serve)
    upload = sub.add_parser("upload", help="upload an artifact directory as a new version of a task")
    upload.add_argument("task", help="task name ([a-z0-9][a-z0-9_.-]{0,63})")
    upload.add_argument("directory", help="directory with adapter_config.json and adapter.safetensors")
    upload.add_argument("--url", default="http://127.0.0.1:8000", help="server URL")
    upload.add_argument("--key", help="admin key (default: $ADAPTERSERVE_KEY)")
    upload.add_argument(
        "--no-activate", action="store_true", help="store the version without making it current"
    )
    upload.set_defaults(func=_upload)
    # the model-side commands register themselves; their heavy imports happen only when run
    from adapters.formats import add_import_parser
    from adapters.training.cli import add_train_hyper_parser, add_train_parser

    add_train_parser(sub)
    add_train_hyper_parser(sub)
    add_import_parser(sub)
    bench = sub.add_parser(
        "bench",
        help="run a benchmark of the source tree's bench/ directory (prints JSON)",
        description="Run bench/NAME.py with the remaining arguments; see each script's --help.",
    )
    bench.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=_bench)
    return parser


BENCHMARKS = (
    "mixed",
    "http",
    "hyper",
    "quality",
    "sweep",
    "embed",
    "soak",
    "generate",
    "generate_http",
    "tasks",
    "tasks_http",
    "scaleout",
)


def _bench(args: argparse.Namespace) -> int:
    import subprocess

    # Benchmarks ship with the source tree (they need its data and scripts), not with the package.
    script = Path(__file__).resolve().parents[1] / "bench" / f"{args.name}.py"
    if not script.is_file():
        print(f"adapterserve bench: {script} not found; run it from a source checkout", file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    return subprocess.call([sys.executable, str(script), *args.args], env=env)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adapterserve` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
