"""Capacity by bytes on the real MiniLM backbone with the default settings.

- 256 LoRA r=8 tasks are resident at once under the default device budget, none evicted;
- AdapterHub's default parallel, scaled-parallel and MAM widths on MiniLM (reduction factor 2:
  width 192; MAM's prefix of 30) are accepted, where fixed banks refused width 192 over 64;
- an adapter larger than the device budget alone is a 413 naming the budget.

Byte counts are arithmetic by hand on the artifact's shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from integration.api_support import HEADS, artifact_config, random_arrays, write_artifact

from adapters.backbone import load_backbone
from adapters.model import BankConfig, MultiTaskModel
from service.cache import DeviceSlots
from service.decode import Decoder
from service.metrics import Metrics
from service.settings import Settings
from store.errors import PayloadTooLarge
from store.safetensors_io import SafetensorsLimits

LAYERS, HIDDEN, LABELS = 6, 384, 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The model, decoder and device tier `adapterserve serve` builds from the default settings."""
    s = Settings(store=tmp_path_factory.mktemp("store"), seed_dir=None)
    model = MultiTaskModel(
        load_backbone(None, device="cpu", dtype="float32"),
        banks=BankConfig(
            slots=s.slots,
            lora_max_rank=s.lora_max_rank,
            bottleneck_max_dim=s.bottleneck_max_dim,
            prefix_max_len=s.prefix_max_len,
            head_max_outputs=s.head_max_outputs,
        ),
    )
    decoder = Decoder(
        model=model, limits=SafetensorsLimits(), device_bytes=s.cache_bytes, host_bytes=s.host_cache_bytes
    )
    return s, model, decoder


def _decode(decoder: Decoder, directory: Path, config: dict, task: str):
    return decoder.decode(
        task=task,
        uid=1,
        version=1,
        config_bytes=json.dumps(config).encode(),
        weights_path=directory / "adapter.safetensors",
        sha256="",
    )


def test_256_lora_r8_tasks_are_resident_at_once_under_the_default_budget(served, tmp_path: Path) -> None:
    s, model, decoder = served
    config = artifact_config("lora", model.spec.fingerprint, r=8, targets=["q", "v"])
    directory = write_artifact(tmp_path / "lora", config, random_arrays(config, model.spec, seed=0))
    one = _decode(decoder, directory, config, "t0")
    # q and v in 6 layers: A [8, 384] and B [384, 8], plus a 2-way head, float32
    assert one.nbytes == (LAYERS * 2 * 2 * 8 * HIDDEN + LABELS * HIDDEN + LABELS) * 4
    assert one.nbytes == one.host_bytes  # the device holds exactly the artifact's bytes
    m = Metrics(max_tasks=10)
    device = DeviceSlots(model=model, budget_bytes=s.cache_bytes, metrics=m)
    adapters = [type(one)(**{**one.__dict__, "task": f"t{i}", "uid": i, "refs": 0}) for i in range(256)]
    for start in range(0, 256, 32):
        device.assign(adapters[start : start + 32])
    assert len(device.resident_keys()) == 256
    assert device.bytes == 256 * one.nbytes <= s.cache_bytes
    assert m.tier_evictions.labels(tier="device")._value.get() == 0
    # every slot's rows are its own: the banks hold what is resident, not 256 times a maximum
    assert sum(model.slot_bytes(slot) for slot in range(1, 257)) == 256 * one.nbytes
    for key in device.resident_keys():
        device.evict(key)


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("parallel", {"bottleneck_dim": 192, "scaling": 4.0, "sites": ["ffn"]}),  # AdapterHub ParBnConfig()
        ("parallel", {"bottleneck_dim": 192, "learned_scaling": True, "sites": ["ffn"]}),  # scaled
        ("mam", {"bottleneck_dim": 192, "prefix_length": 30, "scaling": 4.0}),  # MAMConfig()
    ],
    ids=["par_bn", "scaled_par_bn", "mam"],
)
def test_adapterhub_default_widths_on_minilm_are_accepted(served, tmp_path: Path, method, overrides) -> None:
    _, model, decoder = served
    config = {
        "method": method,
        "backbone_fingerprint": model.spec.fingerprint,
        "head": HEADS["classification"],
    }
    config |= overrides
    arrays = random_arrays(config, model.spec, seed=1)
    adapter = _decode(decoder, write_artifact(tmp_path / method, config, arrays), config, "wide")
    assert adapter.host_bytes == sum(a.nbytes for a in arrays.values())
    # the device adds only one scale scalar per parallel site (4 bytes) to the artifact's bytes
    assert adapter.nbytes - adapter.host_bytes in (0, 4 * LAYERS)


def test_an_adapter_larger_than_the_device_budget_alone_is_a_413_naming_it(served, tmp_path: Path) -> None:
    _, model, _ = served
    config = artifact_config("lora", model.spec.fingerprint, r=64, targets=["q", "k", "v"])
    directory = write_artifact(tmp_path / "big", config, random_arrays(config, model.spec, seed=2))
    small = Decoder(model=model, limits=SafetensorsLimits(), device_bytes=1 << 20)
    with pytest.raises(PayloadTooLarge, match="ADAPTERSERVE_CACHE_BYTES"):
        _decode(small, directory, config, "big")
    tiny_host = Decoder(model=model, limits=SafetensorsLimits(), host_bytes=1 << 20)
    with pytest.raises(PayloadTooLarge, match="ADAPTERSERVE_HOST_CACHE_BYTES"):
        _decode(tiny_host, directory, config, "big")
