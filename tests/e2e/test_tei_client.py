"""The text-embeddings-inference routes on a real server with the bundled MiniLM-L6, through the
`huggingface_hub` client TEI users have, against sentence-transformers and the model's own tokenizer."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from e2e_support import API

from adapters.backbone import default_backbone_path

hub = pytest.importorskip("huggingface_hub")

pytestmark = [pytest.mark.e2e, pytest.mark.minilm]

SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome and the actors are great.",
    "Stocks fell sharply on Tuesday.",
    "short",
]
QUERY = "Someone plays music on a guitar."


def test_tei_routes_equal_sentence_transformers_and_the_tokenizer(start_server, monkeypatch):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    server = start_server(backbone=None, api_keys=API)
    st = SentenceTransformer(str(default_backbone_path()), device="cpu")
    want = st.encode(SENTENCES, normalize_embeddings=True)

    # huggingface_hub's InferenceClient posts TEI's body to the URL it is given. Its offline mode refuses
    # every request, a local server's too; the model URL is 127.0.0.1 and nothing else is reached.
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    client = hub.InferenceClient(model=server.url + "/embed", token=API)
    np.testing.assert_allclose(client.feature_extraction(SENTENCES), want, atol=1e-5)
    # normalize: false is the pooled vector before sentence-transformers' Normalize module
    raw = client.feature_extraction(SENTENCES[0], normalize=False)
    with torch.no_grad():
        pooled = st[1](st[0](st.tokenize(SENTENCES[:1])))["sentence_embedding"].numpy()
    assert np.linalg.norm(pooled) > 1.5
    np.testing.assert_allclose(raw, pooled, atol=1e-5)
    with pytest.raises(hub.errors.HfHubHTTPError) as refused:
        hub.InferenceClient(model=server.url + "/embed", token="wrong-key-wrong-key").feature_extraction("x")
    assert refused.value.response.status_code == 401

    auth = {"Authorization": f"Bearer {API}"}
    # /rerank without a model: cosine similarity of the backbone's vectors, best first
    r = httpx.post(
        server.url + "/rerank", json={"query": QUERY, "texts": SENTENCES}, headers=auth, timeout=60
    )
    assert r.status_code == 200, r.text
    q = st.encode([QUERY], normalize_embeddings=True)[0]
    cos = want @ q
    assert [x["index"] for x in r.json()] == list(np.argsort(-cos))
    np.testing.assert_allclose([x["score"] for x in r.json()], np.sort(cos)[::-1], atol=1e-5)

    # /tokenize: MiniLM's WordPiece ids and character offsets; a "##" piece's text is the slice it covers
    text = "Tokenization of naïve café text"
    r = httpx.post(server.url + "/tokenize", json={"inputs": text}, headers=auth, timeout=60)
    (tokens,) = r.json()
    enc = AutoTokenizer.from_pretrained(str(default_backbone_path()))(text, return_offsets_mapping=True)
    assert [t["id"] for t in tokens] == enc["input_ids"]
    plain = [t for t in tokens if not t["special"]]
    assert [(t["start"], t["stop"]) for t in plain] == [tuple(o) for o in enc["offset_mapping"][1:-1]]
    assert [t["text"] for t in plain][:3] == ["Token", "ization", "of"]
    assert [t["text"] for t in tokens if t["special"]] == ["[CLS]", "[SEP]"]
