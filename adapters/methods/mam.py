"""MAM adapter (He et al.): prefix tuning on attention + scaled parallel adapter on the FFN."""

from __future__ import annotations

from adapters.methods.base import Entry, Method, layer_keys
from adapters.methods.bottleneck import bottleneck_init, bottleneck_kwargs
from adapters.methods.prefix import prefix_entries, prefix_init


class MAM(Method):
    """Both halves write into the ordinary prefix and parallel banks."""

    name = "mam"

    def entries(self, config, tensors, spec, *, banks=None):
        """Prefix entries plus one parallel entry per FFN."""
        out = prefix_entries(tensors, spec)
        for key, _ in layer_keys(spec, ["ffn"]):
            kw = bottleneck_kwargs(tensors, f"{key}.par", activation=config.activation, scale=config.scaling)
            out.append(Entry(key, "par", kw))
        return out

    def init(self, shapes, *, generator):
        """Small normal prefixes; the parallel adapter starts as a no-op (down small normal, up zero)."""
        out = prefix_init(shapes, generator=generator) | bottleneck_init(shapes, generator=generator)
        return out | super().init({k: s for k, s in shapes.items() if k not in out}, generator=generator)
