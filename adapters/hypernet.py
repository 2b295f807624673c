"""Hyperformer / Hyperformer++: bottleneck adapters generated from a task embedding.

A conditioning vector `e = LN(MLP([z_task; e_layer; e_site]))` (Hyperformer++; the original
Hyperformer has no site embedding and one generator per site) is mapped by single linear
generators to a bottleneck adapter's down/up weights and biases and to its LayerNorm's gamma
and beta: the adapter is `y + LN_{gamma,beta}(up(f(down(y))))`. Generated adapters are written
into the ordinary bottleneck banks, so they are served exactly like uploaded ones. Generating
many tasks is one batched forward.

Serving (no gradients to the hypernetwork) keeps two values built from its weights, rebuilt when
one changes: the conditioning MLP's first layer is linear in its concatenated input, so its
layer/site part is a per-(layer, site) constant added to `W_z z`; and each generator group is one
`[projected_dim + 1, sum of widths]` matrix whose last row is the bias, so every (task, layer,
site) of a stack is one row of one 2-D matmul. Bank entries are views of that product.
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
        h, r = spec.hidden_size, config.bottleneck_dim
        self._widths = [r * h, r, h * r, h, h, h]
        # up_w comes out of the product as [r, h] (see _generator) and is handed on as its [h, r] view
        self._part_shapes = [(r, h), (r,), (r, h), (h,), (h,), (h,)]
        # Serving: values derived from the weights, by name -> (weights' identity and versions, value).
        self._held: dict[str, tuple[tuple, object]] = {}

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

    def _derived(self, name: str, inputs: list[torch.Tensor], build):
        """`build()`, kept while `inputs` are unchanged unless gradients must flow into them."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            return build()
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in inputs)
        held = self._held.get(name)
        if held is None or held[0] != key:
            with torch.no_grad():
                held = (key, build())
            self._held[name] = held
        return held[1]

    def _generator(self, stack: str, site: str | None = None) -> torch.Tensor:
        """One generator group's six parts as one [projected_dim + 1, sum of widths] matrix, bias last."""
        group = f"{stack}." if site is None else f"{stack}.{site}."
        ws = [self.p(f"{group}gen.{part}.weight") for part in _GENERATED]
        bs = [self.p(f"{group}gen.{part}.bias") for part in _GENERATED]
        h, r = self.spec.hidden_size, self.config.bottleneck_dim

        def build():
            # up_w's rows reordered from [h, r] to [r, h]: banks store up transposed, and copying
            # a contiguous block into a slot is twice as fast as copying a transpose.
            w = [*ws[:2], ws[2].view(h, r, -1).transpose(0, 1).reshape(h * r, -1), *ws[3:]]
            b = [*bs[:2], bs[2].view(h, r).t().reshape(-1), *bs[3:]]
            # Contiguous [E + 1, N] with the bias as a row: on CPU 1.5-2x faster than F.linear with
            # the [N, E] weight and the bias (the product is ~0.9 MB per task).
            return torch.cat([torch.cat(w).t(), torch.cat(b)[None]]).contiguous()

        return self._derived(f"gen:{group}", ws + bs, build)

    def _first_layer(self, stack: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP's first layer as (its task-embedding columns, the per-row constant [groups, hidden]).

        Rows (groups) are (layer, site) pairs for Hyperformer++, layers for Hyperformer (whose
        input has no site part, so all sites of a layer share one conditioning vector).
        """
        w1, b1 = self.p(f"{stack}.mlp.0.weight"), self.p(f"{stack}.mlp.0.bias")
        layer = self.p(f"{stack}.layer_embedding")
        site = self.p(f"{stack}.site_embedding") if self.plus else None
        dz, dl = self.config.task_embedding_dim, self.config.layer_embedding_dim

        def build():
            const = F.linear(layer, w1[:, dz : dz + dl], b1)  # [L, H]
            if site is not None:
                const = (const[:, None, :] + F.linear(site, w1[:, dz + dl :])[None]).flatten(0, 1)
            return w1[:, :dz].contiguous(), const

        return self._derived(f"mlp0:{stack}", [w1, b1, layer] + ([site] if self.plus else []), build)

    def conditioning(self, z: torch.Tensor, stack: str) -> torch.Tensor:
        """e for every (task, group) with a trailing 1 (the generator's bias): [T * groups, projected_dim + 1].

        Groups as in `_first_layer`; rows are task-major.
        """
        w1z, const = self._first_layer(stack)
        t, g = z.shape[0], const.shape[0]
        # One row per (task, group) even for one task: a single-row product would take a
        # matrix-vector path that rounds differently, and a task must not depend on its batch.
        x = F.linear(z[:, None, :].expand(t, g, -1).reshape(t * g, -1), w1z).view(t, g, -1)
        x = F.relu(x + const).flatten(0, 1)
        x = F.linear(x, self.p(f"{stack}.mlp.2.weight"), self.p(f"{stack}.mlp.2.bias"))
        x = F.layer_norm(x, x.shape[-1:], self.p(f"{stack}.ln.weight"), self.p(f"{stack}.ln.bias"))
        return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)

    def _generated(self, z: torch.Tensor, dtype: torch.dtype | None):
        """Per generator group: its entry keys (per task, in row order) and each part's per-row views."""
        # The generator keeps its own dtype (float32 on a bf16 server); the result is cast once here.
        z = z.to(next(iter(self.params.values())).dtype)
        groups = []
        for stack, n_layers in self.spec.stacks.items():
            sites = self._sites(stack)
            e = self.conditioning(z, stack)
            if self.plus:
                products = [
                    (torch.mm(e, self._generator(stack)), [(i, s) for i in range(n_layers) for s in sites])
                ]
            else:
                products = [
                    (torch.mm(e, self._generator(stack, s)), [(i, s) for i in range(n_layers)]) for s in sites
                ]
            for out, rows in products:
                if dtype is not None:
                    out = out.to(dtype)
                # unbind makes every row's view in one call, not one Python index per tensor
                pieces = [
                    piece.unflatten(1, shape)
                    for piece, shape in zip(out.split(self._widths, dim=1), self._part_shapes, strict=True)
                ]
                pieces[2] = pieces[2].transpose(1, 2)
                parts = [piece.unbind(0) for piece in pieces]
                groups.append(([f"{stack}.{i}.{s}" for i, s in rows], parts))
        return groups

    def generate(self, z: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Adapter weights for each task embedding in z [T, d]: per task, '{stack}.{i}.{site}.{part}'."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(z.shape[0])]
        for keys, parts in self._generated(z, None):
            n = len(keys)
            for part, views in zip(_GENERATED, parts, strict=True):
                names = [f"{key}.{part}" for key in keys]
                for t, weights in enumerate(out):
                    weights.update(zip(names, views[t * n : (t + 1) * n], strict=True))
        return out

    def entries(self, z: torch.Tensor, *, dtype: torch.dtype | None = None) -> list[list[Entry]]:
        """Bank entries (sequential bottleneck + post-LayerNorm) for each task embedding in z, in `dtype`."""
        act = self.config.activation
        result: list[list[Entry]] = [[] for _ in range(z.shape[0])]
        for keys, parts in self._generated(z, dtype):
            n = len(keys)
            for t, entries in enumerate(result):
                rows = (views[t * n : (t + 1) * n] for views in parts)
                entries.extend(
                    Entry(
                        key,
                        "seq",
                        {
                            "down_w": dw,
                            "down_b": db,
                            "up_w": uw,
                            "up_b": ub,
                            "activation": act,
                            "scale": 1.0,
                            "ln": (g, b),
                        },
                    )
                    for key, dw, db, uw, ub, g, b in zip(keys, *rows, strict=True)
                )
        return result
