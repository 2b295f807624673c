"""Hyperformer / Hyperformer++: bottleneck adapters generated from a task embedding.

A conditioning vector `e = LN(MLP([z_task; e_layer; e_site]))` (Hyperformer++; the original
Hyperformer has no site embedding and one generator per site) is mapped by single linear
generators to a bottleneck adapter's down/up weights and biases and to its LayerNorm's gamma
and beta: the adapter is `y + LN_{gamma,beta}(up(f(down(y))))`. Generated adapters are written
into the ordinary bottleneck banks, so they are served exactly like uploaded ones. Generating
many tasks is one batched forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.methods.base import Entry, layer_keys
from store.artifact import HypernetworkConfig, hypernetwork_tensors
from store.spec import BackboneSpec

__all__ = ["Hypernetwork"]

_GENERATED = ("down_w", "down_b", "up_w", "up_b", "ln_gamma", "ln_beta")


class Hypernetwork(nn.Module):
    """A shared generator of bottleneck adapters, one set of weights per backbone stack."""

    def __init__(self, config: HypernetworkConfig, spec: BackboneSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.plus = config.variant == "hyperformer++"
        shapes = hypernetwork_tensors(config, spec)
        self.params = nn.ParameterDict(
            {name.replace(".", "__"): nn.Parameter(torch.zeros(shape)) for name, shape in shapes.items()}
        )
        self._site_names = {
            stack: [
                k.rsplit(".", 1)[1] for k, _ in layer_keys(spec, config.sites) if k.startswith(f"{stack}.0.")
            ]
            for stack in spec.stacks
        }
        # Serving: the six generators of a stack fused into one matrix, rebuilt when a weight changes.
        self._fused: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def p(self, name: str) -> torch.Tensor:
        """The parameter stored under an artifact tensor name."""
        return self.params[name.replace(".", "__")]

    @classmethod
    def from_tensors(
        cls, config: HypernetworkConfig, tensors: dict[str, torch.Tensor], spec: BackboneSpec
    ) -> Hypernetwork:
        """Build a hypernetwork from an artifact's tensors (names as in `hypernetwork_tensors`)."""
        net = cls(config, spec)
        with torch.no_grad():
            for name in hypernetwork_tensors(config, spec):
                net.p(name).copy_(tensors[name])
        return net.eval().requires_grad_(False)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The artifact tensors (artifact names) of this hypernetwork."""
        return {name.replace("__", "."): p.detach() for name, p in self.params.items()}

    def _sites(self, stack: str) -> list[str]:
        return self._site_names[stack]

    def _generator(self, stack: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Hyperformer++'s generators of one stack as one [sum of widths, E] matrix and its bias."""
        ws = [self.p(f"{stack}.gen.{part}.weight") for part in _GENERATED]
        bs = [self.p(f"{stack}.gen.{part}.bias") for part in _GENERATED]
        if torch.is_grad_enabled() and any(t.requires_grad for t in ws + bs):
            return torch.cat(ws), torch.cat(bs)
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in ws + bs)
        held = self._fused.get(stack)
        if held is None or held[0] != key:
            with torch.no_grad():
                held = (key, torch.cat(ws), torch.cat(bs))
            self._fused[stack] = held
        return held[1], held[2]

    def conditioning(self, z: torch.Tensor, stack: str) -> torch.Tensor:
        """e for every (task, layer, site): [T, L, sites, projected_dim]."""
        t, n_layers, sites = z.shape[0], self.spec.stacks[stack], self._sites(stack)
        parts = [
            z[:, None, None, :].expand(t, n_layers, len(sites), -1),
            self.p(f"{stack}.layer_embedding")[None, :, None, :].expand(t, -1, len(sites), -1),
        ]
        if self.plus:
            parts.append(self.p(f"{stack}.site_embedding")[None, None, :, :].expand(t, n_layers, -1, -1))
        x = torch.cat(parts, dim=-1)
        x = F.relu(F.linear(x, self.p(f"{stack}.mlp.0.weight"), self.p(f"{stack}.mlp.0.bias")))
        x = F.linear(x, self.p(f"{stack}.mlp.2.weight"), self.p(f"{stack}.mlp.2.bias"))
        return F.layer_norm(x, x.shape[-1:], self.p(f"{stack}.ln.weight"), self.p(f"{stack}.ln.bias"))

    def generate(self, z: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Adapter weights for each task embedding in z [T, d]: per task, '{stack}.{i}.{site}.{part}'."""
        h, r = self.spec.hidden_size, self.config.bottleneck_dim
        # The generator keeps its own dtype (float32 on a bf16 server); banks cast what it writes.
        z = z.to(next(iter(self.params.values())).dtype)
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(z.shape[0])]
        for stack in self.spec.stacks:
            e = self.conditioning(z, stack)  # [T, L, S, E]
            sites = self._sites(stack)
            gen: dict[str, torch.Tensor] = {}
            if self.plus:
                # one matmul for all six generated parts, split afterwards
                w, b = self._generator(stack)
                widths = [self.p(f"{stack}.gen.{part}.bias").shape[0] for part in _GENERATED]
                gen = dict(zip(_GENERATED, F.linear(e, w, b).split(widths, dim=-1), strict=True))
            else:
                for part in _GENERATED:
                    gen[part] = torch.stack(
                        [
                            F.linear(
                                e[:, :, j],
                                self.p(f"{stack}.{s}.gen.{part}.weight"),
                                self.p(f"{stack}.{s}.gen.{part}.bias"),
                            )
                            for j, s in enumerate(sites)
                        ],
                        dim=2,
                    )
            t_, n_layers = e.shape[0], e.shape[1]
            gen["down_w"] = gen["down_w"].view(t_, n_layers, len(sites), r, h)
            gen["up_w"] = gen["up_w"].view(t_, n_layers, len(sites), h, r)
            for t in range(t_):
                for i in range(n_layers):
                    for j, site in enumerate(sites):
                        key = f"{stack}.{i}.{site}"
                        for part in _GENERATED:
                            out[t][f"{key}.{part}"] = gen[part][t, i, j]
        return out

    def entries(self, z: torch.Tensor) -> list[list[Entry]]:
        """Bank entries (sequential bottleneck + post-LayerNorm) for each task embedding in z."""
        result = []
        for weights in self.generate(z):
            entries = []
            for name in weights:
                if not name.endswith(".down_w"):
                    continue
                key = name[: -len(".down_w")]
                kw = {
                    "down_w": weights[f"{key}.down_w"],
                    "down_b": weights[f"{key}.down_b"],
                    "up_w": weights[f"{key}.up_w"],
                    "up_b": weights[f"{key}.up_b"],
                    "activation": self.config.activation,
                    "scale": 1.0,
                    "ln": (weights[f"{key}.ln_gamma"], weights[f"{key}.ln_beta"]),
                }
                entries.append(Entry(key, "seq", kw))
            result.append(entries)
        return result
