"""A torch-free description of a backbone, shared by the model, the store and the service."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BackboneSpec"]


class BackboneSpec(BaseModel):
    """What the rest of the system needs to know about a loaded backbone, without torch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Human-readable name or path of the backbone.")
    family: str = Field(description="Architecture family: bert, distilbert, t5, bart, gpt2 or llama.")
    model_type: str = Field(description="The Hugging Face `model_type` (bert, roberta, t5, ...).")
    hidden_size: int = Field(gt=0, description="Width of the residual stream.")
    num_layers: int = Field(ge=0, description="Layers of the encoder stack (0 for decoder-only models).")
    num_decoder_layers: int = Field(
        ge=0, description="Layers of the decoder stack (0 for encoder-only models)."
    )
    num_heads: int = Field(gt=0, description="Attention heads per layer.")
    head_dim: int = Field(gt=0, description="Width of one attention head.")
    num_kv_heads: int = Field(
        default=0, ge=0, description="Key/value heads (grouped-query attention); 0: as many as num_heads."
    )
    intermediate_size: int = Field(gt=0, description="Width of the FFN's inner projection.")
    vocab_size: int = Field(gt=0, description="Tokenizer vocabulary size.")
    max_positions: int = Field(gt=0, description="Longest input the backbone accepts, in tokens.")
    fingerprint: str = Field(description="sha256 over the backbone's parameter names, shapes and values.")

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated attention heads (q/k/v output, o input)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections' outputs (less than inner_dim under grouped-query attention)."""
        return (self.num_kv_heads or self.num_heads) * self.head_dim

    @property
    def stacks(self) -> dict[str, int]:
        """Layer count of each stack that exists in this backbone."""
        out = {}
        if self.num_layers:
            out["encoder"] = self.num_layers
        if self.num_decoder_layers:
            out["decoder"] = self.num_decoder_layers
        return out

    def site_dims(self, site: str) -> tuple[int, int]:
        """Input and output width of a projection site (q, k, v, o, ffn_in, ffn_gate, ffn_out)."""
        h, inner, ff = self.hidden_size, self.inner_dim, self.intermediate_size
        dims = {
            "q": (h, inner),
            "k": (h, self.kv_dim),
            "v": (h, self.kv_dim),
            "o": (inner, h),
            "ffn_in": (h, ff),
            "ffn_gate": (h, ff),
            "ffn_out": (ff, h),
            "cross_q": (h, inner),
            "cross_k": (h, inner),
            "cross_v": (h, inner),
            "cross_o": (inner, h),
        }
        if site not in dims:
            raise KeyError(site)
        return dims[site]
