"""The peer row of bench/http.py: LitServe serving the plain bundled MiniLM-L6, one model, no adapters.

    python bench/peer_litserve.py --port 18500 [--max-batch-size 32] [--batch-timeout 0.005]

`POST /predict` takes the same body as ours (`{"inputs": ["a sentence"]}`, one input) and answers
the mean-pooled embedding's first coordinate as a score: the backbone's forward and a tiny output,
the least a classification service could do. LitServe's API server and inference worker run in
separate processes; batches of up to `--max-batch-size` form within `--batch-timeout` seconds.
`litserve` is a benchmark extra (`pip install litserve`), never a dependency of the service.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, where bench/http.py would shadow the
# standard library's `http` package (LitServe's worker processes start the same way).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import litserve as ls  # noqa: E402
import torch  # noqa: E402


class PlainBackbone(ls.LitAPI):
    """Tokenize a batch, run the plain encoder once, mean-pool."""

    def setup(self, device: str) -> None:
        """Load the bundled MiniLM-L6 (no download)."""
        from adapters.backbone import load_backbone

        backbone = load_backbone(device="cpu", dtype="float32")
        self.model, self.tokenizer = backbone.core, backbone.tokenizer

    def decode_request(self, request: dict) -> str:
        """The request's one input."""
        return request["inputs"][0]

    def predict(self, texts: list[str]) -> list[float]:
        """One forward over the batch."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return pooled[:, 0].tolist()

    def encode_response(self, output: float) -> dict:
        """The same shape of answer as ours."""
        return {"outputs": [{"score": output}]}


def main() -> None:
    """Serve until terminated."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=18500)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.005)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    server = ls.LitServer(
        PlainBackbone(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout),
        accelerator="cpu",
        workers_per_device=1,
    )
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
