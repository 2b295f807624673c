"""Write a trained adapter as a native artifact directory, and send it to a server (`train --upload`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from store.safetensors_io import write_safetensors

__all__ = ["upload", "write_artifact"]


def write_artifact(directory: str | Path, config, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `adapter_config.json` and `adapter.safetensors` (float32) into a directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().float().cpu().contiguous().numpy() for k, v in tensors.items()}
    tmp = out / ".adapter.safetensors.tmp"
    write_safetensors(tmp, arrays)
    tmp.replace(out / "adapter.safetensors")
    text = json.dumps(config.model_dump(mode="json"), indent=2) + "\n"
    tmp = out / ".adapter_config.json.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out / "adapter_config.json")
    return out


def upload(directory: str | Path, *, url: str, task: str, key: str | None = None) -> dict:
    """POST an artifact directory to a server as a new version of `task`; returns the server's answer.

    This is `train --upload`: a refused or failed upload exits (SystemExit, status 1) with the
    server's reason and where the artifact is kept, never with a traceback.
    """
    import httpx

    d = Path(directory)
    target = url.rstrip("/")
    if "/v1/adapters/" not in target:
        target = f"{target}/v1/adapters/{task}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    kept = f"the artifact is kept in {d} (adapterserve upload {task} {d} sends it again)"
    config = (d / "adapter_config.json").read_bytes()
    try:
        with open(d / "adapter.safetensors", "rb") as weights:
            files = {
                "config": ("adapter_config.json", config, "application/json"),
                "weights": ("adapter.safetensors", weights, "application/octet-stream"),
            }
            resp = httpx.post(target, files=files, headers=headers, timeout=120.0)
    except httpx.HTTPError as exc:
        raise SystemExit(f"adapterserve train: could not upload to {target}: {exc}; {kept}") from None
    if not resp.is_success:
        try:
            error = resp.json()["error"]
            reason = f"{error['type']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            reason = resp.text[:300]
        raise SystemExit(
            f"adapterserve train: {target} refused the upload of {task!r}: {resp.status_code} {reason}; {kept}"
        )
    return resp.json()
