"""BART (post-LN encoder and decoder stacks; the decoder has cross-attention)."""

from adapters.arch import ArchMap

_COMMON = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.out_proj",
    "ffn_in": "fc1",
    "ffn_out": "fc2",
    "attn_ln": "self_attn_layer_norm",
    "ffn_ln": "final_layer_norm",
}

ARCH = ArchMap(
    family="bart",
    model_types=("bart", "mbart"),
    stacks={"encoder": "encoder.layers", "decoder": "decoder.layers"},
    layer={
        "encoder": _COMMON,
        "decoder": {
            **_COMMON,
            "cross_q": "encoder_attn.q_proj",
            "cross_k": "encoder_attn.k_proj",
            "cross_v": "encoder_attn.v_proj",
            "cross_o": "encoder_attn.out_proj",
            "cross_ln": "encoder_attn_layer_norm",
        },
    },
    attention={"encoder": "self_attn", "decoder": "self_attn"},
)
