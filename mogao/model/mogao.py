"""`MogaoModel`: the one shared model every stage trains - backbone, ViT + connector, autoencoder + latent
projections, timestep conditioning - and its forward on a `PackedBatch`, returning the loss terms."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mogao.attention import get_attention_backend
from mogao.diffusion.flow import (
    FlowMatchingLoss,
    TimestepSampling,
    add_noise,
    draw_sigmas_and_noise,
    velocity_target,
)
from mogao.errors import ConfigError
from mogao.model.autoencoder import (
    DiffusersVAE,
    LatentAutoencoder,
    LatentProjector,
    PixelAutoencoder,
    grid_position_embedding,
    patchify,
    unpatchify,
)
from mogao.model.backbone import GenerationModulation, MoTBackbone
from mogao.model.timestep import AdditiveTimestep, TimestepEmbedder
from mogao.model.vision import MLPConnector, VisionEncoder
from mogao.sequence.batch import PackedBatch
from mogao.sequence.loss import LossTerms

CONFIG_NAME = "mogao_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ModelConfig:
    """How to build a Mogao model from pretrained parts.

    Attributes:
        llm: directory of a `transformers` decoder LLM (Qwen2/Qwen3/Llama-style), loaded with `from_pretrained`.
        vit: directory of a `transformers` SigLIP vision model.
        autoencoder: "pixel" for the pixel-space autoencoder of tiny recipes, else a directory of a
            `diffusers` AutoencoderKL (frozen).
        autoencoder_subfolder: subfolder of `autoencoder` holding the VAE (e.g. "vae" inside a pipeline).
        latent_patch: side of the latent patch that becomes one VAE token (2 = 2x2 latent cells).
        attention: ECTF attention backend: "sdpa_dense", "flash_varlen" or "flex".
        text_sees_vae: whether text/ViT queries may attend to VAE tokens (Mogao: false).
        timestep_conditioning: "adaln" (Mogao: AdaLN in the generation expert) or "additive" (BAGEL).
        vit_feature_layer: -1 = last ViT layer, -2 = penultimate.
        vocab_size: grow the LLM's embeddings to at least this size (e.g. the tokenizer's length); None = keep.
        timestep_sampling: how sigma is drawn for generation targets.
        lambda_text / lambda_image: weights of the CE and flow losses in the total.
        latent_position_embedding: add a fixed 2-D sin-cos code of each VAE token's (row, column) to its
            embedding (clean and noisy copies), so a noisy token can find its cell in a condition image.
        prediction: what the generation head outputs. "velocity": v = ε − x₀ directly. "x0": the clean tokens
            x̂₀, turned into v̂ = (x_σ − x̂₀) / max(σ, min_sigma_x0) for the sampler; the training loss is then
            the flow MSE with both velocities scaled by max(σ, min_sigma_x0), i.e. the MSE of x̂₀ (unscaled,
            the 1/σ² of small σ dominates and training stalls). The head never has to reproduce the noise, which matters
            when a token holds many raw values (pixel-space autoencoders: 48 values a token for 4x4 RGB
            patches on a 64-wide model): memorising 8 edits went from 0/8 to 5-6/8 in the same 700 steps.
        min_sigma_x0: the smallest σ the x0 parameterisation divides by.
    """

    llm: str
    vit: str
    autoencoder: str = "pixel"
    autoencoder_subfolder: str | None = None
    latent_patch: int = 2
    attention: str = "sdpa_dense"
    text_sees_vae: bool = False
    timestep_conditioning: Literal["adaln", "additive"] = "adaln"
    vit_feature_layer: int = -1
    vocab_size: int | None = None
    timestep_sampling: TimestepSampling = field(default_factory=TimestepSampling)
    lambda_text: float = 1.0
    lambda_image: float = 1.0
    latent_position_embedding: bool = True
    prediction: Literal["velocity", "x0"] = "velocity"
    min_sigma_x0: float = 0.05


# configs travel inside Lightning checkpoints (hyper-parameters): allow them in weights-only loading
torch.serialization.add_safe_globals([ModelConfig, TimestepSampling])


@dataclass
class NoisyState:
    """The current noisy latents of a batch's generation targets, given by a sampler (not the seeded draw).

    sigmas: (T,) the σ of each generation target, in the batch's target order (`batch.image_is_target`).
    tokens: (n_noisy, token_dim) the noisy latent tokens x_σ in `batch.noisy_index` order (target by target,
        row-major inside a target): what the seeded draw would have made with `add_noise`.
    """

    sigmas: torch.Tensor
    tokens: torch.Tensor


@dataclass
class ModelOutput:
    terms: LossTerms
    velocity: torch.Tensor | None = None  # (n_noisy, token_dim) predicted velocity of the noisy tokens
    text_logits: torch.Tensor | None = None  # (n_und, vocab) when requested


def resolve_checkpoint(path: str, what: str) -> Path:
    """A local checkpoint directory: the path itself, or a hub id ("org/name") already in the local HF cache.

    Nothing is ever downloaded here; a missing checkpoint is a ConfigError naming it and saying how to get it.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or no hub library): report below
            pass
        raise ConfigError(f"{what} checkpoint '{path}' is neither a local directory nor in the local Hugging Face "
                          f"cache; fetch it first (`huggingface-cli download {path}`) or give a local directory")
    raise ConfigError(f"{what} checkpoint directory not found: '{path}' (give a local directory saved with "
                      "save_pretrained, or a hub id already downloaded)")


class MogaoModel(nn.Module):
    """One causal transformer reading and writing interleaved text and images (see DESIGN §2).

    Build from pretrained parts with `MogaoModel.from_parts(cfg)`; save/load a trained model with
    `save_pretrained(dir)` / `MogaoModel.from_pretrained(dir)` (architecture from the saved configs, weights
    from safetensors - the original part checkpoints are not needed).
    """

    def __init__(self, cfg: ModelConfig, llm: nn.Module, vit: VisionEncoder, autoencoder: LatentAutoencoder) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.vocab_size is not None and cfg.vocab_size > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(cfg.vocab_size)
        hidden = int(llm.config.hidden_size)
        if cfg.timestep_conditioning not in ("adaln", "additive"):
            raise ConfigError(f"timestep_conditioning must be 'adaln' or 'additive', got '{cfg.timestep_conditioning}'")
        adaln = cfg.timestep_conditioning == "adaln"
        self.time_embed = TimestepEmbedder(hidden)
        self.backbone = MoTBackbone(llm, adaln_cond_dim=hidden if adaln else None)
        self.additive_time = None if adaln else AdditiveTimestep(hidden)
        self.vit = vit
        self.connector = MLPConnector(vit.hidden_size, hidden)
        self.autoencoder = autoencoder
        self.token_dim = autoencoder.latent_channels * cfg.latent_patch**2
        self.latent_proj = LatentProjector(self.token_dim, hidden)
        self.flow_loss = FlowMatchingLoss()
        self.attention = get_attention_backend(cfg.attention)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, cfg: ModelConfig, dtype: torch.dtype | None = None) -> MogaoModel:
        """Initialise from pretrained parts: the LLM (both experts), SigLIP and the autoencoder."""
        from transformers import AutoModelForCausalLM

        llm = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(cfg.llm, "LLM"), dtype=dtype or torch.float32)
        vit = VisionEncoder.from_pretrained(str(resolve_checkpoint(cfg.vit, "ViT")), feature_layer=cfg.vit_feature_layer)
        return cls(cfg, llm, vit, _autoencoder_from_path(cfg))

    @classmethod
    def from_configs(cls, cfg: ModelConfig, llm_config: dict, vit_config: dict, ae_config: dict | None) -> MogaoModel:
        """Random-init architecture from configs (used to load a saved model, and on the meta device)."""
        from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig

        llm_cfg = AutoConfig.for_model(**llm_config)
        llm = AutoModelForCausalLM.from_config(llm_cfg)
        vit = VisionEncoder.from_config(SiglipVisionConfig(**vit_config), feature_layer=cfg.vit_feature_layer)
        ae = PixelAutoencoder() if ae_config is None else DiffusersVAE.from_config(ae_config)
        return cls(cfg, llm, vit, ae)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write `mogao_config.json` and `model.safetensors` to `directory`.

        state_dict: the full weights to write instead of the module's own (e.g. gathered from a sharded model,
            where the module holds only this rank's shards); tied duplicates are written once.
        """
        from safetensors.torch import save_file, save_model

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": asdict(self.cfg),
            "llm_config": self.backbone.config.to_dict(),
            "vit_config": self.vit.config.to_dict(),
            "autoencoder_config": None if isinstance(self.autoencoder, PixelAutoencoder) else dict(self.autoencoder.config),
        }
        (d / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=str))
        if state_dict is None:
            save_model(self, str(d / WEIGHTS_NAME))
            return
        tied = ({n for n, _ in self.named_parameters(remove_duplicate=False)}
                - {n for n, _ in self.named_parameters()})
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k not in tied},
                  str(d / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: object) -> MogaoModel:
        model = cls.from_configs(*cls.saved_architecture(directory, **overrides))
        _load_checked(model, Path(directory) / WEIGHTS_NAME)
        model.source_path = str(directory)  # where it came from, for messages (e.g. a LoRA adapter's base)
        return model

    @staticmethod
    def saved_architecture(directory: str | Path, **overrides: object) -> tuple[ModelConfig, dict, dict, dict | None]:
        """(config with `overrides`, LLM, ViT and autoencoder configs) of a saved model: what `from_configs`
        rebuilds it from (`from_pretrained`, and per-shard loading on the meta device)."""
        d = Path(directory)
        if not (d / CONFIG_NAME).is_file():
            raise ConfigError(f"'{d}' is not a saved mogao model: {CONFIG_NAME} missing")
        if not (d / WEIGHTS_NAME).is_file():
            raise ConfigError(f"'{d}' has {CONFIG_NAME} but no {WEIGHTS_NAME}: an incomplete save?")
        try:
            meta = json.loads((d / CONFIG_NAME).read_text())
            mc = dict(meta["model"])
            mc["timestep_sampling"] = TimestepSampling(**mc.get("timestep_sampling", {}))
            mc["vocab_size"] = None  # the saved LLM config already has the final size
            mc.update(overrides)
            cfg = ModelConfig(**mc)
            parts = (meta["llm_config"], meta["vit_config"], meta["autoencoder_config"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"'{d / CONFIG_NAME}' is not a valid mogao config ({type(e).__name__}: {e})") from e
        return (cfg, *parts)

    # ---- properties the data side links to ---------------------------------------------------
    @property
    def vit_patch(self) -> int:
        """Pixels per ViT token side."""
        return int(self.vit.patch_size)

    @property
    def vae_patch(self) -> int:
        """Pixels per VAE token side (autoencoder downsample x latent patch)."""
        return int(self.autoencoder.downsample * self.cfg.latent_patch)

    # ---- forward ------------------------------------------------------------------------------
    def image_tokens(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Images (3, H, W) in [0, 1] -> their latent tokens (gh*gw, token_dim): the x₀ of flow matching."""
        return [patchify(lat, self.cfg.latent_patch) for lat in self.autoencoder.encode(pixels)]

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Latent tokens (gh*gw, token_dim) of one image -> the image (3, H, W), float32 in [0, 1].

        The inverse of `image_tokens`: `unpatchify` to the latent, then the autoencoder's decoder.
        """
        p = self.cfg.latent_patch
        latent = unpatchify(tokens.float(), grid, p, self.autoencoder.latent_channels)
        return self.autoencoder.decode([latent])[0]

    def embed_latents(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """VAE tokens (n, token_dim) at IL-RoPE positions (3, n) -> their input embeddings (n, hidden): the
        in-projection plus, with `latent_position_embedding`, the fixed code of each token's (row, column)."""
        h = self.latent_proj.proj_in(tokens)
        if self.cfg.latent_position_embedding:
            h = h + grid_position_embedding(position_ids[1], position_ids[2], h.shape[-1]).to(h.dtype)
        return h

    def predict_velocity(self, h: torch.Tensor, noisy_tokens: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The velocity prediction (n, token_dim) from the generation expert's final states h (n, hidden) of
        noisy tokens `noisy_tokens` (n, token_dim) at per-token σ (n, 1) or a scalar: see `prediction`."""
        out = self.latent_proj.proj_out(h)
        if self.cfg.prediction == "velocity":
            return out
        sigma = torch.as_tensor(sigma, device=out.device, dtype=torch.float32).clamp_min(self.cfg.min_sigma_x0)
        return ((noisy_tokens.float() - out.float()) / sigma).to(out.dtype)

    def embed_images(self, batch: PackedBatch, x: torch.Tensor, noisy: NoisyState | None = None):
        """Write ViT, clean-VAE and noisy-VAE token embeddings into x (N, hidden); returns the flow targets.

        With `noisy` the noisy copies take the given tokens and σ instead of the seeded draw; there is then no
        flow target (the returned target and weights are None).
        """
        vit_tokens = self.connector(torch.cat(self.vit(batch.vit_pixels), dim=0)).to(x.dtype)
        x = x.index_copy(0, batch.vit_index, vit_tokens)
        has_clean = batch.image_has_clean.tolist()
        target_ids = batch.image_is_target.nonzero().flatten().tolist()
        encode = batch.encoded_images.nonzero().flatten().tolist()
        tokens = self.image_tokens([batch.vae_pixels[i] for i in encode]) if encode else []
        x0 = {i: t.to(x.dtype) for i, t in zip(encode, tokens)}  # per image (gh*gw, C*p*p)
        pos = batch.position_ids
        if batch.vae_clean_index.numel():
            clean = torch.cat([x0[i] for i in encode if has_clean[i]], dim=0)
            x = x.index_copy(0, batch.vae_clean_index, self.embed_latents(clean, pos[:, batch.vae_clean_index]))
        if not target_ids:
            return x, None, None, None, None
        if noisy is not None:
            want = ((len(target_ids),), (batch.noisy_index.numel(), self.token_dim))
            got = (tuple(noisy.sigmas.shape), tuple(noisy.tokens.shape))
            if got != want:
                raise ValueError(f"NoisyState: sigmas {got[0]} and tokens {got[1]} do not match the batch: "
                                 f"expected {want[0]} and {want[1]}")
            noisy_in = self.embed_latents(noisy.tokens.to(x.device, x.dtype), pos[:, batch.noisy_index])
            x = x.index_copy(0, batch.noisy_index, noisy_in)
            return x, noisy.sigmas.to(x.device, torch.float32), None, None, noisy.tokens.to(x.device, x.dtype)
        x0_t = [x0[i] for i in target_ids]
        sigmas, noise = draw_sigmas_and_noise(
            batch.image_seed[target_ids], [tuple(t.shape) for t in x0_t], [t.shape[0] for t in x0_t],
            self.cfg.timestep_sampling, x.device, x.dtype,
        )
        counts = torch.tensor([t.shape[0] for t in x0_t], device=x.device)
        sigma_tok = sigmas.repeat_interleave(counts)[:, None]
        x0_cat, eps = torch.cat(x0_t), torch.cat(noise)
        x_sigma = add_noise(x0_cat, eps, sigma_tok).to(x.dtype)
        x = x.index_copy(0, batch.noisy_index, self.embed_latents(x_sigma, pos[:, batch.noisy_index]))
        weights = batch.image_loss_weight[target_ids].to(x.dtype).repeat_interleave(counts)
        return x, sigmas, velocity_target(x0_cat, eps), weights, x_sigma

    def _modulation(self, batch: PackedBatch, sigmas: torch.Tensor | None, dtype: torch.dtype) -> GenerationModulation:
        """Timestep conditioning rows: row 0 is sigma=0 (clean VAE tokens), row 1+i the i-th target's sigma."""
        lay = batch.layout
        n_gen = lay.num_tokens - lay.n_und
        dev = batch.input_ids.device
        rows = torch.zeros(1, device=dev)
        index = torch.zeros(n_gen, dtype=torch.long, device=dev)
        if sigmas is not None:
            rows = torch.cat((rows, sigmas.float()))
            counts = _target_token_counts(batch)
            per = torch.arange(1, counts.shape[0] + 1, device=dev).repeat_interleave(counts)
            index[batch.noisy_index - lay.n_und] = per
        return GenerationModulation(self.time_embed(rows).to(dtype), index)

    def forward(
        self, batch: PackedBatch, return_logits: bool = False, noisy: NoisyState | None = None
    ) -> ModelOutput:
        """Loss terms of a packed batch; optionally the text logits of the understanding tokens.

        noisy: sampling mode - the targets' noisy tokens and σ come from the caller (see `NoisyState`) instead
            of the seeded draw; `velocity` is then the prediction for those tokens and the flow loss is 0.
        """
        lay = batch.layout
        n_und = lay.n_und
        x = self.backbone.embed_tokens(batch.input_ids)
        sigmas = v_target = weights = x_sigma = None
        if batch.num_images:
            x, sigmas, v_target, weights, x_sigma = self.embed_images(batch, x, noisy)
        mod = None
        if lay.num_tokens > n_und:
            mod = self._modulation(batch, sigmas, x.dtype)
            if self.additive_time is not None:
                add = self.additive_time(mod.cond).index_select(0, mod.index)
                x = torch.cat((x[:n_und], x[n_und:] + add))
                mod = None
        prepared = self.attention.prepare(lay, self.cfg.text_sees_vae)
        h_und, h_gen = self.backbone(x, batch.position_ids, n_und, self.attention, prepared, mod)

        labels = batch.labels[:n_und]
        sel = labels != -100
        logits_sel = self.backbone.lm_head(h_und[sel]).float()
        text_sum = F.cross_entropy(logits_sel, labels[sel], reduction="sum")
        text_weight = sel.sum().to(text_sum.dtype)
        velocity = None
        if v_target is not None or (noisy is not None and sigmas is not None):
            sigma_tok = sigmas.repeat_interleave(_target_token_counts(batch))[:, None]
            velocity = self.predict_velocity(h_gen.index_select(0, batch.noisy_index - n_und), x_sigma, sigma_tok)
        if v_target is not None:
            pred, want = velocity.float(), v_target.float()
            if self.cfg.prediction == "x0":  # σ·(v̂ − v) = x̂₀ − x₀ (σ above the clamp): the MSE of x̂₀
                scale = sigma_tok.float().clamp_min(self.cfg.min_sigma_x0)
                pred, want = pred * scale, want * scale
            image_sum, image_weight = self.flow_loss(pred, want, weights.float())
        else:
            image_sum = h_gen.sum() * 0.0 if h_gen.numel() else text_sum * 0.0
            image_weight = torch.zeros((), device=x.device)
        terms = LossTerms(text_sum, text_weight, image_sum, image_weight)
        logits = self.backbone.lm_head(h_und).float() if return_logits else None
        return ModelOutput(terms=terms, velocity=velocity, text_logits=logits)


def _target_token_counts(batch: PackedBatch) -> torch.Tensor:
    """Tokens of each generation target's noisy copy, in target order (the order of `batch.noisy_index`)."""
    grids = batch.image_grid[batch.image_is_target]
    return grids[:, 0] * grids[:, 1]


def _load_checked(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`, refusing (with the differences named) weights of another
    architecture, and reporting an unreadable file as such."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"cannot read weights '{path}': {e} (truncated or not a safetensors file?)") from e
    own = model.state_dict()
    by_storage: dict[tuple[int, int], set[str]] = {}
    for k, v in own.items():  # tied weights are saved once (e.g. embeddings and LM head)
        by_storage.setdefault((v.untyped_storage().data_ptr(), v.storage_offset()), set()).add(k)
    tied = {k: names for names in by_storage.values() for k in names}
    missing = sorted(k for k in set(own) - set(saved) if not (tied[k] & set(saved)))
    unexpected = sorted(set(saved) - set(own))
    shapes = [f"{k}: saved {tuple(saved[k].shape)}, model {tuple(own[k].shape)}" for k in sorted(set(own) & set(saved))
              if saved[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:3]) + (f" (+{len(xs) - 3} more)" if len(xs) > 3 else "")

        why = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
               f"shape mismatch {few(shapes)}" if shapes else ""]
        raise ConfigError(f"weights '{path}' are for another architecture than its config describes: "
                          + "; ".join(w for w in why if w))
    model.load_state_dict(saved, strict=False)  # keys checked above; tied duplicates are filled by their twin


def _autoencoder_from_path(cfg: ModelConfig) -> LatentAutoencoder:
    if cfg.autoencoder == "pixel":
        return PixelAutoencoder()
    return DiffusersVAE.from_pretrained(str(resolve_checkpoint(cfg.autoencoder, "autoencoder")), subfolder=cfg.autoencoder_subfolder)
