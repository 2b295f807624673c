"""PEFT import: adapters made with the real `peft` library give PEFT's outputs through our model.

Each case builds a PEFT model on a tiny in-process BERT, gives its adapter random non-trivial
weights, saves it with `save_pretrained` (safetensors), imports the directory and compares our
model's outputs with PEFT's own forward (max abs diff <= 1e-4). One MiniLM test does the same on
the real bundled backbone with a classifier head.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import (
    FFN,
    HEADS,
    HIDDEN,
    LAYERS,
    MAX_POSITIONS,
    VOCAB,
    make_batch,
    max_diff,
    tiny_bert,
    tiny_gpt2,
)
from peft import (
    IA3Config,
    LoHaConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from adapters.backbone import Backbone, default_backbone_path, load_backbone
from adapters.formats import import_peft
from adapters.model import BankConfig, MultiTaskModel
from service.cli import main
from store.artifact import expected_tensors, parse_config
from store.errors import InvalidArtifact
from store.local import LocalStore
from store.safetensors_io import SafetensorsLimits, check_expected, load_arrays, read_header

TOL = 1e-4
"""The issue's bound on the largest absolute difference to PEFT's own outputs."""
MOVED = 1e-2
"""PEFT's output with the adapter differs from the plain backbone by more than this."""
LABELS = ["neg", "neu", "pos"]
PREFIX = 5


@dataclass(frozen=True)
class Case:
    """One PEFT configuration; `classifier` builds a BertForSequenceClassification with a saved head."""

    id: str
    make: Callable[[], object]
    method: str
    classifier: bool = False
    pooler: bool = False
    """The target list reaches BERT's pooler, which the import merges into a two-layer head."""


CASES = [
    Case(
        "lora_alpha_over_r", lambda: LoraConfig(r=4, lora_alpha=12, target_modules=["query", "value"]), "lora"
    ),
    Case(
        "rslora",
        lambda: LoraConfig(
            r=8, lora_alpha=6, use_rslora=True, target_modules=["query", "key", "attention.output.dense"]
        ),
        "lora",
    ),
    Case(
        "lora_rank_and_alpha_patterns",
        lambda: LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value", "intermediate.dense"],
            rank_pattern={"value": 2, "layer.1.attention.self.query": 6},
            alpha_pattern={"intermediate.dense": 3.0, "layer.0.attention.self.value": 20.0},
        ),
        "lora",
    ),
    Case(
        "ia3",
        lambda: IA3Config(
            target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
        ),
        "ia3",
    ),
    Case(
        "prefix",
        lambda: PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=PREFIX),
        "prefix",
    ),
    Case(
        "lora_some_layers",
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], layers_to_transform=[1]),
        "lora",
    ),
    Case(
        "prefix_with_projection",
        lambda: PrefixTuningConfig(
            task_type=TaskType.FEATURE_EXTRACTION,
            num_virtual_tokens=PREFIX,
            prefix_projection=True,
            encoder_hidden_size=16,
        ),
        "prefix",
    ),
    Case(
        "seq_cls_lora_with_head",
        lambda: LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=4,
            lora_alpha=16,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        ),
        "lora",
        classifier=True,
    ),
    # PEFT's own defaults for sequence classification: query/value LoRA r=8 alpha=8; IA3 on key,
    # value and output.dense (feedforward).
    Case(
        "peft_default_lora_seq_cls", lambda: LoraConfig(task_type=TaskType.SEQ_CLS), "lora", classifier=True
    ),
    Case("peft_default_ia3_seq_cls", lambda: IA3Config(task_type=TaskType.SEQ_CLS), "ia3", classifier=True),
    # "dense" also matches bert.pooler.dense, as PEFT applies it.
    Case(
        "lora_every_dense_with_pooler",
        lambda: LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["query", "key", "value", "dense"]),
        "lora",
        classifier=True,
        pooler=True,
    ),
    Case(
        "ia3_every_dense_with_pooler",
        lambda: IA3Config(
            task_type=TaskType.SEQ_CLS,
            target_modules=["key", "value", "dense", "output.dense"],
            feedforward_modules=["output.dense"],
        ),
        "ia3",
        classifier=True,
        pooler=True,
    ),
]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every trainable parameter (PEFT starts LoRA B at 0 and IA3 at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "ia3_l" in name:
                p.copy_(1.0 + 0.5 * noise)
            elif "prompt_encoder" in name:
                p.copy_(noise)
            else:
                p.copy_(0.3 * noise)


def _tiny_classifier() -> BertForSequenceClassification:
    """The tiny BERT of tests/helpers.py (same backbone weights) with a 3-way classifier on its pooler."""
    cfg = BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=len(LABELS),
        attn_implementation="sdpa",
    )
    torch.manual_seed(1)
    model = BertForSequenceClassification(cfg).eval()
    model.bert.load_state_dict(tiny_bert(0).state_dict())
    return model


def _peft_model(case: Case, seed: int):
    base = _tiny_classifier() if case.classifier else tiny_bert(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about fan-in and task types
        model = get_peft_model(base, case.make()).eval()
    _randomize(model, seed)
    return model


def _peft_hidden(case: Case, model, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PEFT's last hidden states (and logits, for the classifier) on a batch."""
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        if case.classifier:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            return out.hidden_states[-1], out.logits
        if case.method == "prefix":
            # PEFT's prefix forward shifts BERT's absolute positions by the prefix length (it starts
            # them at the cache length); served prefixes, like AdapterHub's, keep positions from 0.
            # So the reference is PEFT's own prefix cache with positions from 0.
            prefix_mask = torch.ones(len(ids), PREFIX, dtype=mask.dtype)
            out = model.base_model(
                input_ids=ids,
                attention_mask=torch.cat([prefix_mask, mask], dim=1),
                cache=model.get_prompt(len(ids)),
                position_ids=torch.arange(ids.shape[1]).unsqueeze(0),
            )
            return out.last_hidden_state, None
        return model(input_ids=ids, attention_mask=mask).last_hidden_state, None


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
    """Every case: PEFT model saved and imported; all imported adapters loaded in one model."""
    backbone = Backbone.from_model(tiny_bert(0))
    model = MultiTaskModel(backbone, banks=BankConfig(slots=len(CASES) + 1))
    batch = make_batch([7, 5, 3, 6], family="bert", seed=1)
    cases = {}
    for slot, case in enumerate(CASES, start=1):
        peft_model = _peft_model(case, seed=slot)
        src = tmp_path_factory.mktemp(case.id)
        peft_model.save_pretrained(src)
        assert (src / "adapter_model.safetensors").is_file()
        out = src / "native"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = import_peft(
                src, out, spec=backbone.spec, labels=LABELS if case.classifier else None, base=backbone.core
            )
        tensors = store_validate(out, backbone.spec)
        model.load(slot, cfg, tensors)
        hidden, logits = _peft_hidden(case, peft_model, batch)
        cases[case.id] = {
            "slot": slot,
            "cfg": cfg,
            "src": src,
            "peft": peft_model,
            "hidden": hidden,
            "logits": logits,
            "warnings": [str(w.message) for w in caught],
        }
    return {"model": model, "batch": batch, "cases": cases, "backbone": backbone}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_import_matches_peft(world, case: Case) -> None:
    """Our model with the imported adapter computes PEFT's outputs within 1e-4."""
    c, model, batch = world["cases"][case.id], world["model"], world["batch"]
    assert c["cfg"].method == case.method
    assert c["cfg"].metadata["source"] == "peft"
    slots = [c["slot"]] * len(batch.lengths)
    hidden = model.hidden(batch.input_ids, batch.attention_mask, slots)
    assert max_diff(hidden, c["hidden"]) <= TOL
    base = model.hidden(batch.input_ids, batch.attention_mask, [0] * len(slots))
    assert max_diff(c["hidden"], base) > MOVED  # the adapter matters, so equality is not trivial
    if case.classifier:
        logits = model.classify(batch.input_ids, batch.attention_mask, slots).logits
        assert max_diff(logits[:, : len(LABELS)], c["logits"]) <= TOL
        head = c["cfg"].head
        shape = ("cls", 2) if case.pooler else ("pooler", 1)
        assert (head.type, head.labels, head.pooling, head.layers) == ("classification", LABELS, *shape)


def test_lora_scalings_are_peft_s(world) -> None:
    """alpha/r, rsLoRA and the patterns land in the native config as PEFT applies them."""
    cfg = world["cases"]["rslora"]["cfg"]
    assert (cfg.r, cfg.alpha, cfg.use_rslora) == (8, 6.0, True)
    cfg = world["cases"]["lora_rank_and_alpha_patterns"]["cfg"]
    assert cfg.rank_at("encoder.0.v", "v") == 2 and cfg.rank_at("encoder.1.q", "q") == 6
    assert cfg.rank_at("encoder.0.q", "q") == 4
    assert cfg.alpha_at("encoder.1.ffn_in", "ffn_in") == 3.0 and cfg.alpha_at("encoder.0.v", "v") == 20.0
    assert cfg.alpha_at("encoder.1.v", "v") == 8.0
    cfg = world["cases"]["ia3"]["cfg"]
    assert (cfg.targets, cfg.feedforward) == (["k", "v", "o", "ffn_out"], ["o", "ffn_out"])


# PEFT itself still passes the prefix cache under transformers' deprecated `past_key_values` name.
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_prefix_differs_from_peft_only_by_its_position_offset(world) -> None:
    """PEFT's own prefix forward equals ours given the same shifted positions, and the import warns."""
    c, model, batch = world["cases"]["prefix"], world["model"], world["batch"]
    assert any("positions" in w for w in c["warnings"])
    with torch.no_grad():
        peft_out = c["peft"](input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    shifted = torch.arange(PREFIX, PREFIX + batch.input_ids.shape[1]).unsqueeze(0)
    slots = [c["slot"]] * len(batch.lengths)
    ours = model.hidden(batch.input_ids, batch.attention_mask, slots, position_ids=shifted)
    assert max_diff(ours, peft_out) <= TOL


def test_mixed_batch_of_every_imported_adapter(world) -> None:
    """All imported adapters and the plain backbone in one forward, rows interleaved."""
    model, batch, cases = world["model"], world["batch"], world["cases"]
    rows = [(cid, j) for cid in [*cases, None] for j in range(len(batch.lengths))]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [rows[k] for k in order]
    pick = torch.tensor([j for _, j in rows])
    slots = [cases[cid]["slot"] if cid else 0 for cid, _ in rows]
    ids, mask = batch.input_ids[pick], batch.attention_mask[pick]
    hidden = model.hidden(ids, mask, slots)
    base = model.hidden(batch.input_ids, batch.attention_mask, [0] * len(batch.lengths))
    logits = model.classify(ids, mask, slots).logits
    for i, (cid, j) in enumerate(rows):
        want = cases[cid]["hidden"][j] if cid else base[j]
        assert max_diff(hidden[i], want) <= TOL, f"row {i} ({cid})"
        if cid and cases[cid]["logits"] is not None:
            assert max_diff(logits[i, : len(LABELS)], cases[cid]["logits"][j]) <= TOL, f"row {i} ({cid})"


def test_pickle_is_refused_without_allow_pickle_and_never_opened(tmp_path: Path, world) -> None:
    """A `.bin` checkpoint needs --allow-pickle; refusing it never unpickles (a canary proves it)."""
    src = tmp_path / "pickled"
    shutil.copytree(world["cases"]["lora_alpha_over_r"]["src"], src, ignore=shutil.ignore_patterns("native"))
    (src / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (src / "adapter_model.bin").write_bytes(pickle.dumps({"w": _Canary(marker)}, protocol=2))
    spec = world["backbone"].spec
    with pytest.raises(InvalidArtifact, match="--allow-pickle"):
        import_peft(src, tmp_path / "out", spec=spec)
    assert main(["import", "peft", str(src), str(tmp_path / "out2"), "--backbone", _tiny_dir(tmp_path)]) == 1
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Canary(live)))  # the canary works: plain unpickling runs it
    assert live.exists()


def test_allowed_pickle_converts_like_safetensors(tmp_path: Path, world) -> None:
    """PEFT's own `.bin` format converts, with --allow-pickle, to exactly the safetensors import."""
    c = world["cases"]["lora_alpha_over_r"]
    src = tmp_path / "bin"
    c["peft"].save_pretrained(src, safe_serialization=False)
    assert (src / "adapter_model.bin").is_file() and not (src / "adapter_model.safetensors").exists()
    with pytest.warns(UserWarning, match="only do this for files you trust"):
        import_peft(src, tmp_path / "from_bin", spec=world["backbone"].spec, allow_pickle=True)
    a = load_file(str(tmp_path / "from_bin" / "adapter.safetensors"))
    b = load_file(str(c["src"] / "native" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Canary:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _tiny_dir(tmp_path: Path) -> str:
    """The tiny BERT saved as a backbone directory (the bundled MiniLM's tokenizer files beside it)."""
    d = tmp_path / "tiny-bert"
    if not d.exists():
        tiny_bert(0).save_pretrained(d)
        for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(default_backbone_path() / f, d / f)
    return str(d)


def test_cli_import_writes_a_valid_artifact(tmp_path: Path, world, capsys) -> None:
    """`adapterserve import peft SRC OUT` end to end: the directory passes the store's validation."""
    c = world["cases"]["seq_cls_lora_with_head"]
    out = tmp_path / "native"
    argv = [
        "import",
        "peft",
        str(c["src"]),
        str(out),
        "--backbone",
        _tiny_dir(tmp_path),
        "--labels",
        "neg,neu,pos",
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    spec = load_backbone(_tiny_dir(tmp_path), device="cpu", dtype="float32").spec
    assert spec.fingerprint == world["backbone"].spec.fingerprint
    cfg = parse_config((out / "adapter_config.json").read_bytes())
    assert printed == cfg.model_dump(mode="json")
    assert cfg.head.labels == LABELS
    tensors = store_validate(out, spec)
    # The store accepts it under the same validation, and the stored copy serves PEFT's logits.
    store = LocalStore(tmp_path / "store")
    info = store.put_version(
        "tasks",
        "sst",
        config_bytes=(out / "adapter_config.json").read_bytes(),
        weights_src=out / "adapter.safetensors",
        validate=lambda config, weights: check_expected(
            read_header(weights, limits=SafetensorsLimits()), expected_tensors(parse_config(config), spec)
        ),
    )
    stored = store.get("tasks", "sst", info.version)
    model = MultiTaskModel(world["backbone"], banks=BankConfig(slots=2))
    model.load(1, parse_config(stored.config_bytes), tensors)
    batch = world["batch"]
    logits = model.classify(batch.input_ids, batch.attention_mask, [1] * len(batch.lengths)).logits
    assert max_diff(logits[:, : len(LABELS)], c["logits"]) <= TOL
    # A second run refuses to overwrite the written directory.
    assert main(argv) == 1


REFUSED = [
    ("dora", lambda: LoraConfig(r=4, target_modules=["query"], use_dora=True), "use_dora"),
    ("trained_biases", lambda: LoraConfig(r=4, target_modules=["query"], bias="all"), "bias"),
    (
        "lora_on_the_pooler_without_a_classifier",
        lambda: LoraConfig(r=4, target_modules=["pooler.dense"]),
        "saves no classifier that reads it",
    ),
    ("loha", lambda: LoHaConfig(r=4, target_modules=["query"]), "'LOHA' is not supported"),
    (
        "prompt_tuning",
        lambda: PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=4),
        "'PROMPT_TUNING' is not supported",
    ),
    (
        "other_saved_module",
        lambda: LoraConfig(r=4, target_modules=["query"], modules_to_save=["pooler"]),
        "not a supported bert sequence classifier",
    ),
]


@pytest.mark.parametrize(("make", "needle"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_unsupported_peft_checkpoints_are_refused(tmp_path: Path, make, needle: str) -> None:
    """What the native format cannot express exactly is refused with a typed error; nothing is written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_bert(0), make()).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    with pytest.raises(InvalidArtifact) as info:
        import_peft(tmp_path / "peft", tmp_path / "out", spec=Backbone.from_model(tiny_bert(0)).spec)
    assert needle in str(info.value)
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_backbone_size_is_refused(tmp_path: Path, world) -> None:
    """A checkpoint trained on a wider BERT does not fit this backbone: the tensor and shapes are named."""
    wide = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(wide, LoraConfig(r=4, target_modules=["query", "value"]))
    peft_model.save_pretrained(tmp_path / "peft")
    with pytest.raises(
        InvalidArtifact, match=r"'encoder\.0\.q\.lora\.A' has shape \(4, 64\); expected \(4, 32\)"
    ):
        import_peft(tmp_path / "peft", tmp_path / "out", spec=world["backbone"].spec)
    assert not (tmp_path / "out").exists()


def _tiny_roberta_classifier() -> RobertaForSequenceClassification:
    cfg = RobertaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS + 2,
        num_labels=len(LABELS),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return RobertaForSequenceClassification(cfg).eval()


def test_gpt2_lora_with_fan_in_fan_out_matches_peft(tmp_path: Path) -> None:
    """GPT-2's Conv1D projections (fused qkv): PEFT's LM logits through our model."""
    pcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_gpt2(0), pcfg).eval()
    _randomize(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path / "peft")
    backbone = Backbone.from_model(tiny_gpt2(0))
    cfg = import_peft(tmp_path / "peft", tmp_path / "native", spec=backbone.spec)
    assert cfg.targets == ["qkv", "o", "ffn_in", "ffn_out"]
    model = MultiTaskModel(backbone, banks=BankConfig(slots=2))
    model.load(1, cfg, store_validate(tmp_path / "native", backbone.spec))
    batch = make_batch([7, 5, 3], family="gpt2", seed=1)
    with torch.no_grad():
        want = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    got = model.logits(batch.input_ids, batch.attention_mask, [1, 1, 1])
    real = batch.attention_mask.bool()
    assert max_diff(got[real], want[real]) <= TOL
    assert max_diff(model.logits(batch.input_ids, batch.attention_mask, [0, 0, 0])[real], want[real]) > MOVED


def test_roberta_classifier_head_matches_peft(tmp_path: Path) -> None:
    """RoBERTa's saved classifier (dense + tanh + out_proj on the first token) becomes a two-layer head."""
    pcfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(_tiny_roberta_classifier(), pcfg).eval()
    _randomize(peft_model, seed=6)
    peft_model.save_pretrained(tmp_path / "peft")
    backbone = Backbone.from_model(_tiny_roberta_classifier().roberta)
    cfg = import_peft(tmp_path / "peft", tmp_path / "native", spec=backbone.spec, labels=LABELS)
    assert (cfg.head.pooling, cfg.head.layers) == ("cls", 2)
    model = MultiTaskModel(backbone, banks=BankConfig(slots=2))
    model.load(1, cfg, store_validate(tmp_path / "native", backbone.spec))
    batch = make_batch([7, 5, 3], family="bert", seed=1)
    with torch.no_grad():
        want = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    got = model.classify(batch.input_ids, batch.attention_mask, [1, 1, 1]).logits[:, : len(LABELS)]
    assert max_diff(got, want) <= TOL


@pytest.mark.minilm
def test_minilm_lora_with_classifier_head_matches_peft(tmp_path: Path) -> None:
    """LoRA with a classifier head on the real bundled MiniLM-L6: our logits are PEFT's."""
    backbone = load_backbone(device="cpu", dtype="float32")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = BertForSequenceClassification.from_pretrained(
            default_backbone_path(), num_labels=2, attn_implementation="sdpa"
        ).eval()
        peft_model = get_peft_model(
            hf,
            LoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=8,
                lora_alpha=16,
                target_modules=["query", "value"],
                modules_to_save=["classifier"],
            ),
        ).eval()
    _randomize(peft_model, seed=0)
    peft_model.save_pretrained(tmp_path / "peft")
    cfg = import_peft(tmp_path / "peft", tmp_path / "native", spec=backbone.spec, labels=["no", "yes"])
    model = MultiTaskModel(backbone, banks=BankConfig(slots=2))
    model.load(1, cfg, store_validate(tmp_path / "native", backbone.spec))
    enc = backbone.tokenizer(
        ["a quietly moving film", "the plot makes no sense at all", "fine"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        want = peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    got = model.classify(enc["input_ids"], enc["attention_mask"], [1, 1, 1]).logits[:, :2]
    assert max_diff(got, want) <= TOL
    lora = model.hidden(enc["input_ids"], enc["attention_mask"], [1, 1, 1])
    assert max_diff(lora, model.hidden(enc["input_ids"], enc["attention_mask"], [0, 0, 0])) > MOVED
