"""Per-task LayerNorm overrides alone (LN tuning); every other method can carry them too."""

from __future__ import annotations

from adapters.methods.base import Method


class LayerNormOnly(Method):
    """No adapter weights of its own: the model adds the LayerNorm entries for every method."""

    name = "layernorm"

    def entries(self, config, tensors, spec, *, banks=None):
        """Nothing beyond the common LayerNorm and head entries."""
        return []
