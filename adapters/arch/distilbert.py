"""DistilBERT (post-LN encoder with its own module names)."""

from adapters.arch import ArchMap

ARCH = ArchMap(
    family="distilbert",
    model_types=("distilbert",),
    stacks={"encoder": "transformer.layer"},
    layer={
        "encoder": {
            "q": "attention.q_lin",
            "k": "attention.k_lin",
            "v": "attention.v_lin",
            "o": "attention.out_lin",
            "ffn_in": "ffn.lin1",
            "ffn_out": "ffn.lin2",
            "attn_ln": "sa_layer_norm",
            "ffn_ln": "output_layer_norm",
        }
    },
    attention={"encoder": "attention"},
)
