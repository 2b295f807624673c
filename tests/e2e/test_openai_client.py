"""The official `openai` client against a real server on the bundled MiniLM-L6."""

from __future__ import annotations

import numpy as np
import pytest
from e2e_support import API

from adapters.backbone import default_backbone_path

openai = pytest.importorskip("openai", reason="the openai client is part of the test extra")

pytestmark = [pytest.mark.e2e, pytest.mark.minilm]

SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome and the actors are great.",
    "Stocks fell sharply on Tuesday.",
    "short",
]


def test_openai_embeddings_equal_sentence_transformers(start_server):
    from sentence_transformers import SentenceTransformer

    server = start_server(backbone=None, api_keys=API)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API)
    names = [m.id for m in client.models.list().data]
    assert names[0] == "all-MiniLM-L6-v2"
    # the client asks for base64 by default and decodes it; float is asked for explicitly
    for fmt in (openai.NOT_GIVEN, "float"):
        res = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES, encoding_format=fmt)
        got = np.array([d.embedding for d in res.data])
        want = SentenceTransformer(str(default_backbone_path()), device="cpu").encode(
            SENTENCES, normalize_embeddings=True
        )
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert res.usage.prompt_tokens > len(SENTENCES)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-task", input="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key-wrong-key").models.list()
