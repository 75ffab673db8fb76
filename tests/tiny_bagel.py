"""A tiny BAGEL-format folder for the tests of `mogao.bagel`, written the way BAGEL writes one and using none of
mogao.bagel's code: the weights come from small module trees that repeat the attribute names of BAGEL's
classes (Bagel, Qwen2ForCausalLM with Qwen2MoTDecoderLayer / PackedAttentionMoT, SiglipVisionModel with its
patch embedding converted to a Linear, MLPconnector, TimestepEmbedder, PositionEmbedding) and of Black Forest
Labs' FLUX autoencoder, saved with `safetensors.torch.save_file` of their `state_dict()` (what BAGEL's
`fsdp_save_ckpt` does); the configs are plain JSON; the tokenizer a small byte-level BPE with Qwen2.5's
special tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]


# ---- the BAGEL model tree (names and shapes only) -------------------------------------------------------


class _Attention(nn.Module):  # PackedAttentionMoT: Qwen2 attention + q/k norms, each twice
    def __init__(self, h: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        d = h // heads
        for sfx in ("", "_moe_gen"):
            setattr(self, f"q_proj{sfx}", nn.Linear(h, heads * d, bias=True))
            setattr(self, f"k_proj{sfx}", nn.Linear(h, kv_heads * d, bias=True))
            setattr(self, f"v_proj{sfx}", nn.Linear(h, kv_heads * d, bias=True))
            setattr(self, f"o_proj{sfx}", nn.Linear(heads * d, h, bias=False))
            setattr(self, f"q_norm{sfx}", nn.RMSNorm(d))
            setattr(self, f"k_norm{sfx}", nn.RMSNorm(d))


class _MLP(nn.Module):  # Qwen2MLP
    def __init__(self, h: int, inter: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, inter, bias=False), nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)


class _Layer(nn.Module):  # Qwen2MoTDecoderLayer
    def __init__(self, h: int, inter: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.self_attn = _Attention(h, heads, kv_heads)
        self.mlp, self.mlp_moe_gen = _MLP(h, inter), _MLP(h, inter)
        for name in ("input_layernorm", "input_layernorm_moe_gen", "post_attention_layernorm",
                     "post_attention_layernorm_moe_gen"):
            setattr(self, name, nn.RMSNorm(h))


class _Table(nn.Module):  # PositionEmbedding: one frozen parameter
    def __init__(self, side: int, h: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(side * side, h), requires_grad=False)


def bagel_state(llm: dict, vit: dict, latent_patch: int, max_latent: int, vit_max: int,
                latent_channels: int) -> dict[str, torch.Tensor]:
    """The state dict of BAGEL's `Bagel` module for these configs (random values)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    h = llm["hidden_size"]
    lm = nn.Module()
    lm.model = nn.Module()
    lm.model.embed_tokens = nn.Embedding(llm["vocab_size"], h)
    lm.model.layers = nn.ModuleList(_Layer(h, llm["intermediate_size"], llm["num_attention_heads"],
                                           llm["num_key_value_heads"]) for _ in range(llm["num_hidden_layers"]))
    lm.model.norm, lm.model.norm_moe_gen = nn.RMSNorm(h), nn.RMSNorm(h)
    lm.lm_head = nn.Linear(h, llm["vocab_size"], bias=False)
    vit_cfg = SiglipVisionConfig(**{**vit, "num_hidden_layers": vit["num_hidden_layers"] - 1, "vision_use_head": False})
    vit_model = nn.Module()  # BAGEL's SiglipVisionModel keeps its tower under `vision_model`
    vit_model.vision_model = SiglipVisionModel(vit_cfg)
    emb = vit_model.vision_model.embeddings
    conv = emb.patch_embedding
    linear = nn.Linear(conv.in_channels * conv.kernel_size[0] ** 2, conv.out_channels)
    linear.weight.data = conv.weight.data.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # BAGEL's conversion
    linear.bias.data = conv.bias.data
    emb.patch_embedding = linear
    bagel = nn.Module()
    bagel.language_model = lm
    bagel.time_embedder = nn.Module()
    bagel.time_embedder.mlp = nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, h))
    token_dim = latent_patch**2 * latent_channels
    bagel.vae2llm, bagel.llm2vae = nn.Linear(token_dim, h), nn.Linear(h, token_dim)
    bagel.latent_pos_embed = _Table(max_latent, h)
    bagel.vit_model = vit_model
    bagel.connector = nn.Module()
    bagel.connector.fc1, bagel.connector.fc2 = nn.Linear(vit["hidden_size"], h), nn.Linear(h, h)
    bagel.vit_pos_embed = _Table(vit_max, h)
    with torch.no_grad():
        for p in bagel.parameters():
            p.normal_(0.0, 0.1)
    return {k: v.detach().clone() for k, v in bagel.state_dict().items()}


# ---- Black Forest Labs' autoencoder tree, with its decoder's forward -----------------------------------------


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(nn.functional.silu(self.norm2(self.conv1(nn.functional.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(nn.Module):
    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (b, hw, c)
        a = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1) @ v
        return x + self.proj_out(a.transpose(1, 2).reshape(b, c, hh, ww))


class _Mid(nn.Module):
    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = _Res(c, c, groups), _Attn(c, groups), _Res(c, c, groups)


class FluxAutoencoderReplica(nn.Module):
    """BFL's AutoEncoder tree (encoder.down[i].block[j], decoder.up[i] listed from the highest resolution,
    mid.block_1/attn_1/block_2, ...) with a plain re-implementation of the decoder's forward."""

    def __init__(self, ch: tuple[int, ...], res_blocks: int, z: int, groups: int) -> None:
        super().__init__()
        n = len(ch)
        enc = self.encoder = nn.Module()
        enc.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        enc.down = nn.ModuleList()
        cin = ch[0]
        for i in range(n):
            lvl = nn.Module()
            lvl.block = nn.ModuleList(_Res(cin if j == 0 else ch[i], ch[i], groups) for j in range(res_blocks))
            cin = ch[i]
            if i != n - 1:
                lvl.downsample = nn.Module()
                lvl.downsample.conv = nn.Conv2d(cin, cin, 3, stride=2)
            enc.down.append(lvl)
        enc.mid, enc.norm_out, enc.conv_out = _Mid(cin, groups), _norm(cin, groups), nn.Conv2d(cin, 2 * z, 3, padding=1)
        dec = self.decoder = nn.Module()
        dec.conv_in = nn.Conv2d(z, ch[-1], 3, padding=1)
        dec.mid = _Mid(ch[-1], groups)
        ups = []
        cin = ch[-1]
        for i in reversed(range(n)):
            lvl = nn.Module()
            lvl.block = nn.ModuleList(_Res(cin if j == 0 else ch[i], ch[i], groups) for j in range(res_blocks + 1))
            cin = ch[i]
            if i != 0:
                lvl.upsample = nn.Module()
                lvl.upsample.conv = nn.Conv2d(cin, cin, 3, padding=1)
            ups.insert(0, lvl)
        dec.up = nn.ModuleList(ups)
        dec.norm_out, dec.conv_out = _norm(ch[0], groups), nn.Conv2d(ch[0], 3, 3, padding=1)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder on a raw (unnormalised) latent."""
        d = self.decoder
        h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(d.conv_in(z))))
        for i in reversed(range(len(d.up))):
            for blk in d.up[i].block:
                h = blk(h)
            if i != 0:
                h = d.up[i].upsample.conv(nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        return d.conv_out(nn.functional.silu(d.norm_out(h)))


def flux_replica(ch=(8, 16), res_blocks: int = 1, z: int = 4, groups: int = 4, seed: int = 0) -> FluxAutoencoderReplica:
    torch.manual_seed(seed)
    ae = FluxAutoencoderReplica(tuple(ch), res_blocks, z, groups)
    with torch.no_grad():
        for p in ae.parameters():
            p.normal_(0.0, 0.2)
    return ae.eval()


# ---- the folder -------------------------------------------------------------------------------------------


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Draw a red cat.", "A blue square on the left.", "What colour is the cat?"] * 4, trainer)
    return tok


@dataclass
class TinyBagel:
    path: Path
    llm: dict
    vit: dict
    latent_patch: int
    max_latent: int
    vit_max: int
    ae_channels: tuple[int, ...]
    ae_res_blocks: int
    latent_channels: int
    ae_groups: int


TINY_VIT = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 2,
            "patch_size": 4, "image_size": 16, "num_channels": 3, "layer_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh", "model_type": "siglip_vision_model", "attention_dropout": 0.0}


def write_tiny_bagel(path: Path, seed: int = 0) -> TinyBagel:
    """A tiny BAGEL folder at `path`: 2 MoT layers of width 32, a 2-layer ViT (config: 3), a FLUX-layout
    autoencoder of channels (8, 16) with 4 latent channels, position tables of side 4."""
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "model_max_length": 512}))
    llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": tok.get_vocab_size() + 20,
           "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
           "use_sliding_window": False, "sliding_window": 512, "max_window_layers": 2, "attention_dropout": 0.0,
           "bos_token_id": 1, "eos_token_id": 2, "is_causal": True, "_attn_implementation": "flash_attention_2",
           "qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer", "freeze_und": False}
    tiny = TinyBagel(path, llm, dict(TINY_VIT), latent_patch=2, max_latent=4, vit_max=4, ae_channels=(8, 16),
                     ae_res_blocks=1, latent_channels=4, ae_groups=8)
    (path / "llm_config.json").write_text(json.dumps(llm, indent=2))
    (path / "vit_config.json").write_text(json.dumps(tiny.vit, indent=2))
    state = bagel_state(llm, tiny.vit, tiny.latent_patch, tiny.max_latent, tiny.vit_max, tiny.latent_channels)
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path / "ema.safetensors"))
    ae = flux_replica(tiny.ae_channels, tiny.ae_res_blocks, tiny.latent_channels, tiny.ae_groups, seed=seed)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(path / "ae.safetensors"))
    return tiny


def tiny_settings(tiny: TinyBagel):
    from mogao.bagel.configs import BagelSettings
    from mogao.bagel.flux_ae import FluxAEConfig

    return BagelSettings(latent_patch_size=tiny.latent_patch, max_latent_size=tiny.max_latent,
                         vit_max_num_patch_per_side=tiny.vit_max,
                         autoencoder=FluxAEConfig(block_out_channels=tiny.ae_channels, layers_per_block=tiny.ae_res_blocks,
                                                  latent_channels=tiny.latent_channels, norm_num_groups=tiny.ae_groups))
