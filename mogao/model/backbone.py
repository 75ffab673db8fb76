"""Deep-fusion (mixture-of-transformers) backbone built from a pretrained HF decoder LLM.

Every layer keeps ONE global self-attention over the packed sequence, but its projections, norms and MLP are
duplicated per expert: the understanding expert (the LLM's own weights: text and ViT tokens) and the
generation expert (a copy made at init: clean and noisy VAE tokens). Routing is by a fixed per-token modality;
the packed layout puts all understanding tokens first (see `mogao.sequence.layout`), so each expert is one
contiguous slice and every projection is one dense matmul per expert.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from mogao.errors import ConfigError
from mogao.model.rope import InterleavedRope, apply_rope
from mogao.model.timestep import AdaLNModulation, modulate

_REQUIRED = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


@dataclass
class GenerationModulation:
    """AdaLN inputs for the generation expert of one batch.

    cond:  (R, cond_dim) distinct conditioning rows (one per distinct timestep)
    index: (n_gen,) row of `cond` for each generation-expert token
    """

    cond: torch.Tensor
    index: torch.Tensor


class MoTDecoderLayer(nn.Module):
    """One decoder layer with an understanding and a generation expert sharing one attention."""

    def __init__(self, und: nn.Module, gen: nn.Module, adaln: AdaLNModulation | None) -> None:
        super().__init__()
        for name in _REQUIRED:
            if not hasattr(und, name):
                raise ConfigError(
                    f"decoder layer {type(und).__name__} has no '{name}': only Qwen2/Qwen3/Llama-style layers "
                    "(self_attn.{q,k,v,o}_proj, mlp, input_layernorm, post_attention_layernorm) are supported"
                )
        self.und = und
        self.gen = gen
        self.gen_adaln = adaln
        attn = und.self_attn
        self.head_dim = int(attn.head_dim)
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))

    def _qkv(self, expert: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = expert.self_attn
        # (n, heads * D) -> (n, heads, D); unflatten also works for n = 0 (a cached step with no text/ViT token)
        q = attn.q_proj(h).unflatten(-1, (-1, self.head_dim))
        k = attn.k_proj(h).unflatten(-1, (-1, self.head_dim))
        v = attn.v_proj(h).unflatten(-1, (-1, self.head_dim))
        if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head q/k norms
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        n_und: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention,
        prepared: object,
        mod: GenerationModulation | None = None,
        all_paths: bool = False,
    ) -> torch.Tensor:
        # x: (N, hidden); tokens [0, n_und) -> understanding expert, [n_und, N) -> generation expert.
        # all_paths: run the generation expert even on zero tokens, so that each of its parameters is in the
        # graph (with a zero gradient) whatever the batch holds - see `MogaoModel.forward`.
        x_und, x_gen = x[:n_und], x[n_und:]
        has_gen = x_gen.shape[0] > 0 or all_paths
        m = None
        if has_gen and self.gen_adaln is not None and mod is not None:
            rows = self.gen_adaln(mod.cond)  # six (R, hidden) tensors
            m = [r.index_select(0, mod.index) for r in rows]

        h_und = self.und.input_layernorm(x_und)
        parts = [self._qkv(self.und, h_und)]
        if has_gen:
            h_gen = self.gen.input_layernorm(x_gen)
            if m is not None:
                h_gen = modulate(h_gen, m[0], m[1])
            parts.append(self._qkv(self.gen, h_gen))
        q, k, v = (torch.cat(t, dim=0) if len(parts) > 1 else t[0] for t in zip(*parts))
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        o = attention(q, k, v, prepared, scale=self.scaling).reshape(x.shape[0], -1)

        out_und = self._mlp_block(self.und, x_und + self.und.self_attn.o_proj(o[:n_und]), None)
        if not has_gen:
            return out_und
        a = self.gen.self_attn.o_proj(o[n_und:])
        if m is not None:
            a = a * (1 + m[2])
        out_gen = self._mlp_block(self.gen, x_gen + a, m[3:6] if m is not None else None)
        return torch.cat((out_und, out_gen), dim=0)

    @staticmethod
    def _mlp_block(expert: nn.Module, x: torch.Tensor, m: list[torch.Tensor] | None) -> torch.Tensor:
        # m: (shift, scale, gate) of the MLP branch when the generation expert is modulated
        h = expert.post_attention_layernorm(x)
        if m is not None:
            h = modulate(h, m[0], m[1])
            return x + expert.mlp(h) * (1 + m[2])
        return x + expert.mlp(h)


def add_qk_norms(layers: nn.ModuleList, eps: float) -> None:
    """Give the attention of each decoder layer a per-head RMSNorm of queries (`q_norm`) and keys (`k_norm`),
    weight (head_dim,) at one: `MoTDecoderLayer._qkv` applies them after the projections and before RoPE.
    This is Qwen3's attention on a Qwen2 LLM (q/k/v biases, no o_proj bias): BAGEL's `qk_norm`. The norm is
    Qwen2's RMSNorm (float32 statistics, weight applied in the input's dtype), the one BAGEL builds. An LLM
    that has q/k norms already is refused: the option would add nothing."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            raise ConfigError(f"qk_norm: layer {i} of the LLM ({type(attn).__name__}) has q/k norms already; the "
                              "option adds them to LLMs without (Qwen2, Llama) - leave it off for this LLM")
        like = layer.input_layernorm.weight  # (a norm: never quantised, unlike the projections)
        dim = int(attn.head_dim)
        attn.q_norm = Qwen2RMSNorm(dim, eps=eps).to(device=like.device, dtype=like.dtype)
        attn.k_norm = Qwen2RMSNorm(dim, eps=eps).to(device=like.device, dtype=like.dtype)


class MoTBackbone(nn.Module):
    """Embeddings, MoT layers, per-expert final norms and the LM head of a decoder LLM.

    `llm` is a `transformers` causal LM (Qwen2/Qwen3/Llama-style). Its modules are reused as the
    understanding expert (tied embeddings stay tied); the generation expert is a deep copy.
    `adaln_cond_dim` adds AdaLN timestep modulation to the generation expert (None: no modulation).
    `qk_norm` adds per-head q/k RMSNorms to an LLM without them (`add_qk_norms`), in both experts.
    """

    def __init__(self, llm: nn.Module, adaln_cond_dim: int | None = None, qk_norm: bool = False,
                 rope_axes: str = "interleaved") -> None:
        super().__init__()
        decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, "model", None)
        if decoder is None or not hasattr(decoder, "layers") or not hasattr(llm, "lm_head"):
            raise ConfigError(f"{type(llm).__name__} is not a decoder-only causal LM with .model.layers and .lm_head")
        self.config = llm.config
        hidden = int(self.config.hidden_size)
        if qk_norm:  # before the generation expert is copied, so that it gets its own
            add_qk_norms(decoder.layers, float(getattr(self.config, "rms_norm_eps", 1e-6)))
        self.hidden_size = hidden
        self.embed_tokens = decoder.embed_tokens
        self.layers = nn.ModuleList(
            MoTDecoderLayer(
                und=layer,
                gen=copy.deepcopy(layer),
                adaln=AdaLNModulation(adaln_cond_dim, hidden) if adaln_cond_dim else None,
            )
            for layer in decoder.layers
        )
        self.norm = decoder.norm
        self.gen_norm = copy.deepcopy(decoder.norm)
        self.lm_head = llm.lm_head
        rotary = decoder.rotary_emb
        self.rope = InterleavedRope(rotary.inv_freq, getattr(rotary, "attention_scaling", 1.0), axes=rope_axes)

    @torch.no_grad()
    def copy_understanding_to_generation(self) -> None:
        """Set every generation-expert layer and the generation final norm to the understanding expert's weights."""
        for layer in self.layers:
            layer.gen.load_state_dict(layer.und.state_dict())
        self.gen_norm.load_state_dict(self.norm.state_dict())

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        n_und: int,
        attention,
        prepared: object,
        mod: GenerationModulation | None = None,
        all_paths: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, hidden) input embeddings in physical order; position_ids: (3, N).

        Returns the final-normed hidden states of the understanding tokens (n_und, hidden) and of the
        generation tokens (N - n_und, hidden). all_paths: every layer runs both experts, on zero tokens where
        the sequence has none for one of them (`MoTDecoderLayer.forward`).
        """
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, n_und, cos, sin, attention, prepared, mod, all_paths)
        return self.norm(x[:n_und]), self.gen_norm(x[n_und:])

    def understanding_parameters(self):
        yield from self.embed_tokens.parameters()
        for layer in self.layers:
            yield from layer.und.parameters()
        yield from self.norm.parameters()
        if self.lm_head.weight is not self.embed_tokens.weight:
            yield from self.lm_head.parameters()

    def generation_parameters(self):
        for layer in self.layers:
            yield from layer.gen.parameters()
            if layer.gen_adaln is not None:
                yield from layer.gen_adaln.parameters()
        yield from self.gen_norm.parameters()
