"""What a training run shows and records: a progress bar, one line per evaluation, a metrics file.

The metrics file (`metrics.jsonl`, beside the artifact) holds one JSON object per evaluation and
a last `"event": "done"` line with the result, so a run can be followed (`tail -f`) and compared
afterwards without parsing the terminal.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

__all__ = ["METRICS_FILE", "Progress", "format_seconds"]

METRICS_FILE = "metrics.jsonl"


def format_seconds(seconds: float) -> str:
    """`1h02m`, `3m05s` or `42s` (`?` before there is a pace to go by)."""
    if seconds != seconds:  # NaN
        return "?"
    s = round(max(seconds, 0.0))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Steps, loss, dev metric and time left, on a bar (stderr) and in the metrics file."""

    def __init__(
        self, *, desc: str, total: int, start: int, enabled: bool, metrics: Path | None, history: list[dict]
    ) -> None:
        self.total, self.start, self.done = total, start, start
        self.began = time.perf_counter()
        self.desc = desc
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=not enabled, leave=False)
        self.enabled = enabled
        self.path = metrics
        if metrics is not None:
            metrics.parent.mkdir(parents=True, exist_ok=True)
            # a resumed run rewrites what its checkpoint knew, then appends
            metrics.write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")

    def left(self) -> float:
        """Seconds to the last step, at this session's average pace."""
        steps = self.done - self.start
        if steps <= 0:
            return float("nan")
        return (time.perf_counter() - self.began) / steps * (self.total - self.done)

    def step(self, *, loss: float, lr: float) -> None:
        """One optimizer step taken."""
        self.done += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def evaluated(self, record: dict, *, best: float) -> None:
        """A dev evaluation: a line above the bar and a line in the metrics file (`record` gains `left_s`)."""
        left = self.left()
        record["left_s"] = round(left, 1) if left == left else None
        self.bar.set_description(f"{self.desc} dev {record['score']:.4f}")
        if self.enabled:
            tqdm.write(
                f"step {record['step']}/{self.total}  loss {record['loss']:.4f}  dev {record['score']:.4f} "
                f"(best {best:.4f})  {format_seconds(record['elapsed_s'])} elapsed, "
                f"{format_seconds(left)} left",
                file=sys.stderr,
            )
        self.write(record)

    def write(self, record: dict) -> None:
        """Append one JSON line to the metrics file (if there is one)."""
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()
