"""Stream a multipart upload (parts `config` and `weights`) to a temporary file under a byte limit.

The body is parsed as it arrives: the weights go straight to disk, the config stays in memory, and
the request fails with 413 as soon as the limit is crossed, without reading the rest.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from store.durable import io_error, io_errors
from store.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

__all__ = ["MAX_CONFIG_BYTES", "Upload", "read_upload"]

MAX_CONFIG_BYTES = 64 << 10
_PARTS = ("config", "weights")


@dataclass
class Upload:
    """A received upload: the config's bytes and the weights in a temporary file (caller removes it)."""

    config: bytes
    weights_path: Path
    weights_bytes: int

    def remove(self) -> None:
        """Delete the temporary weights file."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.weights_path)


class _Collector:
    """python-multipart callbacks that route each part to memory or the temp file."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.config = bytearray()
        self.weights = 0
        self.seen: set[str] = set()
        self.part: str | None = None
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""

    def on_part_begin(self) -> None:
        self.part = None
        self._disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("latin-1")
        if name not in _PARTS:
            raise InvalidRequest(
                f"unexpected multipart part {name[:40]!r}; send parts 'config' and 'weights'"
            )
        if name in self.seen:
            raise InvalidRequest(f"multipart part {name!r} appears twice")
        self.seen.add(name)
        self.part = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.part == "config":
            if len(self.config) + len(chunk) > MAX_CONFIG_BYTES:
                raise PayloadTooLarge(f"the config part exceeds {MAX_CONFIG_BYTES} bytes")
            self.config += chunk
        elif self.part == "weights":
            # Small writes to the page cache; not worth a thread hop per chunk.
            self.fh.write(chunk)
            self.weights += len(chunk)


async def read_upload(request: Request, *, max_bytes: int, tmp_dir: Path | None) -> Upload:
    """Parse a multipart upload from the request stream; raises 413, 415 or 400 as it goes."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise UnsupportedMediaType(
            "uploads are multipart/form-data with parts 'config' (JSON) and 'weights' (safetensors)"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest("the multipart Content-Type has no boundary")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the upload is {declared} bytes; the limit is {max_bytes}", limit=max_bytes)
    with io_errors("receiving the upload", undone=True):
        fd, name = tempfile.mkstemp(prefix="adapterserve-upload-", suffix=".safetensors", dir=tmp_dir)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            collector = _Collector(fh)
            parser = MultipartParser(boundary, callbacks=_callbacks(collector))
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise PayloadTooLarge(
                        f"the upload exceeds the limit of {max_bytes} bytes", limit=max_bytes
                    )
                parser.write(chunk)
            parser.finalize()
        missing = [p for p in _PARTS if p not in collector.seen]
        if missing:
            raise InvalidRequest(f"the upload lacks the multipart part {missing[0]!r}")
        return Upload(config=bytes(collector.config), weights_path=path, weights_bytes=collector.weights)
    except FormParserError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise InvalidRequest("the multipart body is malformed") from None
    except OSError as exc:
        # A full or failing spool disk is the server's problem (507/503), never a 500 with a path.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise io_error(exc, "receiving the upload", undone=True) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def _callbacks(c: _Collector) -> dict:
    return {
        "on_part_begin": c.on_part_begin,
        "on_part_data": c.on_part_data,
        "on_header_field": c.on_header_field,
        "on_header_value": c.on_header_value,
        "on_header_end": c.on_header_end,
        "on_headers_finished": c.on_headers_finished,
    }
