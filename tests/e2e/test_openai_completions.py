"""OpenAI completions with the official `openai` client against a real server, on tiny GPT-2, T5 and Llama.

The expected text comes from a plain Hugging Face model loaded from the same directory, with the
task's LoRA merged into its weights by hand (W + alpha/r * B A), decoding greedily with its own
`generate`: none of our code computes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from e2e_support import ADMIN, API, write_random_artifact
from integration.api_support import word_tokenizer

from adapters.backbone import load_backbone
from service.client import Client

openai = pytest.importorskip("openai", reason="the openai client is part of the test extra")

pytestmark = [pytest.mark.e2e]

VOCAB = ["<pad>", "<unk>", "<eos>", *[f"w{i}" for i in range(60)]]
PROMPTS = ["w1 w2 w3 w4", "w9", "w30 w31 w32 w33 w34 w35 w36"]
NEW = 8
R, ALPHA = 4, 8


def _save(path: Path, family: str) -> Path:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    tok = word_tokenizer(VOCAB)
    torch.manual_seed(0)
    # a wide initialisation: a random tiny model then says different things, not one token again and again
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(VOCAB),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=2,
            initializer_range=0.3,
        )
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":
        # grouped-query attention (2 key/value heads for 4 query heads), rotary positions
        cfg = LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=2,
            initializer_range=0.3,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = T5Config(
            vocab_size=len(VOCAB),
            d_model=32,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            d_ff=64,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
            initializer_factor=8.0,
        )
        model = T5ForConditionalGeneration(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return {f: _save(tmp_path_factory.mktemp(f"tiny-{f}"), f) for f in ("gpt2", "t5", "llama")}


def _lora_config(family: str, spec) -> dict:
    targets = {"gpt2": ["qkv"], "llama": ["q", "v", "ffn_gate"]}.get(family, ["q", "v", "cross_q"])
    return {
        "method": "lora",
        "r": R,
        "alpha": ALPHA,
        "targets": targets,
        "backbone_fingerprint": spec.fingerprint,
    }


_MODULES = {
    "qkv": "attn.c_attn",
    "q": "SelfAttention.q",
    "v": "SelfAttention.v",
    "cross_q": "EncDecAttention.q",
}


def _reference(
    family: str, directory: Path, artifact: Path | None, prompts: list[str], n: int, *, with_counts=False
):
    """Greedy text from plain transformers, the LoRA merged into the weights by hand (and tokens before EOS)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    causal = family in ("gpt2", "llama")
    loader = AutoModelForCausalLM if causal else AutoModelForSeq2SeqLM
    model = loader.from_pretrained(directory).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    if artifact is not None:
        tensors = load_file(artifact / "adapter.safetensors")
        for name in {k.rsplit(".lora.", 1)[0] for k in tensors}:
            stack, layer, proj = name.split(".")
            delta = (ALPHA / R) * tensors[f"{name}.lora.B"] @ tensors[f"{name}.lora.A"]  # [out, in]
            if family == "gpt2":
                weight = (
                    model.transformer.h[int(layer)].get_submodule(_MODULES[proj]).weight
                )  # Conv1D: [in, out]
                weight.data += delta.T
            elif family == "llama":
                layer_ = model.model.layers[int(layer)]
                path = {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "ffn_gate": "mlp.gate_proj"}[proj]
                layer_.get_submodule(path).weight.data += delta
            else:
                block = getattr(model, stack).block[int(layer)]
                sub = block.layer[0] if proj != "cross_q" else block.layer[1]
                sub.get_submodule(_MODULES[proj].split(".", 1)[0]).get_submodule(
                    _MODULES[proj].split(".", 1)[1]
                ).weight.data += delta
    out, counts = [], []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=n, do_sample=False)[0]
        new = ids[enc["input_ids"].shape[1] :] if causal else ids[1:]
        out.append(tok.decode(new, skip_special_tokens=True))
        counts.append(next((k for k, t in enumerate(new.tolist()) if t == tok.eos_token_id), len(new)))
    return out if not with_counts else (out, counts)


def _streamed(client, **kw) -> tuple[dict[int, str], dict[int, str]]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons


@pytest.mark.parametrize("family", ["gpt2", "t5", "llama"])
def test_completions_equal_plain_transformers(start_server, dirs, tmp_path, family):
    directory = dirs[family]
    spec = load_backbone(directory, device="cpu").spec
    artifact = write_random_artifact(tmp_path / "lora", _lora_config(family, spec), spec, seed=1, scale=0.5)
    # the prompts' budgets (4+8, 1+8, 7+8 tokens) just fit the tokens in flight
    server = start_server(backbone=directory, api_keys=API, max_new_tokens=NEW, max_tokens_in_flight=40)
    with Client(server.url, key=ADMIN) as admin:
        admin.upload("lora-task", artifact)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API)
    want, counts = _reference(family, directory, artifact, PROMPTS, NEW, with_counts=True)
    bare = _reference(family, directory, None, PROMPTS, NEW)
    assert want != bare  # the adapter changes the text, so equality below means it was applied
    assert len(set(" ".join(want).split())) > 3  # and the text is not one token over and over

    res = client.completions.create(model="lora-task", prompt=PROMPTS, max_tokens=NEW, temperature=0)
    assert [c.text for c in sorted(res.choices, key=lambda c: c.index)] == want
    assert res.object == "text_completion" and res.model == "lora-task"
    # one token per prompt word; an EOS ends a text and is not counted
    assert res.usage.prompt_tokens == sum(len(p.split()) for p in PROMPTS)
    assert res.usage.completion_tokens == sum(counts)
    texts, reasons = _streamed(client, model="lora-task", prompt=PROMPTS, max_tokens=NEW, temperature=0)
    assert [texts[i] for i in range(len(PROMPTS))] == want
    assert set(reasons) == {0, 1, 2}
    # the backbone alone, under its own name
    one = client.completions.create(model=spec.name, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
    assert one.choices[0].text == bare[0]

    # a stop string ends the text before it, streamed or not
    words = want[0].split()
    stop = " " + words[2]
    cut = want[0][: want[0].find(stop)]
    res = client.completions.create(
        model="lora-task", prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stop=[stop]
    )
    assert res.choices[0].text == cut and res.choices[0].finish_reason == "stop"
    texts, reasons = _streamed(
        client, model="lora-task", prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stop=stop
    )
    assert texts[0] == cut and reasons[0] == "stop"

    # the same seed gives the same sample, whatever else runs
    kw = {"model": "lora-task", "prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 1.0, "seed": 11}
    a = client.completions.create(**kw).choices[0].text
    b = _streamed(client, **kw)[0][0]
    assert a == b

    # errors in OpenAI's shape
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-task", prompt="w1", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="lora-task", prompt="w1", max_tokens=NEW + 1)
    assert str(NEW) in str(err.value)
    r = httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {API}"},
        json={"model": "lora-task", "prompt": "w1", "max_tokens": NEW + 1},
    )
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}

    # server-sent events as OpenAI sends them, with the usage chunk last
    headers = {"Authorization": f"Bearer {API}"}
    body = {"model": "lora-task", "prompt": "w1 w2", "max_tokens": 4, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server.url + "/v1/completions", headers=headers, json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2].removeprefix("data: "))
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 2
    # five prompts of 2 tokens with 8 each need 50 tokens in flight: refused, as the native route does
    over = {"model": "lora-task", "prompt": ["w1 w2"] * 5, "max_tokens": NEW, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", headers=headers, json=over)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "40" in r.json()["error"]["message"]
