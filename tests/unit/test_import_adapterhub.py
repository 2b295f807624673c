"""AdapterHub import: our model reproduces the outputs AdapterHub itself computed, config by config.

The fixtures in tests/fixtures/adapterhub/ were written by tests/fixtures/make_adapterhub.py in a
throwaway environment with AdapterHub's `adapters` library (it needs transformers 4.x and shares
this project's import name, so it never enters ours). Each config directory holds AdapterHub's
checkpoint and the logits and last hidden states AdapterHub computed on the shared inputs.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_distilbert
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from adapters.backbone import Backbone
from adapters.formats import import_adapterhub
from adapters.model import BankConfig, MultiTaskModel
from store.artifact import expected_tensors, parse_config
from store.errors import InvalidArtifact
from store.safetensors_io import SafetensorsLimits, check_expected, load_arrays, read_header

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "adapterhub"
CONFIGS: list[str] = json.loads((FIXTURES / "MANIFEST.json").read_text())["configs"]
TOL = 1e-4
"""The issue's bound on the largest absolute difference to AdapterHub's own outputs."""
MOVED = 1e-2
"""AdapterHub's output with the adapter differs from the plain backbone by more than this."""

# What each fixture's head becomes natively: (type, labels, pooling, layers).
HEADS = {
    "seq_bn": ("classification", ["neg", "neu", "pos"], "cls", 2),
    "double_seq_bn": ("classification", ["LABEL_0", "LABEL_1", "LABEL_2"], "pooler", 1),
    "par_bn": ("regression", [], "cls", 2),
    "scaled_par_bn": ("multi_label", ["LABEL_0", "LABEL_1", "LABEL_2"], "cls", 2),
    "mam": ("classification", ["LABEL_0", "LABEL_1", "LABEL_2"], "cls", 1),
}
# The native method each AdapterHub config maps to (compacter with per-layer rules is dense).
METHODS = {
    "seq_bn": "bottleneck",
    "double_seq_bn": "bottleneck",
    "par_bn": "parallel",
    "scaled_par_bn": "parallel",
    "compacter": "compacter",
    "compacterpp": "compacter",
    "compacter_layer_rules": "bottleneck",
    "seq_bn_widths": "bottleneck",
    "prefix_tuning": "prefix",
    "prefix_tuning_flat": "prefix",
    "lora": "lora",
    "lora_pre110": "lora",
    "ia3": "ia3",
    "mam": "mam",
}


def _backbone() -> Backbone:
    cfg = BertConfig(
        **json.loads((FIXTURES / "base" / "config.json").read_text()), attn_implementation="sdpa"
    )
    model = BertModel(cfg, add_pooling_layer=True)
    model.load_state_dict(load_file(str(FIXTURES / "base" / "model.safetensors")), strict=True)
    return Backbone.from_model(model, name="adapterhub-tiny-bert")


def store_validate(directory: Path, spec) -> dict[str, torch.Tensor]:
    """The store's torch-free checks of a native artifact directory; its tensors when it passes."""
    limits = SafetensorsLimits()
    cfg = parse_config((directory / "adapter_config.json").read_bytes())
    weights = directory / "adapter.safetensors"
    expected = expected_tensors(cfg, spec)
    check_expected(read_header(weights, limits=limits), expected)
    return {
        k: torch.from_numpy(v) for k, v in load_arrays(weights, limits=limits, names=list(expected)).items()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The fixture backbone, every config imported and validated, and all of them loaded in one model."""
    backbone = _backbone()
    model = MultiTaskModel(backbone, banks=BankConfig(slots=len(CONFIGS) + 2, prefix_max_len=8))
    inputs = load_file(str(FIXTURES / "inputs.safetensors"))
    imported = {}
    for slot, name in enumerate(CONFIGS, start=1):
        out = tmp_path_factory.mktemp(name)
        returned = import_adapterhub(FIXTURES / name, out, spec=backbone.spec)
        cfg = parse_config((out / "adapter_config.json").read_bytes())
        assert cfg == returned
        tensors = store_validate(out, backbone.spec)
        model.load(slot, cfg, tensors)
        imported[name] = (slot, cfg, tensors)
    return {"model": model, "inputs": inputs, "imported": imported, "spec": backbone.spec}


def _reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "reference.safetensors"))


def _outputs(model: MultiTaskModel, ids, mask, slots) -> tuple[torch.Tensor, torch.Tensor]:
    return model.hidden(ids, mask, slots), model.classify(ids, mask, slots).logits


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_fixture_backbone_matches_adapterhubs_base() -> None:
    """Without an adapter our model computes AdapterHub's base model (so the checks below compare adapters)."""
    model = MultiTaskModel(_backbone(), banks=BankConfig(slots=2))
    inputs = load_file(str(FIXTURES / "inputs.safetensors"))
    hidden = model.hidden(inputs["input_ids"], inputs["attention_mask"], [0, 0, 0])
    assert _diff(hidden, load_file(str(FIXTURES / "base_reference.safetensors"))["hidden"]) <= TOL


def test_manifest_lists_every_config_directory() -> None:
    dirs = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())
    assert sorted(CONFIGS) == dirs
    assert set(METHODS) == set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_import_reproduces_adapterhub(world, name: str) -> None:
    """Logits and last hidden states of every imported config equal AdapterHub's within 1e-4."""
    slot, cfg, _ = world["imported"][name]
    assert cfg.method == METHODS[name]
    assert cfg.metadata["source"] == "adapterhub" and cfg.metadata["name"] == name
    ids, mask = world["inputs"]["input_ids"], world["inputs"]["attention_mask"]
    ref = _reference(name)
    hidden, logits = _outputs(world["model"], ids, mask, [slot] * len(ids))
    n = ref["logits"].shape[-1]
    assert _diff(hidden, ref["hidden"]) <= TOL, f"{name}: hidden states differ"
    assert _diff(logits[:, :n], ref["logits"]) <= TOL, f"{name}: logits differ"
    # The reference really depends on the adapter, so equality above is not the backbone's alone.
    base = world["model"].hidden(ids, mask, [0] * len(ids))
    assert _diff(ref["hidden"], base) > MOVED


def test_mixed_batch_of_every_imported_adapter(world) -> None:
    """One forward over all imported adapters (and the plain backbone), rows interleaved, matches each."""
    ids, mask = world["inputs"]["input_ids"], world["inputs"]["attention_mask"]
    rows = [(name, j) for name in [*CONFIGS, None] for j in range(len(ids))]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [rows[k] for k in order]
    slots = [world["imported"][name][0] if name else 0 for name, _ in rows]
    pick = torch.tensor([j for _, j in rows])
    hidden, logits = _outputs(world["model"], ids[pick], mask[pick], slots)
    base = load_file(str(FIXTURES / "base_reference.safetensors"))["hidden"]
    for i, (name, j) in enumerate(rows):
        if name is None:
            assert _diff(hidden[i], base[j]) <= TOL
            continue
        ref = _reference(name)
        n = ref["logits"].shape[-1]
        assert _diff(hidden[i], ref["hidden"][j]) <= TOL, f"row {i} ({name}): hidden states differ"
        assert _diff(logits[i, :n], ref["logits"][j]) <= TOL, f"row {i} ({name}): logits differ"


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_keep_their_kind_and_labels(world, name: str) -> None:
    head = world["imported"][name][1].head
    assert (head.type, head.labels, head.pooling, head.layers) == HEADS[name]


def test_layer_rules_and_widths_are_expanded(world) -> None:
    """Per-layer PHM rules become dense bottlenecks; a layer left out holds an exact no-op."""
    _, cfg, tensors = world["imported"]["seq_bn_widths"]
    assert cfg.bottleneck_dim == 8  # layer 0: reduction 4 of hidden 32, layer 1 left out
    assert all(float(t.abs().max()) == 0.0 for k, t in tensors.items() if k.startswith("encoder.1."))
    assert world["imported"]["compacter"][1].variant == "compacter"
    assert world["imported"]["compacterpp"][1].variant == "compacter++"


# Each detail below is one AdapterHub subtlety; serving the checkpoint without it moves the outputs
# away from AdapterHub's (so the equality tests above would catch an importer that forgot it).
WRONG = {
    # seq_bn reads the sublayer's normed output and the norm is applied again
    "seq_bn": lambda cfg, t: (cfg.model_copy(update={"placement": "output"}), t),
    # scaled_par_bn's scale is learned (here around 1.5), not 1
    "scaled_par_bn": lambda cfg, t: (
        cfg,
        {k: torch.ones_like(v) if k.endswith(".scale") else v for k, v in t.items()},
    ),
    # adapters < 1.1.0 ignored alpha (an effective alpha of r)
    "lora_pre110": lambda cfg, t: (cfg.model_copy(update={"alpha": 16.0}), t),
    # MAM's parallel adapter is scaled by 4
    "mam": lambda cfg, t: (cfg.model_copy(update={"scaling": 1.0}), t),
}


@pytest.mark.parametrize("name", sorted(WRONG))
def test_each_placement_detail_matters(world, name: str) -> None:
    _, cfg, tensors = world["imported"][name]
    wrong_cfg, wrong_tensors = WRONG[name](cfg, tensors)
    model = world["model"]
    spare = len(CONFIGS) + 1
    model.load(spare, wrong_cfg, wrong_tensors)
    try:
        ids, mask = world["inputs"]["input_ids"], world["inputs"]["attention_mask"]
        hidden = model.hidden(ids, mask, [spare] * len(ids))
    finally:
        model.evict(spare)
    assert _diff(hidden, _reference(name)["hidden"]) > 10 * TOL


def test_lora_alpha_follows_the_writing_version(world) -> None:
    assert world["imported"]["lora_pre110"][1].alpha == 4.0  # r: adapters 1.0.x applied no scaling
    assert world["imported"]["lora"][1].alpha == 8.0


def _edit(key: str, value: object, *, inner: bool = True, file: str = "adapter_config.json"):
    def edit(meta: dict) -> None:
        (meta["config"] if inner else meta)[key] = value

    return file, edit


# (fixture, edit of one of its JSON files, phrase of the refusal)
REFUSED = [
    ("seq_bn", _edit("model_type", "roberta", inner=False), "made for a roberta model"),
    ("seq_bn", _edit("hidden_size", 64, inner=False), "hidden size 64"),
    ("seq_bn", _edit("ln_before", True), "ln_before=true"),
    ("par_bn", _edit("use_gating", True), "use_gating=true"),
    ("seq_bn", _edit("original_ln_after", False), "original_ln_after=false"),
    ("seq_bn", _edit("scaling", "per_token"), "scaling 'per_token'"),
    ("seq_bn", _edit("non_linearity", "mish"), "activation 'mish'"),
    ("seq_bn", _edit("architecture", "prompt_tuning"), "'prompt_tuning' is not supported"),
    ("prefix_tuning", _edit("leave_out", [1]), "leave_out"),
    ("lora", _edit("use_dora", True), "use_dora=true"),
    ("lora", _edit("composition_mode", "gated"), "composition_mode 'gated'"),
    ("seq_bn", _edit("head_type", "tagging", file="head_config.json"), "head type 'tagging'"),
    ("seq_bn", _edit("layers", 3, file="head_config.json"), "3 layers"),
]


@pytest.mark.parametrize(
    ("fixture", "edit", "needle"), REFUSED, ids=[f"{r[0]}-{r[2].split()[0]}" for r in REFUSED]
)
def test_unsupported_features_are_refused(tmp_path: Path, fixture: str, edit, needle: str) -> None:
    """What the native format cannot express exactly is refused with a typed error; nothing is written."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / fixture, src)
    file, change = edit
    meta = json.loads((src / file).read_text())
    change(meta)
    (src / file).write_text(json.dumps(meta))
    with pytest.raises(InvalidArtifact) as info:
        import_adapterhub(src, tmp_path / "out", spec=_backbone().spec)
    assert needle in str(info.value)
    assert not (tmp_path / "out").exists()


def test_non_bert_backbones_are_refused(tmp_path: Path) -> None:
    spec = Backbone.from_model(tiny_distilbert(0)).spec
    with pytest.raises(InvalidArtifact, match="BERT-family backbones; this one is distilbert"):
        import_adapterhub(FIXTURES / "seq_bn", tmp_path / "out", spec=spec)


class _Canary:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_checkpoint_is_refused_without_opening_it(tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "adapter_config.json").write_bytes((FIXTURES / "seq_bn" / "adapter_config.json").read_bytes())
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Canary(live)))  # the canary works: plain unpickling runs it
    assert live.exists()
    marker = tmp_path / "unpickled"
    (src / "pytorch_adapter.bin").write_bytes(pickle.dumps({"w": _Canary(marker)}, protocol=2))
    with pytest.raises(InvalidArtifact, match="--allow-pickle"):
        import_adapterhub(src, tmp_path / "out", spec=_backbone().spec)
    assert not marker.exists()
    # Even when allowed, loading is weights-only: the payload's code never runs.
    with (
        pytest.warns(UserWarning, match="only do this for files you trust"),
        pytest.raises(InvalidArtifact, match="weights-only"),
    ):
        import_adapterhub(src, tmp_path / "out", spec=_backbone().spec, allow_pickle=True)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_allowed_pickle_converts_like_safetensors(tmp_path: Path) -> None:
    """A trusted `.bin` checkpoint (AdapterHub's default format) converts to the same artifact."""
    src = tmp_path / "bin"
    src.mkdir()
    for f in ("adapter_config.json", "head_config.json"):
        (src / f).write_bytes((FIXTURES / "lora" / f).read_bytes())
    torch.save(load_file(str(FIXTURES / "lora" / "adapter.safetensors")), src / "pytorch_adapter.bin")
    torch.save(load_file(str(FIXTURES / "lora" / "model_head.safetensors")), src / "pytorch_model_head.bin")
    spec = _backbone().spec
    with pytest.warns(UserWarning, match="only do this for files you trust"):
        import_adapterhub(src, tmp_path / "from_bin", spec=spec, allow_pickle=True)
    import_adapterhub(FIXTURES / "lora", tmp_path / "from_safe", spec=spec)
    a, b = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("from_bin", "from_safe"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
