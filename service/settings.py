"""Service settings: one pydantic-settings class, read from `ADAPTERSERVE_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from store.location import admin_key_file
from store.s3 import S3Location

__all__ = ["TABLE_END", "TABLE_START", "Settings", "default_seed_dir", "markdown_table", "update_table"]

_REPO = Path(__file__).resolve().parents[1]
_MIN_KEY_CHARS = 16


def default_seed_dir() -> Path | None:
    """The repository's `examples/` directory when it exists (demo tasks for `make serve`)."""
    path = _REPO / "examples"
    return path if path.is_dir() else None


def _split_keys(value: object) -> object:
    if isinstance(value, str):
        return [k.strip() for k in value.split(",") if k.strip()]
    return value


Keys = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Everything an operator can set; each field is the env var `ADAPTERSERVE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="ADAPTERSERVE_", extra="ignore", validate_default=True)

    # -- model ----------------------------------------------------------------------------------
    backbone: str | None = Field(
        default=None,
        description="Local Hugging Face model directory of the backbone; empty: the bundled MiniLM-L6.",
    )
    device: str = Field(
        default="auto", description="Torch device: auto (CUDA when present), cpu, cuda:0, ..."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Backbone and adapter dtype; auto is bfloat16 on GPU, float32 on CPU."
    )
    max_input_tokens: int = Field(
        default=256,
        ge=8,
        le=8192,
        description="Inputs are truncated to this many tokens (special tokens included).",
    )
    max_new_tokens: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Default and cap of tokens generated per input (generative backbones).",
    )

    # -- store and seed ---------------------------------------------------------------------------
    store: str = Field(
        default=Path.home() / ".local" / "share" / "adapterserve" / "store",
        description=(
            "Directory of the durable artifact store (created when missing), or `s3://bucket/prefix` for an "
            "S3-compatible object store (endpoint, region and credentials from the AWS environment variables)."
        ),
    )
    max_store_bytes: int | None = Field(
        default=None, ge=1, description="Total bytes the store may hold; past it uploads answer 507."
    )
    store_poll_s: float | None = Field(
        default=None,
        ge=0,
        le=3600,
        description=(
            "How often to re-read the store's current versions, so uploads made through another server "
            "sharing the store are served here; 0: never; empty: 2 for an s3:// store, never for a directory."
        ),
    )
    seed_dir: Path | None = Field(
        default_factory=default_seed_dir,
        description="At first start with an empty store, import every artifact directory under this one.",
    )
    upload_tmp_dir: Path | None = Field(
        default=None, description="Where uploads are streamed before validation; empty: the system temp dir."
    )

    # -- HTTP ------------------------------------------------------------------------------------
    host: str = Field(
        default="127.0.0.1", description="Address to bind; loopback unless deliberately exposed."
    )
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    admin_keys: Keys = Field(
        default_factory=list,
        repr=False,
        description="Comma-separated keys for management routes; empty: one is generated and kept beside the store.",
    )
    api_keys: Keys = Field(
        default_factory=list,
        repr=False,
        description="Comma-separated keys for predict; empty: predict needs no key.",
    )
    admin_key_file: Path | None = Field(
        default=None,
        description="File of the generated admin key (0600); empty: `<store>.admin-key` beside the store.",
    )
    max_upload_bytes: int = Field(
        default=64 << 20, ge=1024, description="Largest upload body in bytes; larger ones answer 413 early."
    )
    max_inputs: int = Field(
        default=256, ge=1, description="Most inputs in one predict request (413 past it)."
    )
    max_input_chars: int = Field(
        default=20_000, ge=1, description="Longest single input text in characters (413 past it)."
    )

    # -- batching --------------------------------------------------------------------------------
    batching: Literal["mixed", "per_task"] = Field(
        default="mixed",
        description="mixed: rows of many tasks share a forward; per_task: one task per forward.",
    )
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="Most rows in one forward pass.")
    max_batch_tokens: int = Field(
        default=8192, ge=8, description="Most padded tokens (rows x longest row) in one forward pass."
    )
    split_cost_tokens: int | None = Field(
        default=None,
        ge=0,
        description=(
            "A batch's rows are sorted by length and run as several forwards when that saves more "
            "padded tokens than this per extra forward; empty: 128 on CPU, 2048 on GPU."
        ),
    )
    compute_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description=(
            "CPU device: threads that run the parts of one batch at once, each on one torch thread "
            "(one team per core stalls on no neighbour, where torch's own threads wait for a preempted "
            "one); empty: the CPUs this process may use. A GPU runs a batch as one forward."
        ),
    )
    prefetch: bool = Field(
        default=True,
        description="Prepare a cold adapter's device-ready weights (Compacter's Kronecker products, the "
        "copy to the device) on a thread of its own as soon as its request is admitted, while earlier "
        "batches run; its batch then only copies them into slots.",
    )
    switch_interval_ms: float = Field(
        default=0.5,
        gt=0,
        le=100,
        description=(
            "Python's thread switch interval while serving: how long a forward thread may wait for the "
            "interpreter lock between torch calls while the event loop holds it (Python's default is 5)."
        ),
    )
    max_wait_ms: float = Field(
        default=5.0, ge=0, le=10_000, description="How long the first row of a batch waits for company."
    )
    max_queue: int = Field(default=1024, ge=1, description="Most queued rows; past it requests answer 429.")
    max_tokens_in_flight: int = Field(
        default=65_536,
        ge=1,
        description=(
            "Most tokens (prompt plus max_tokens) of generations admitted at once; past it completions "
            "answer 429."
        ),
    )
    refusal_pause_ms: float = Field(
        default=250.0,
        ge=0,
        le=60_000,
        description=(
            "A request refused for a full queue is answered 429 after this pause (at most its "
            "Retry-After), so clients that retry at once cannot flood the event loop."
        ),
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Most open connections plus in-flight requests (uvicorn's limit_concurrency); past it a "
            "request answers 503 before it is read, so a flood of clients cannot exhaust the process; "
            "empty: no limit (the row queue still bounds the work)."
        ),
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="Deadline of a request; still queued past it, it answers 504."
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, how long in-flight work may take before the process exits.",
    )

    # -- adapter cache ---------------------------------------------------------------------------
    slots: int = Field(
        default=4096,
        ge=2,
        le=65536,
        description=(
            "Most adapters resident on the device at once, plus one (slot 0 is the plain backbone). A slot "
            "costs a few host-side integers per bank, not device memory: `cache_bytes` bounds that."
        ),
    )
    cache_bytes: int = Field(
        default=1 << 30,
        ge=1,
        description=(
            "Byte budget of adapters resident on the device; each takes bank rows sized to it (a LoRA of "
            "rank 8 takes 8 rows per projection), least valuable evicted first. An adapter larger than "
            "this alone is refused at upload (413)."
        ),
    )
    host_cache_bytes: int = Field(
        default=2 << 30,
        ge=1,
        description=(
            "Byte budget of decoded adapters kept in host memory (least recently used evicted first, "
            "never a pinned one or one a request holds). An adapter larger than this alone is refused at upload (413)."
        ),
    )
    pinned: Keys = Field(
        default_factory=list,
        description="Comma-separated tasks whose current version never leaves the device.",
    )
    lora_max_rank: int | None = Field(
        default=None, ge=0, le=4096, description="Largest LoRA rank accepted; empty: any (0 disables LoRA)."
    )
    bottleneck_max_dim: int | None = Field(
        default=None,
        ge=0,
        le=8192,
        description="Largest bottleneck width of sequential/parallel adapters; empty: any (0 disables them).",
    )
    prefix_max_len: int | None = Field(
        default=None, ge=0, le=4096, description="Longest prefix accepted; empty: any (0 disables prefixes)."
    )
    head_max_outputs: int = Field(default=32, ge=1, le=1024, description="Most labels a task head may have.")

    # -- operations ------------------------------------------------------------------------------
    warmup: bool = Field(
        default=True, description="Run a forward pass and preload adapters before /readyz says ready."
    )
    metrics_max_tasks: int = Field(
        default=100, ge=1, description="Tasks that get their own metric label; the rest share `other`."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    otel: bool = Field(
        default=False,
        description="Trace every request with FastAPI's native OpenTelemetry support, to the globally "
        "configured providers; off, requests skip its per-request checks (/metrics is unaffected).",
    )

    @field_validator("admin_keys", "api_keys", "pinned", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return _split_keys(value)

    @field_validator("store", mode="before")
    @classmethod
    def _store_location(cls, value: object) -> object:
        # A Path would fold `s3://` into `s3:/`; a URL stays as written, a directory as its path.
        if isinstance(value, str) and value.startswith("s3://"):
            S3Location.parse(value)
            return value
        return str(value) if isinstance(value, Path) else value

    @field_validator(
        "backbone",
        "seed_dir",
        "upload_tmp_dir",
        "admin_key_file",
        "max_store_bytes",
        "store_poll_s",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for key in (*self.admin_keys, *self.api_keys):
            if len(key) < _MIN_KEY_CHARS:
                raise ValueError(f"every admin or API key needs at least {_MIN_KEY_CHARS} characters")
        if set(self.admin_keys) & set(self.api_keys):
            raise ValueError("a key cannot be both an admin key and an API key")
        if self.max_batch_tokens < self.max_input_tokens:
            raise ValueError(
                "max_batch_tokens must be at least max_input_tokens, or long inputs could never run"
            )
        if self.max_queue < self.max_inputs:
            raise ValueError(
                "max_queue must be at least max_inputs, or a full-size request could never queue"
            )
        return self

    @property
    def key_file(self) -> Path:
        """Where a generated admin key is kept."""
        if self.admin_key_file is not None:
            return self.admin_key_file
        return admin_key_file(self.store)

    @property
    def poll_interval_s(self) -> float:
        """Seconds between reads of the store's current versions (0: never)."""
        if self.store_poll_s is not None:
            return self.store_poll_s
        return 2.0 if self.store.startswith("s3://") else 0.0


# -- the settings table of the README ------------------------------------------------------------

TABLE_START = "<!-- settings-table:start (generated by `python -m service.settings --update README.md`) -->"
TABLE_END = "<!-- settings-table:end -->"


def _type_of(annotation: object) -> str:
    if get_origin(annotation) is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if get_origin(annotation) is list:
        return "list"
    # `X | None`: the type of X
    kind = next((a for a in get_args(annotation) if a is not type(None)), annotation)
    return {int: "int", float: "float", str: "str", bool: "bool", Path: "path"}.get(kind, "str")


def _default_of(field: FieldInfo) -> str:
    if field.default_factory is list:
        return ""
    if field.default_factory is not None:
        # a computed default: say how it is computed rather than what it is on this machine
        return (field.default_factory.__doc__ or "computed").strip().split("\n")[0]
    value = field.default
    if value is None:
        return ""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        value = "~" + text[len(home) :] if text.startswith(home + "/") else text
    return f"`{value}`"


def markdown_table() -> str:
    """Every setting as a Markdown table (variable, type, default, description), for the README."""
    lines = ["| variable | type | default | description |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        variable = f"`ADAPTERSERVE_{name.upper()}`"
        lines.append(f"| {variable} | {_type_of(field.annotation)} | {_default_of(field)} | {description} |")
    return "\n".join(lines) + "\n"


def update_table(path: Path) -> bool:
    """Rewrite the generated table between the markers in `path`; True when it changed."""
    text = path.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    new = text[:start] + "\n" + markdown_table() + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m service.settings", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print the settings table as Markdown")
    group.add_argument("--update", type=Path, metavar="FILE", help="rewrite the table between its markers")
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table(), end="")
    else:
        update_table(args.update)
