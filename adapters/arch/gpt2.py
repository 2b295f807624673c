"""GPT-2 (pre-LN decoder-only; q, k and v share one fused projection)."""

from adapters.arch import ArchMap

ARCH = ArchMap(
    family="gpt2",
    model_types=("gpt2",),
    stacks={"decoder": "h"},
    layer={
        "decoder": {
            "qkv": "attn.c_attn",
            "o": "attn.c_proj",
            "ffn_in": "mlp.c_fc",
            "ffn_out": "mlp.c_proj",
            "attn_ln": "ln_1",
            "ffn_ln": "ln_2",
        }
    },
    attention={"decoder": "attn"},
    inputs={"attn": "qkv", "ffn": "ffn_in"},
)
