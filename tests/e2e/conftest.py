"""Fixtures of the end-to-end tests: a saved tiny model directory and a server factory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from e2e_support import WORDS, Server
from transformers import BertConfig, BertModel, BertTokenizerFast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny BERT and its tokenizer saved like a Hugging Face model directory."""
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(path)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    return path


@pytest.fixture
def start_server(tmp_path):
    """Factory of servers; every server started is stopped at teardown."""
    servers: list[Server] = []

    def start(*, backbone: Path | None, **settings: object) -> Server:
        server = Server(tmp_path, backbone=backbone, **settings)
        servers.append(server)
        return server.wait_ready()

    yield start
    for server in servers:
        server.kill()
