"""Artifact validation through the store: one crafted bad artifact per rule, and every method round-tripped.

The validator is the store's own torch-free pipeline (as the service runs it on upload): the strict
config schema, the backbone fingerprint and shapes from `expected_tensors`, the safetensors header
rules, then the tensors read as finite floats. It runs inside `LocalStore.put_version` on the
private copy, so a refused artifact must leave nothing behind. File-format rules of safetensors
alone are covered in test_safetensors_io.py; writes, races, crashes and damage in test_store_local.py.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import pickle
import signal
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_batch, random_tensors, tiny_bert

from adapters.backbone import Backbone
from adapters.hypernet import Hypernetwork
from adapters.methods import METHODS
from adapters.model import BankConfig, MultiTaskModel
from store import durable
from store.artifact import expected_tensors, parse_config
from store.errors import ArtifactCorrupt, BackboneMismatch, InvalidArtifact, NotSafetensors, PayloadTooLarge
from store.local import LocalStore
from store.safetensors_io import (
    SafetensorsLimits,
    check_expected,
    load_arrays,
    read_header,
    write_safetensors,
)
from store.spec import BackboneSpec

LIMITS = SafetensorsLimits(max_tensors=64, max_file_bytes=64 << 10)
FINGERPRINT = "b" * 64


def _spec(**kw) -> BackboneSpec:
    base = {
        "name": "tiny",
        "family": "bert",
        "model_type": "bert",
        "hidden_size": 32,
        "num_layers": 2,
        "num_decoder_layers": 0,
        "num_heads": 4,
        "head_dim": 8,
        "intermediate_size": 64,
        "vocab_size": 100,
        "max_positions": 64,
        "fingerprint": FINGERPRINT,
    }
    return BackboneSpec(**{**base, **kw})


BERT = _spec()
GPT2 = _spec(family="gpt2", model_type="gpt2", num_layers=0, num_decoder_layers=2)
DISTILBERT = _spec(family="distilbert", model_type="distilbert")


def store_validate(config_bytes: bytes, weights: Path, *, spec: BackboneSpec, limits=LIMITS) -> None:
    """The store's checks of one artifact, in the order the upload path runs them."""
    cfg = parse_config(config_bytes)
    expected = expected_tensors(cfg, spec)
    check_expected(read_header(weights, limits=limits), expected)
    load_arrays(weights, limits=limits, names=list(expected))


# -- a good artifact and the crafted bad ones ------------------------------------------------------


def good_config(**overrides) -> dict:
    """A valid LoRA task for BERT: rank 4 on q and v, a 3-way classifier."""
    cfg = {
        "method": "lora",
        "r": 4,
        "alpha": 8,
        "targets": ["q", "v"],
        "backbone_fingerprint": FINGERPRINT,
        "head": {"type": "classification", "labels": ["neg", "neu", "pos"]},
    }
    return {**cfg, **overrides}


def arrays_for(config: dict, spec: BackboneSpec = BERT, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays of every tensor the config expects."""
    rng = np.random.default_rng(seed)
    shapes = expected_tensors(parse_config(config), spec)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def st_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A safetensors file's bytes, written by the store's own writer."""
    buf = io.BytesIO()
    write_safetensors(buf, arrays)
    return buf.getvalue()


def raw_st(header: dict, data: bytes) -> bytes:
    """A safetensors file with a hand-written header (dtypes the writer refuses to produce)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _cfg(**overrides) -> tuple[bytes, bytes]:
    """A config change only: the weights are the good artifact's."""
    return json.dumps(good_config(**overrides)).encode(), st_bytes(arrays_for(good_config()))


def _without(key: str) -> tuple[bytes, bytes]:
    cfg = good_config()
    del cfg[key]
    return json.dumps(cfg).encode(), st_bytes(arrays_for(good_config()))


def _weights(edit: Callable[[dict[str, np.ndarray]], object]) -> tuple[bytes, bytes]:
    """The good config with its arrays edited."""
    arrays = arrays_for(good_config())
    edit(arrays)
    return json.dumps(good_config()).encode(), st_bytes(arrays)


def _set(arrays: dict, name: str, value: np.ndarray) -> None:
    arrays[name] = value


def _poke(arrays: dict, name: str, value: float) -> None:
    arrays[name].flat[1] = value


def _one_tensor_file(dtype: str, raw: bytes, shape: list[int]) -> tuple[bytes, bytes]:
    """The good artifact with one tensor rewritten as raw bytes of another dtype."""
    cfg = good_config()
    arrays = arrays_for(cfg)
    name = "encoder.0.q.lora.A"
    del arrays[name]
    good = st_bytes(arrays)
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    data = good[8 + n :]
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
    return json.dumps(cfg).encode(), raw_st(header, data + raw)


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
    return buf.getvalue()


def _hyperformer(name: str) -> tuple[bytes, bytes]:
    cfg = {
        "method": "hyperformer",
        "hypernetwork": name,
        "backbone_fingerprint": FINGERPRINT,
        "head": {"type": "regression"},
    }
    return json.dumps(cfg).encode(), st_bytes({"task_embedding": np.zeros(64, np.float32)})


def _for_bert(config: dict) -> tuple[bytes, bytes]:
    """An artifact that is fine for BERT (the case validates it against another backbone)."""
    return json.dumps(config).encode(), st_bytes(arrays_for(config, BERT))


@dataclass(frozen=True)
class Bad:
    """One crafted bad artifact: the rule it breaks, its bytes, the error and a phrase the message must hold."""

    id: str
    make: Callable[[], tuple[bytes, bytes]]
    error: type[Exception]
    needle: str
    spec: BackboneSpec = BERT


BAD = [
    # the config file
    Bad("config_not_json", lambda: (b"{method: lora", st_bytes({})), InvalidArtifact, "not valid JSON"),
    Bad(
        "config_not_utf8",
        lambda: (b'{"method": "lo\xffra"}', st_bytes({})),
        InvalidArtifact,
        "not valid JSON",
    ),
    Bad("config_not_an_object", lambda: (b"[1, 2]", st_bytes({})), InvalidArtifact, "must be a JSON object"),
    Bad("config_over_1_mib", lambda: (b" " * (1 << 20) + b"{}", st_bytes({})), PayloadTooLarge, "exceed"),
    # the schema
    Bad("unknown_key", lambda: _cfg(dropout=0.1), InvalidArtifact, "dropout: Extra inputs are not permitted"),
    Bad("unknown_method", lambda: _cfg(method="vera"), InvalidArtifact, "'vera'"),
    Bad("missing_method", lambda: _without("method"), InvalidArtifact, "discriminator 'method'"),
    Bad(
        "future_format_version",
        lambda: _cfg(format_version=2),
        InvalidArtifact,
        "format_version: Input should be 1",
    ),
    Bad(
        "missing_fingerprint",
        lambda: _without("backbone_fingerprint"),
        InvalidArtifact,
        "backbone_fingerprint: Field required",
    ),
    Bad(
        "field_naming_a_module",
        lambda: _cfg(target_modules=["bert.encoder.layer.0.attention.self.query"]),
        InvalidArtifact,
        "target_modules: Extra inputs",
    ),
    Bad(
        "field_holding_a_url",
        lambda: _cfg(base_model="https://example.com/x"),
        InvalidArtifact,
        "base_model: Extra inputs",
    ),
    Bad(
        "hypernetwork_name_is_a_path",
        lambda: _hyperformer("../../etc"),
        InvalidArtifact,
        "hypernetwork: String should match pattern",
    ),
    Bad(
        "rank_zero", lambda: _cfg(r=0), InvalidArtifact, "lora.r: Input should be greater than or equal to 1"
    ),
    Bad("negative_alpha", lambda: _cfg(alpha=-1), InvalidArtifact, "alpha"),
    Bad("unknown_target", lambda: _cfg(targets=["pooler"]), InvalidArtifact, "targets"),
    Bad("no_targets", lambda: _cfg(targets=[]), InvalidArtifact, "targets"),
    Bad(
        "unknown_activation",
        lambda: (
            json.dumps(
                {**good_config(), "method": "bottleneck", "bottleneck_dim": 4, "activation": "mish"}
            ).encode(),
            b"",
        ),
        InvalidArtifact,
        "activation",
    ),
    Bad(
        "classifier_without_labels",
        lambda: _cfg(head={"type": "classification", "labels": []}),
        InvalidArtifact,
        "at least one label",
    ),
    Bad(
        "duplicate_labels",
        lambda: _cfg(head={"type": "classification", "labels": ["a", "a"]}),
        InvalidArtifact,
        "unique",
    ),
    Bad("unknown_head_type", lambda: _cfg(head={"type": "ranking"}), InvalidArtifact, "head.type"),
    Bad(
        "unknown_head_key", lambda: _cfg(head={"type": "regression", "act": "x"}), InvalidArtifact, "head.act"
    ),
    Bad("nested_metadata", lambda: _cfg(metadata={"eval": {"acc": 0.9}}), InvalidArtifact, "metadata"),
    Bad(
        "too_much_metadata",
        lambda: _cfg(metadata={f"k{i}": i for i in range(65)}),
        InvalidArtifact,
        "metadata",
    ),
    # the config against this backbone
    Bad(
        "other_backbone",
        lambda: _cfg(backbone_fingerprint="c" * 64),
        BackboneMismatch,
        "trained for backbone",
    ),
    Bad(
        "post_norm_on_a_pre_ln_backbone",
        lambda: _for_bert(
            {k: v for k, v in good_config().items() if k not in ("r", "alpha", "targets")}
            | {"method": "bottleneck", "bottleneck_dim": 4, "placement": "post_norm"}
        ),
        BackboneMismatch,
        "needs a post-LN backbone",
        GPT2,
    ),
    Bad(
        "pooler_head_without_a_pooler",
        lambda: _for_bert(good_config(head={"type": "regression", "pooling": "pooler"})),
        BackboneMismatch,
        "pooler",
        DISTILBERT,
    ),
    Bad(
        "phm_dim_not_dividing_hidden",
        lambda: (
            json.dumps(
                {k: v for k, v in good_config().items() if k not in ("r", "alpha", "targets")}
                | {"method": "compacter", "bottleneck_dim": 10, "phm_dim": 5}
            ).encode(),
            b"",
        ),
        BackboneMismatch,
        "phm_dim 5",
    ),
    # the tensors against the config and the backbone
    Bad(
        "missing_tensor",
        lambda: _weights(lambda a: a.pop("encoder.1.v.lora.B")),
        InvalidArtifact,
        "'encoder.1.v.lora.B'",
    ),
    Bad(
        "extra_tensor",
        lambda: _weights(lambda a: _set(a, "encoder.0.k.lora.A", np.zeros((4, 32), np.float32))),
        InvalidArtifact,
        "unexpected tensor 'encoder.0.k.lora.A'",
    ),
    Bad(
        "rank_other_than_configured",
        lambda: _weights(lambda a: _set(a, "encoder.0.q.lora.A", np.zeros((5, 32), np.float32))),
        BackboneMismatch,
        "has shape (5, 32); expected (4, 32)",
    ),
    Bad(
        "shaped_for_a_wider_backbone",
        lambda: _weights(lambda a: _set(a, "encoder.0.q.lora.B", np.zeros((64, 4), np.float32))),
        BackboneMismatch,
        "expected (32, 4)",
    ),
    Bad(
        "rank_pattern_not_followed",
        lambda: (
            json.dumps(good_config(rank_pattern={"v": 2})).encode(),
            st_bytes(arrays_for(good_config())),
        ),
        BackboneMismatch,
        "'encoder.0.v.lora.A' has shape (4, 32); expected (2, 32)",
    ),
    Bad(
        "head_wider_than_its_labels",
        lambda: (
            json.dumps(good_config(head={"type": "classification", "labels": ["a", "b"]})).encode(),
            st_bytes(arrays_for(good_config())),
        ),
        BackboneMismatch,
        "'head.out.weight' has shape (3, 32); expected (2, 32)",
    ),
    Bad(
        "integer_dtype",
        lambda: _one_tensor_file("I32", b"\0" * 512, [4, 32]),
        InvalidArtifact,
        "has dtype I32; allowed dtypes are F32, F16, BF16",
    ),
    Bad(
        "float64_dtype",
        lambda: _one_tensor_file("F64", b"\0" * 1024, [4, 32]),
        InvalidArtifact,
        "has dtype F64",
    ),
    Bad(
        "nan_value",
        lambda: _weights(lambda a: _poke(a, "encoder.1.q.lora.B", np.nan)),
        InvalidArtifact,
        "non-finite",
    ),
    Bad(
        "inf_value",
        lambda: _weights(lambda a: _poke(a, "head.out.bias", np.inf)),
        InvalidArtifact,
        "non-finite",
    ),
    Bad(
        "bf16_inf",
        lambda: _one_tensor_file("BF16", b"\x80\x7f" * 128, [4, 32]),
        InvalidArtifact,
        "non-finite",
    ),
    # the weights file itself
    Bad(
        "weights_a_pickle",
        lambda: (json.dumps(good_config()).encode(), pickle.dumps({"w": 1})),
        NotSafetensors,
        "Python pickle",
    ),
    Bad(
        "weights_a_torch_zip",
        lambda: (json.dumps(good_config()).encode(), _zip()),
        NotSafetensors,
        "zip archive",
    ),
    Bad(
        "weights_truncated",
        lambda: (json.dumps(good_config()).encode(), st_bytes(arrays_for(good_config()))[:-10]),
        InvalidArtifact,
        "fall outside the data buffer",
    ),
    Bad(
        "weights_over_the_size_limit",
        lambda: (json.dumps(good_config()).encode(), b"\0" * (LIMITS.max_file_bytes + 1)),
        PayloadTooLarge,
        "exceed",
    ),
    Bad(
        "more_tensors_than_allowed",
        lambda: _weights(
            lambda a: a.update({f"x{i}": np.zeros(1, np.float32) for i in range(LIMITS.max_tensors)})
        ),
        PayloadTooLarge,
        "more than 64 tensors",
    ),
]


def test_enough_kinds_of_bad_artifact() -> None:
    assert len(BAD) >= 20
    assert len({b.id for b in BAD}) == len(BAD)


def test_the_good_artifact_is_stored(tmp_path: Path) -> None:
    """The baseline every bad artifact departs from passes, so each refusal below is its rule's."""
    store = LocalStore(tmp_path / "store", limits=LIMITS)
    src = tmp_path / "w.safetensors"
    src.write_bytes(st_bytes(arrays_for(good_config())))
    info = store.put_version(
        "tasks",
        "t",
        config_bytes=json.dumps(good_config()).encode(),
        weights_src=src,
        validate=partial(store_validate, spec=BERT),
    )
    assert store.get("tasks", "t").info == info


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_artifact_is_refused_and_nothing_is_stored(tmp_path: Path, bad: Bad) -> None:
    config_bytes, weights = bad.make()
    root = tmp_path / "store"
    store = LocalStore(root, limits=LIMITS)
    src = tmp_path / "upload.safetensors"
    src.write_bytes(weights)
    with pytest.raises(bad.error) as info:
        store.put_version(
            "tasks",
            "t",
            config_bytes=config_bytes,
            weights_src=src,
            validate=partial(store_validate, spec=bad.spec),
        )
    message = str(info.value)
    assert bad.needle in message
    assert str(tmp_path) not in message  # messages never leak server paths
    assert store.list_names("tasks") == []
    left = [p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts]
    assert left == []


# -- round trip of every method through the store ----------------------------------------------------

HEAD = {"type": "classification", "labels": ["a", "b", "c"]}
ROUND_TRIP = {
    "bottleneck": {"method": "bottleneck", "bottleneck_dim": 8, "placement": "post_norm"},
    "parallel": {"method": "parallel", "bottleneck_dim": 8, "learned_scaling": True},
    "lora": {"method": "lora", "r": 4, "targets": ["q", "v", "ffn_out"], "rank_pattern": {"v": 2}},
    "ia3": {"method": "ia3"},
    "layernorm": {"method": "layernorm", "head": {"type": "regression", "pooling": "mean"}},
    "prefix": {"method": "prefix", "prefix_length": 5},
    "mam": {"method": "mam", "prefix_length": 4, "bottleneck_dim": 16},
    "mh_parallel": {"method": "mh_parallel", "bottleneck_dim": 4},
    "compacter": {"method": "compacter", "variant": "compacter++", "bottleneck_dim": 8, "phm_rank": 2},
    "tiny_attention": {"method": "tiny_attention", "attention_dim": 4, "num_heads": 2},
    "hyperformer": {"method": "hyperformer", "hypernetwork": "shared", "task_embedding_dim": 8},
}
HYPERNETWORK = {
    "method": "hypernetwork",
    "bottleneck_dim": 4,
    "task_embedding_dim": 8,
    "layer_embedding_dim": 6,
    "site_embedding_dim": 4,
    "hidden_dim": 16,
    "projected_dim": 12,
}


def test_round_trip_table_covers_every_method() -> None:
    assert set(METHODS) | {"hyperformer"} == set(ROUND_TRIP)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny BERT, a store, and the shared hypernetwork stored and loaded back."""
    backbone = Backbone.from_model(tiny_bert(0))
    spec = backbone.spec
    store = LocalStore(tmp_path_factory.mktemp("store"))
    cfg = parse_config({**HYPERNETWORK, "backbone_fingerprint": spec.fingerprint})
    tensors = random_tensors(cfg, spec, seed=9)
    back_cfg, back = _through_store(
        store, "hypernetworks", "shared", cfg, tensors, spec, tmp_path_factory.mktemp("h")
    )
    assert back_cfg == cfg
    net = Hypernetwork.from_tensors(back_cfg, back, spec)
    model = MultiTaskModel(backbone, banks=BankConfig(slots=3, prefix_max_len=8))
    return {"model": model, "store": store, "net": net, "spec": spec}


def _through_store(store, kind, name, cfg, tensors, spec, tmp: Path):
    """Write an artifact, store it (validated), read it back; the stored bytes are verified on read."""
    src = tmp / f"{name}.safetensors"
    write_safetensors(src, {k: v.numpy() for k, v in tensors.items()})
    config_bytes = json.dumps(cfg.model_dump(mode="json")).encode()
    info = store.put_version(
        kind, name, config_bytes=config_bytes, weights_src=src, validate=partial(store_validate, spec=spec)
    )
    got = store.get(kind, name, info.version)
    assert got.config_bytes == config_bytes and got.weights_path.read_bytes() == src.read_bytes()
    back_cfg = parse_config(got.config_bytes)
    arrays = load_arrays(got.weights_path, limits=SafetensorsLimits())
    return back_cfg, {k: torch.from_numpy(v) for k, v in arrays.items()}


@pytest.mark.parametrize("method", sorted(ROUND_TRIP))
def test_every_method_round_trips_through_the_store(served, method: str, tmp_path: Path) -> None:
    """Config and tensors come back bit for bit, and the stored copy serves identical outputs."""
    spec, model = served["spec"], served["model"]
    raw = {"head": HEAD, **ROUND_TRIP[method], "backbone_fingerprint": spec.fingerprint}
    cfg = parse_config(raw)
    tensors = random_tensors(cfg, spec, seed=1)
    back_cfg, back = _through_store(
        served["store"], "tasks", method.replace("_", "-"), cfg, tensors, spec, tmp_path
    )
    assert back_cfg == cfg
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    net = served["net"] if method == "hyperformer" else None
    model.load(1, cfg, tensors, hypernetwork=net)
    model.load(2, back_cfg, back, hypernetwork=net)
    try:
        ids, mask = (lambda b: (b.input_ids, b.attention_mask))(make_batch([6, 4, 5], family="bert", seed=2))
        direct = model.hidden(ids, mask, [1, 1, 1]), model.classify(ids, mask, [1, 1, 1]).logits
        stored = model.hidden(ids, mask, [2, 2, 2]), model.classify(ids, mask, [2, 2, 2]).logits
        assert torch.equal(direct[0], stored[0]) and torch.equal(direct[1], stored[1])
        # the adapter is live, so the equality is not that of two no-ops
        assert float((direct[0] - model.hidden(ids, mask, [0, 0, 0])).abs().max()) > 1e-3
    finally:
        model.evict(1)
        model.evict(2)


# -- SIGKILL at every system call of a write; a flipped byte anywhere -----------------------------------

# fork: the child inherits the patched file-system object without pickling it.
FORK = mp.get_context("fork")
WRITTEN = good_config()
CHUNK = 1024
"""The child writes in 1 KiB chunks (the store's are 1 MiB), so the ~4 KiB weights take several writes."""


class _KillingFS(durable.FS):
    """Counts the write path's system calls and SIGKILLs the process at call `at` (a write: half done)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def _tick(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGKILL)

    def write(self, fd, data):  # type: ignore[no-untyped-def]
        if self.calls + 1 == self.at:
            super().write(fd, data[: len(data) // 2])  # a torn write, then the kill
        self._tick()
        return super().write(fd, data)


def _killing(name: str):  # type: ignore[no-untyped-def]
    base = getattr(durable.FS, name)

    def call(self, *args):  # type: ignore[no-untyped-def]
        self._tick()
        return base(self, *args)

    return call


for _name in ("open", "fsync", "close", "mkdir", "rename", "replace"):
    setattr(_KillingFS, _name, _killing(_name))


def _put_one(root: Path, src: Path) -> object:
    store = LocalStore(root)
    return store.put_version(
        "tasks",
        "t",
        config_bytes=json.dumps(WRITTEN).encode(),
        weights_src=src,
        validate=partial(store_validate, spec=BERT),
    )


def _killed_at(root: Path, src: Path, at: int) -> int:
    """Run one write in a child killed at system call `at`; its exit code (0: it finished first)."""

    def child() -> None:
        durable.fs = _KillingFS(at)
        durable._CHUNK = CHUNK
        _put_one(root, src)
        os._exit(0)

    proc = FORK.Process(target=child)
    proc.start()
    proc.join(timeout=60)
    return proc.exitcode


def test_sigkill_at_every_system_call_of_a_write(tmp_path: Path) -> None:
    """Killed at any open/write/fsync/close/mkdir/rename of a write (torn writes too), the store reopens
    with the new version either absent or complete and verified, and goes on working."""
    src = tmp_path / "w.safetensors"
    src.write_bytes(st_bytes(arrays_for(WRITTEN, seed=4)))
    config_bytes = json.dumps(WRITTEN).encode()
    killed = 0
    for at in range(1, 200):
        root = tmp_path / f"r{at}"
        first = _put_one(root, tmp_path / "w.safetensors")
        code = _killed_at(root, src, at)
        if code == 0:
            break
        assert code == -signal.SIGKILL
        killed += 1
        store = LocalStore(root)  # recovery at open
        assert [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".trash-"))] == []
        versions = [v.version for v in store.list_versions("tasks", "t")]
        assert versions in ([1], [1, 2]), f"killed at call {at}: versions {versions}"
        for v in versions:
            got = store.get("tasks", "t", v)  # checks both sha256 against the manifest
            assert got.config_bytes == config_bytes and got.weights_path.read_bytes() == src.read_bytes()
        assert store.current_version("tasks", "t") in versions
        assert store.get("tasks", "t", 1).info == first
        assert _put_one(root, src).version == versions[-1] + 1
    assert killed >= 20, f"a write made only {killed} system calls"
    assert code == 0


def test_a_flipped_byte_anywhere_is_detected_on_read(tmp_path: Path) -> None:
    """Flip one bit at positions spread over both stored files: every read of that version refuses it."""
    store = LocalStore(tmp_path / "store", limits=LIMITS)
    src = tmp_path / "w.safetensors"
    src.write_bytes(st_bytes(arrays_for(good_config())))
    info = store.put_version(
        "tasks",
        "t",
        config_bytes=json.dumps(good_config()).encode(),
        weights_src=src,
        validate=partial(store_validate, spec=BERT),
    )
    vdir = store.get("tasks", "t").weights_path.parent
    for name in ("adapter_config.json", "adapter.safetensors"):
        path = vdir / name
        original = path.read_bytes()
        for offset in sorted({0, 7, 8, len(original) // 3, len(original) // 2, len(original) - 1}):
            damaged = bytearray(original)
            damaged[offset] ^= 0x10
            path.write_bytes(bytes(damaged))
            with pytest.raises(ArtifactCorrupt, match="task 't' version 1"):
                store.get("tasks", "t", info.version)
            path.write_bytes(original)
            assert store.get("tasks", "t", info.version).info == info


def test_tiny_attention_stacks_default_to_the_encoder_and_a_missing_stack_is_refused() -> None:
    """Artifacts without `stacks` keep their encoder-only layout; a decoder-only model adapts its decoder."""
    from helpers import wrap

    t5, gpt2 = wrap("t5").spec, wrap("gpt2").spec
    raw = {"method": "tiny_attention", "attention_dim": 2, "num_heads": 1}

    def stacks_of(spec, **kw) -> dict[str, int]:
        cfg = parse_config({**raw, **kw, "backbone_fingerprint": spec.fingerprint})
        names = expected_tensors(cfg, spec)
        return {s: sum(n.startswith(f"{s}.") for n in names) for s in ("encoder", "decoder")}

    # ten tensors per adapted layer (LN, in, qkv, o, out: weights and biases)
    assert stacks_of(t5) == {"encoder": 10 * t5.num_layers, "decoder": 0}
    assert stacks_of(gpt2) == {"encoder": 0, "decoder": 10 * gpt2.num_decoder_layers}
    both = stacks_of(t5, stacks=["encoder", "decoder"])
    assert both == {"encoder": 10 * t5.num_layers, "decoder": 10 * t5.num_decoder_layers}
    with pytest.raises(BackboneMismatch, match="encoder stack"):
        stacks_of(gpt2, stacks=["encoder"])
    with pytest.raises(InvalidArtifact):
        stacks_of(t5, stacks=["middle"])
