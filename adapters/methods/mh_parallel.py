"""Multi-head parallel adapter (He et al.): one parallel bottleneck per attention head."""

from __future__ import annotations

from adapters.methods.base import Entry, Method, layer_keys
from adapters.methods.bottleneck import bottleneck_init


class MHParallel(Method):
    """Each head's output gains `s * up_h(f(down_h(x)))`, before the attention output projection."""

    name = "mh_parallel"

    def entries(self, config, tensors, spec, *, banks=None):
        """One multi-head parallel entry per self-attention."""
        out = []
        for key, _ in layer_keys(spec, ["attn"]):
            p = f"{key}.mhpa"
            kw = {
                "down_w": tensors[f"{p}.down.weight"],
                "down_b": tensors[f"{p}.down.bias"],
                "up_w": tensors[f"{p}.up.weight"],
                "up_b": tensors[f"{p}.up.bias"],
                "activation": config.activation,
                "scale": config.scaling,
            }
            out.append(Entry(key, "mhpa", kw))
        return out

    def init(self, shapes, *, generator):
        """Per-head down small normal, up zero: training starts from the plain backbone."""
        out = bottleneck_init(shapes, generator=generator)
        return out | super().init({k: s for k, s in shapes.items() if k not in out}, generator=generator)
