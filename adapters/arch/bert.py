"""BERT family: BERT, RoBERTa, XLM-R, MiniLM (post-LN encoder)."""

from adapters.arch import ArchMap

_LAYER = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "attn_ln": "attention.output.LayerNorm",
    "ffn_ln": "output.LayerNorm",
}

ARCH = ArchMap(
    family="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra"),
    stacks={"encoder": "encoder.layer"},
    layer={"encoder": _LAYER},
    attention={"encoder": "attention.self"},
    pooler="pooler",
)
