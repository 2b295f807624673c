"""Helpers of the API tests: a tiny in-process BERT (and GPT-2) backbone, artifacts, expected outputs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
from helpers import classify_each, load_artifact_dir
from transformers import BertConfig, BertModel, BertTokenizerFast

from adapters.backbone import Backbone
from adapters.model import BankConfig, MultiTaskModel
from store.artifact import expected_tensors, parse_config
from store.safetensors_io import write_safetensors

ADMIN = "admin-key-0123456789abcdef"
API = "api-key-0123456789abcdef"
# fmt: off
WORDS = [
    "the", "a", "an", "movie", "film", "plot", "actor", "actress", "good", "bad", "great", "awful", "boring",
    "fun", "is", "was", "not", "very", "really", "and", "but", "story", "music", "scene", "ending", "long",
    "short", "loved", "hated", "it", "this", "that", "i", "you",
]
# fmt: on
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + WORDS


def tiny_tokenizer() -> BertTokenizerFast:
    """A word-level BERT tokenizer over a small fixed vocabulary."""
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})


def tiny_bert(seed: int = 0) -> BertModel:
    """BERT with hidden 32, 2 layers, 4 heads; the same seed gives the same weights."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


def tiny_backbone(seed: int = 0) -> Backbone:
    """A fresh tiny backbone (each MultiTaskModel changes its backbone's module tree, so one each)."""
    return Backbone.from_model(tiny_bert(seed), tokenizer=tiny_tokenizer(), name="tiny-bert")


HEADS = {
    "classification": {"type": "classification", "labels": ["negative", "positive"]},
    "three": {"type": "classification", "labels": ["a", "b", "c"]},
    "regression": {"type": "regression"},
}
HYPER = {
    "lora": {"r": 4, "alpha": 8.0},
    "bottleneck": {"bottleneck_dim": 8},
    "parallel": {"bottleneck_dim": 8, "scaling": 4.0},
    "ia3": {},
    "layernorm": {},
    "compacter": {"variant": "compacter", "bottleneck_dim": 8, "phm_dim": 4},
}


def artifact_config(method: str, fingerprint: str, *, head: str = "classification", **overrides) -> dict:
    """An adapter_config.json for a method, with small hyperparameters."""
    cfg = {"method": method, "backbone_fingerprint": fingerprint, **HYPER[method], "head": HEADS[head]}
    cfg.update(overrides)
    return cfg


def random_arrays(config: dict, spec, *, seed: int, scale: float = 0.5) -> dict[str, np.ndarray]:
    """Random float32 tensors with exactly the names and shapes the config implies."""
    rng = np.random.default_rng(seed)
    shapes = expected_tensors(parse_config(config), spec)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def write_artifact(directory: Path, config: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write an artifact directory (adapter_config.json + adapter.safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    write_safetensors(directory / "adapter.safetensors", arrays)
    return directory


def make_artifact(
    root: Path, name: str, method: str, spec, *, seed: int, head: str = "classification"
) -> Path:
    """A random artifact of a method for the backbone `spec`."""
    config = artifact_config(method, spec.fingerprint, head=head)
    return write_artifact(root / name, config, random_arrays(config, spec, seed=seed))


def multipart(directory: Path) -> dict:
    """httpx `files=` for an artifact directory."""
    return {
        "config": (
            "adapter_config.json",
            (directory / "adapter_config.json").read_bytes(),
            "application/json",
        ),
        "weights": (
            "adapter.safetensors",
            (directory / "adapter.safetensors").read_bytes(),
            "application/octet-stream",
        ),
    }


class Reference:
    """In-process expected outputs: one adapter on a fresh backbone, one input at a time, no batching."""

    def __init__(self, make_backbone: Callable[[], Backbone]) -> None:
        self.model = MultiTaskModel(make_backbone(), banks=BankConfig(slots=2))
        self.tok = self.model.backbone.tokenizer

    def outputs(
        self, directory: Path, inputs: list, *, all_scores: bool = False, max_len: int = 256
    ) -> list[dict]:
        """What the server should answer for `inputs` with the artifact in `directory`."""
        return classify_each(self.model, directory, inputs, all_scores=all_scores, max_len=max_len)


def assert_outputs_close(got: list[dict], want: list[dict], *, tol: float = 1e-4) -> None:
    """Labels equal; scores and values equal within `tol` (batching pads, which moves the last bits)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.get("label") == w.get("label")
        for field in ("score", "value"):
            if field in w:
                assert abs(g[field] - w[field]) < tol, (field, g, w)
        if "scores" in w:
            assert g["scores"].keys() == w["scores"].keys()
            assert list(g["scores"]) == list(w["scores"])
            for k in w["scores"]:
                assert abs(g["scores"][k] - w["scores"][k]) < tol


def admin(key: str = ADMIN) -> dict:
    """Authorization header of a key."""
    return {"Authorization": f"Bearer {key}"}


GEN_WORDS = ["<pad>", "<unk>", "<eos>", *WORDS]


def word_tokenizer(words: list[str]):
    """A whitespace word-level fast tokenizer over `words` ("<pad>", "<unk>", "<eos>" among them), no special tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def tiny_gpt2_backbone(seed: int = 0) -> Backbone:
    """A decoder-only GPT-2 (hidden 32, 2 layers) with a word-level tokenizer, for generation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = word_tokenizer(GEN_WORDS)
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(GEN_WORDS),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        pad_token_id=0,
        eos_token_id=2,
    )
    return Backbone.from_model(GPT2LMHeadModel(cfg).eval(), tokenizer=tok, name="tiny-gpt2")


def reference_generation(directory: Path, prompts: list[str], *, max_new_tokens: int) -> list[str]:
    """Greedy generation of each prompt alone with the artifact in `directory`, on a fresh tiny GPT-2."""
    model = MultiTaskModel(tiny_gpt2_backbone(), banks=BankConfig(slots=2))
    load_artifact_dir(model, directory)
    tok = model.backbone.tokenizer
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        new = model.generate(enc["input_ids"], enc["attention_mask"], [1], max_new_tokens=max_new_tokens)
        out.append(tok.decode(new[0].tolist(), skip_special_tokens=True))
    return out


async def until(cond: Callable[[], bool], *, timeout: float = 10.0) -> None:
    """Wait until `cond()` holds (state changes come from other tasks and threads), checking every millisecond.

    Not a busy `sleep(0)` loop: that keeps the event loop's thread runnable, so the device worker
    thread waits for the GIL after every torch call that released it (a forward of 32 rows then
    took seconds, and the load battery's 10 s waits ran out).
    """
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


class WorkerGate:
    """Holds the device worker thread busy until opened, so requests pile up deterministically."""

    def __init__(self, service) -> None:
        self.service = service
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.job: asyncio.Future | None = None

    async def __aenter__(self) -> WorkerGate:
        def block() -> None:
            self.entered.set()
            self.gate.wait(30)

        self.job = asyncio.ensure_future(self.service.engine.call(block))
        await asyncio.to_thread(self.entered.wait, 10)
        return self

    def open(self) -> None:
        """Let the worker go on."""
        self.gate.set()

    async def __aexit__(self, *exc) -> None:
        self.gate.set()
        await self.job


@contextlib.asynccontextmanager
async def app_client(settings, *, backbone: Backbone, timeout: float = 5.0):
    """The real app (ASGI, in process) with `settings`, started and ready: a client."""
    from service.app import create_app

    app = create_app(settings, backbone=backbone)
    async with app.router.lifespan_context(app):
        await app.state.service.ready.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=timeout) as client:
            yield client


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, artifact: Path, *, task: str, backbone: Backbone):
    """The real app (ASGI, in process) serving one artifact as `task` from a fresh store: a client."""
    from service.settings import Settings
    from store.local import LocalStore

    LocalStore(tmp_path / "store").put_version(
        "tasks",
        task,
        config_bytes=(artifact / "adapter_config.json").read_bytes(),
        weights_src=artifact / "adapter.safetensors",
    )
    settings = Settings(store=tmp_path / "store", admin_keys=[ADMIN], seed_dir=None, max_wait_ms=1.0, slots=4)
    async with app_client(settings, backbone=backbone) as client:
        yield client
