"""The decoder on its own: what it returns for a valid artifact, and each refusal with its message.

Expected sizes come from the numpy arrays the test writes, not from the product.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import wrap
from integration.api_support import artifact_config, random_arrays, write_artifact

from adapters.model import BankConfig
from service.decode import Decoder
from store.errors import InvalidArtifact, PayloadTooLarge
from store.safetensors_io import SafetensorsLimits


def decoder(**banks) -> Decoder:
    return Decoder(model=wrap("bert", banks=BankConfig(**banks)), limits=SafetensorsLimits())


def artifact(
    tmp_path: Path, dec: Decoder, method: str, **overrides
) -> tuple[dict, dict[str, np.ndarray], Path]:
    config = artifact_config(method, dec.spec.fingerprint, **overrides)
    arrays = random_arrays(config, dec.spec, seed=0)
    directory = write_artifact(tmp_path / "a", config, arrays)
    return config, arrays, directory


def decode(dec: Decoder, config: dict, directory: Path):
    return dec.decode(
        task="t",
        uid=7,
        version=3,
        config_bytes=json.dumps(config).encode(),
        weights_path=directory / "adapter.safetensors",
        sha256="ab" * 32,
    )


@pytest.mark.parametrize("method", ["lora", "bottleneck", "ia3"])
def test_a_valid_artifact_decodes_to_its_tensors_sizes_and_identity(tmp_path: Path, method: str) -> None:
    dec = decoder()
    config, arrays, directory = artifact(tmp_path, dec, method)
    adapter = decode(dec, config, directory)
    assert (adapter.task, adapter.uid, adapter.version, adapter.sha256) == ("t", 7, 3, "ab" * 32)
    assert adapter.method == method and adapter.hypernetwork is None
    assert set(adapter.tensors) == set(arrays)
    for name, arr in arrays.items():
        assert adapter.tensors[name].dtype == torch.float32
        np.testing.assert_array_equal(adapter.tensors[name].numpy(), arr)
    assert adapter.host_bytes == sum(a.nbytes for a in arrays.values())
    # on the device a bottleneck site also keeps its output scale (one float32) beside the weights
    scales = sum(k.endswith(".down.weight") for k in arrays) if method == "bottleneck" else 0
    assert adapter.nbytes == adapter.host_bytes + 4 * scales
    assert adapter.num_parameters == sum(a.size for a in arrays.values())


def test_the_head_width_limit_is_inclusive_and_named_in_the_refusal(tmp_path: Path) -> None:
    dec = decoder(head_max_outputs=3)
    config, _, directory = artifact(tmp_path, dec, "lora", head="three")
    assert decode(dec, config, directory).head.num_outputs == 3  # exactly the limit is allowed
    dec = decoder(head_max_outputs=2)
    with pytest.raises(InvalidArtifact) as info:
        decode(dec, config, directory)
    assert info.value.message == (
        "the head has 3 outputs; this server allows at most 2 (ADAPTERSERVE_HEAD_MAX_OUTPUTS)"
    )


def test_an_encoder_task_without_a_head_is_refused(tmp_path: Path) -> None:
    dec = decoder()
    config, _, directory = artifact(tmp_path, dec, "lora")
    config["head"] = None
    with pytest.raises(InvalidArtifact) as info:
        decode(dec, config, directory)
    assert info.value.message == (
        "adapter_config.json: head: an encoder backbone needs a task head (classification, "
        "multi_label, regression or embedding)"
    )


def test_an_adapter_larger_than_the_slots_is_too_large(tmp_path: Path) -> None:
    dec = decoder(lora_max_rank=2)
    config, _, directory = artifact(tmp_path, dec, "lora")  # rank 4
    with pytest.raises(PayloadTooLarge) as info:
        decode(dec, config, directory)
    assert info.value.message.startswith("the adapter exceeds this server's slot size: ")
    assert "LoRA rank 4 exceeds the bank's maximum 2" in info.value.message


def test_a_method_this_server_has_no_bank_for_is_refused(tmp_path: Path) -> None:
    dec = decoder(ia3=False)
    config, _, directory = artifact(tmp_path, dec, "ia3")
    with pytest.raises(InvalidArtifact, match="this server has no ia3 bank at"):
        decode(dec, config, directory)


@pytest.mark.parametrize(
    ("raw", "method"),
    [
        (b'{"method": "lora", "r": 4}', "lora"),
        (b"not json", None),
        (b'["method"]', None),
        (b'{"method": 3}', None),
        (b"{}", None),
    ],
)
def test_method_of_reads_only_the_method_and_never_raises(raw: bytes, method: str | None) -> None:
    assert Decoder.method_of(raw) == method


def _two_layer(config: dict) -> dict:
    return config | {"head": config["head"] | {"layers": 2}}


def test_two_layer_heads_are_served_unless_the_server_disables_them(tmp_path: Path) -> None:
    """A dense + tanh + linear head decodes with its dense weights; with them disabled it is a 400."""
    dec = decoder()
    config = _two_layer(artifact_config("lora", dec.spec.fingerprint))
    arrays = random_arrays(config, dec.spec, seed=0)
    directory = write_artifact(tmp_path / "two", config, arrays)
    assert {"head.dense.weight", "head.dense.bias"} <= set(arrays)
    adapter = decode(dec, config, directory)
    assert adapter.head.layers == 2
    np.testing.assert_array_equal(adapter.tensors["head.dense.weight"].numpy(), arrays["head.dense.weight"])
    with pytest.raises(InvalidArtifact) as info:
        decode(decoder(head_two_layer=False), config, directory)
    assert info.value.message == "two-layer heads are disabled on this server"
    one = artifact_config("lora", dec.spec.fingerprint)  # a one-layer head is still fine there
    directory = write_artifact(tmp_path / "one", one, random_arrays(one, dec.spec, seed=0))
    assert decode(decoder(head_two_layer=False), one, directory).head.layers == 1


def test_a_head_on_a_backbone_without_an_encoder_is_refused(tmp_path: Path) -> None:
    """GPT-2 generates with its own LM head; a classification head has no encoder to read."""
    from integration.api_support import tiny_gpt2_backbone

    from adapters.model import MultiTaskModel

    dec = Decoder(
        model=MultiTaskModel(tiny_gpt2_backbone(), banks=BankConfig(slots=2)), limits=SafetensorsLimits()
    )
    config = {
        "method": "lora",
        "r": 2,
        "targets": ["qkv"],
        "backbone_fingerprint": dec.spec.fingerprint,
        "head": {"type": "classification", "labels": ["a", "b"]},
    }
    directory = write_artifact(
        tmp_path / "a", config, random_arrays(config | {"head": None}, dec.spec, seed=0)
    )
    with pytest.raises(InvalidArtifact) as info:
        decode(dec, config, directory)
    assert info.value.message == "adapter_config.json: head: this backbone has no encoder to put a head on"
    config["head"] = None  # the same adapter as a generation task is served
    assert decode(dec, config, directory).head is None


def test_a_hypernetwork_sent_as_a_task_adapter_is_pointed_to_its_route(tmp_path: Path) -> None:
    """The refusal says where a hypernetwork is uploaded instead."""
    dec = decoder()
    _, _, directory = artifact(tmp_path, dec, "lora")
    with pytest.raises(InvalidArtifact) as info:
        decode(dec, {"method": "hypernetwork", "backbone_fingerprint": dec.spec.fingerprint}, directory)
    assert info.value.message == (
        "adapter_config.json: method: a hypernetwork is uploaded with POST /v1/hypernetworks/{name}"
    )


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b'{"method": "lora"}', "generate"),
        (b'{"head": null}', "generate"),
        (b'{"head": {"type": "classification"}}', "classify"),
        (b'{"head": {"type": "multi_label"}}', "classify"),
        (b'{"head": {"type": "regression"}}', "regress"),
        (b'{"head": {"type": "embedding"}}', "embed"),
        (b'{"head": {"type": "unknown"}}', None),
        (b'{"head": "classification"}', None),
        (b"not json", None),
    ],
)
def test_kind_of_reads_the_head_type_only(raw: bytes, kind: str | None) -> None:
    """What a stored config answers, from its head alone, without raising."""
    assert Decoder.kind_of(raw) == kind
