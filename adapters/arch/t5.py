"""T5 (pre-RMSNorm encoder and decoder stacks; the decoder has cross-attention)."""

from adapters.arch import ArchMap

_ATTN = {
    "q": "layer.0.SelfAttention.q",
    "k": "layer.0.SelfAttention.k",
    "v": "layer.0.SelfAttention.v",
    "o": "layer.0.SelfAttention.o",
    "attn_ln": "layer.0.layer_norm",
}

ARCH = ArchMap(
    family="t5",
    model_types=("t5", "mt5"),
    stacks={"encoder": "encoder.block", "decoder": "decoder.block"},
    layer={
        "encoder": {
            **_ATTN,
            "ffn_in": "layer.1.DenseReluDense.wi",
            "ffn_out": "layer.1.DenseReluDense.wo",
            "ffn_ln": "layer.1.layer_norm",
        },
        "decoder": {
            **_ATTN,
            "cross_q": "layer.1.EncDecAttention.q",
            "cross_k": "layer.1.EncDecAttention.k",
            "cross_v": "layer.1.EncDecAttention.v",
            "cross_o": "layer.1.EncDecAttention.o",
            "cross_ln": "layer.1.layer_norm",
            "ffn_in": "layer.2.DenseReluDense.wi",
            "ffn_out": "layer.2.DenseReluDense.wo",
            "ffn_ln": "layer.2.layer_norm",
        },
    },
    attention={"encoder": "layer.0.SelfAttention", "decoder": "layer.0.SelfAttention"},
)
