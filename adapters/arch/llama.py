"""Llama family: Llama, Mistral, Qwen2 (pre-RMSNorm decoder-only, rotary positions, gated MLP).

The three share their module names; keys and values may have fewer heads than queries (grouped-query
attention), which the spec's `num_kv_heads` carries. The MLP is `down(act(gate(x)) * up(x))`: `ffn_in`
is `up_proj` (it stashes the FFN input for parallel adapters), `ffn_gate` the gate.
"""

from adapters.arch import ArchMap

ARCH = ArchMap(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    stacks={"decoder": "layers"},
    layer={
        "decoder": {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "ffn_in": "mlp.up_proj",
            "ffn_gate": "mlp.gate_proj",
            "ffn_out": "mlp.down_proj",
            "attn_ln": "input_layernorm",
            "ffn_ln": "post_attention_layernorm",
        }
    },
    attention={"decoder": "self_attn"},
    inputs={"attn": "q", "ffn": "ffn_in"},
)
