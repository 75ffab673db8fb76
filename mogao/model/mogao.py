"""`MogaoModel`: the one shared model every stage trains - backbone, ViT + connector, autoencoder + latent
projections, timestep conditioning - and its forward on a `PackedBatch`, returning the loss terms."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mogao.attention import get_attention_backend
from mogao.diffusion.flow import (
    FlowMatchingLoss,
    add_noise,
    draw_sigmas_and_noise,
    velocity_target,
)
from mogao.errors import ConfigError
from mogao.model.autoencoder import (
    DiffusersVAE,
    LatentAutoencoder,
    LatentProjector,
    grid_position_embedding,
    patchify,
    position_table_rows,
    sincos_position_table,
    unpatchify,
)
from mogao.model.backbone import GenerationModulation, MoTBackbone
from mogao.model.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig, model_architecture
from mogao.model.config import resolve_checkpoint as resolve_checkpoint  # (importable from here too)
from mogao.model.rope import ROPE_AXES
from mogao.model.timestep import AdditiveTimestep, TimestepEmbedder
from mogao.model.vision import MLPConnector, VisionEncoder
from mogao.sequence.batch import PackedBatch
from mogao.sequence.formats import POSITION_SCHEMES, check_choice
from mogao.sequence.loss import LossTerms


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
class SequenceInputs:
    """What the input embeddings of one forward are made of (`MogaoModel.embed_inputs`), rows in physical order
    (understanding tokens first). Index tensors name rows of the sequence.

    input_ids: (N,) text ids; rows of image tokens may hold any id (their embedding is replaced).
    position_ids: (3, N) rotary positions (the model's scheme, `ModelConfig.positions`).
    grid_cells: (2, N) the (row, column) of each image token in its image's token grid (any value elsewhere);
        None: rows 1 and 2 of position_ids, which hold them under IL-RoPE only (the other schemes need them).
    n_und: rows [0, n_und) are understanding tokens (text, ViT), the rest generation tokens (VAE copies).
    vit_pixels: the ViT copy (3, gh*vit_patch, gw*vit_patch) of each image that has one (`PackedBatch.image_has_vit`);
        vit_index: the rows of their tokens, image after image, row-major.
    clean_tokens: (n_clean, token_dim) latent tokens of the clean VAE copies, or clean_pixels: those images
        (3, gh*vae_patch, gw*vae_patch), encoded here; clean_index: their rows.
    noisy_tokens: (n_noisy, token_dim) the noisy latents x_σ; noisy_index: their rows; noisy_target: (n_noisy,)
        which noisy target (an index into `sigmas`) each token belongs to; sigmas: (T,) float32 σ of each target.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    n_und: int
    grid_cells: torch.Tensor | None = None
    vit_pixels: list[torch.Tensor] = field(default_factory=list)
    vit_index: torch.Tensor | None = None
    clean_tokens: torch.Tensor | None = None
    clean_pixels: list[torch.Tensor] = field(default_factory=list)
    clean_index: torch.Tensor | None = None
    noisy_tokens: torch.Tensor | None = None
    noisy_index: torch.Tensor | None = None
    noisy_target: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None


@dataclass
class FlowTargets:
    """The flow-matching targets of a batch's noisy tokens: velocity v = ε − x₀ (n_noisy, token_dim) and the
    per-token loss weight (n_noisy,)."""

    velocity: torch.Tensor
    weights: torch.Tensor


@dataclass
class ModelOutput:
    terms: LossTerms | None  # None for a step of incremental generation
    velocity: torch.Tensor | None = None  # (n_noisy, token_dim) predicted velocity of the noisy tokens
    text_logits: torch.Tensor | None = None  # (n_und, vocab) when requested


class MogaoModel(nn.Module):
    """One causal transformer reading and writing interleaved text and images (see DESIGN §2).

    Build or load one with `mogao.model.io.load_model`: from pretrained components (`load_model(ModelConfig(...))`),
    or a trained model saved with `save_pretrained(dir)` (`load_model(dir)`: architecture from the saved
    configs, weights from safetensors - the original part checkpoints are not needed).
    """

    def __init__(self, cfg: ModelConfig, llm: nn.Module, vit: VisionEncoder, autoencoder: LatentAutoencoder) -> None:
        super().__init__()
        # its own copy: a schedule that changes, say, the timestep shift of this model changes nothing of the
        # config it was built from (e.g. the hyper-parameters a checkpoint records)
        self.cfg = copy.deepcopy(cfg)
        if cfg.vocab_size is not None and cfg.vocab_size > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(cfg.vocab_size)
        hidden = int(llm.config.hidden_size)
        if cfg.timestep_conditioning not in ("adaln", "additive"):
            raise ConfigError(f"timestep_conditioning must be 'adaln' or 'additive', got '{cfg.timestep_conditioning}'")
        _check_options(cfg, hidden, autoencoder)
        adaln = cfg.timestep_conditioning == "adaln"
        bagel_time = cfg.timestep_embedding == "bagel"
        # the σ embedding: AdaLN's input; with BAGEL's embedder, the additive term itself; with Mogao's additive
        # conditioning kept but unused (`additive_time` gives the term)
        self.time_embed = TimestepEmbedder(hidden, scale=1.0 if bagel_time else 1000.0)
        self.backbone = MoTBackbone(llm, adaln_cond_dim=hidden if adaln else None, qk_norm=cfg.qk_norm,
                                    rope_axes=cfg.rope_axes)
        self.additive_time = None if adaln or bagel_time else AdditiveTimestep(hidden)
        self.vit = vit
        vit.positions = cfg.vit_positions
        self.connector = MLPConnector(vit.hidden_size, hidden)
        self.autoencoder = autoencoder
        if cfg.vae_sample_posterior:
            autoencoder.sample_posterior = True
        self.token_dim = autoencoder.latent_channels * cfg.latent_patch**2
        self.latent_proj = LatentProjector(self.token_dim, hidden)
        # BAGEL's frozen position tables: buffers (saved and loaded with the weights, never trained)
        if cfg.latent_position_table is not None:
            self.register_buffer("latent_position_table", sincos_position_table(cfg.latent_position_table, hidden))
        if cfg.vit_position_table is not None:
            self.register_buffer("vit_position_table", sincos_position_table(cfg.vit_position_table, hidden))
        self.flow_loss = FlowMatchingLoss()
        self.attention = get_attention_backend(cfg.attention)
        # whether every path runs in a training forward (see `forward`): "data_parallel" (when a process group
        # of more than one rank is up), True (always) or False (never: DDP must then be told to find unused
        # parameters itself; benchmarks/ddp_unused.py measures both)
        self.all_paths_in_training: bool | str = "data_parallel"

    # ---- saving -------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write `mogao_config.json` (the architecture record, `model_architecture`) and `model.safetensors` to
        `directory`; `load_model(directory)` loads it back.

        state_dict: the full weights to write instead of the module's own (e.g. gathered from a sharded model,
            where the module holds only this rank's shards); tied duplicates are written once.
        """
        from safetensors.torch import save_file, save_model

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(json.dumps(model_architecture(self), indent=2, default=str))
        if state_dict is None:
            save_model(self, str(d / WEIGHTS_NAME))
            return
        tied = ({n for n, _ in self.named_parameters(remove_duplicate=False)}
                - {n for n, _ in self.named_parameters()})
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k not in tied},
                  str(d / WEIGHTS_NAME), metadata={"format": "pt"})

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
    def image_tokens(self, pixels: list[torch.Tensor], seeds: list[int] | None = None) -> list[torch.Tensor]:
        """Images (3, H, W) in [0, 1] -> their latent tokens (gh*gw, token_dim): the x₀ of flow matching.
        seeds: one per image, the stream of its posterior sample with `vae_sample_posterior` (None: torch's
        global generator)."""
        if self.cfg.vae_sample_posterior:
            latents = self.autoencoder.encode(pixels, seeds=seeds)
        else:
            latents = self.autoencoder.encode(pixels)
        return [patchify(lat, self.cfg.latent_patch) for lat in latents]

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Latent tokens (gh*gw, token_dim) of one image -> the image (3, H, W), float32 in [0, 1].

        The inverse of `image_tokens`: `unpatchify` to the latent, then the autoencoder's decoder.
        """
        p = self.cfg.latent_patch
        latent = unpatchify(tokens.float(), grid, p, self.autoencoder.latent_channels)
        return self.autoencoder.decode([latent])[0]

    def embed_latents(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                      cells: torch.Tensor | None = None) -> torch.Tensor:
        """VAE tokens (n, token_dim) at positions (3, n) -> their input embeddings (n, hidden): the
        in-projection plus, with `latent_position_embedding`, the fixed code of each token's (row, column), or
        with `latent_position_table`, that table's row `row * S + column`. cells: (2, n) the tokens' (row,
        column); None: rows 1 and 2 of `position_ids` (IL-RoPE's H, W)."""
        rows, cols = (position_ids[1], position_ids[2]) if cells is None else (cells[0], cells[1])
        h = self.latent_proj.proj_in(tokens)
        if self.cfg.latent_position_embedding:
            h = h + grid_position_embedding(rows, cols, h.shape[-1]).to(h.dtype)
        if self.cfg.latent_position_table is not None:
            h = h + position_table_rows(self.latent_position_table, rows, cols, "VAE").to(h.dtype)
        return h

    def embed_vit(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """ViT copies (3, gh*vit_patch, gw*vit_patch) -> their input embeddings (sum gh*gw, hidden), image
        after image, row-major: the ViT, the connector and, with `vit_position_table`, that table's row
        `row * S + column` of each token."""
        h = self.connector(torch.cat(self.vit(pixels), dim=0))
        if self.cfg.vit_position_table is not None:
            p = self.vit_patch
            cells = [(torch.arange(img.shape[1] // p).repeat_interleave(img.shape[2] // p),
                      torch.arange(img.shape[2] // p).repeat(img.shape[1] // p)) for img in pixels]
            rows, cols = (torch.cat(c).to(h.device) for c in zip(*cells))
            h = h + position_table_rows(self.vit_position_table, rows, cols, "ViT").to(h.dtype)
        return h

    def predict_velocity(self, h: torch.Tensor, noisy_tokens: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The velocity prediction (n, token_dim) from the generation expert's final states h (n, hidden) of
        noisy tokens `noisy_tokens` (n, token_dim) at per-token σ (n, 1) or a scalar: see `prediction`."""
        out = self.latent_proj.proj_out(h)
        if self.cfg.prediction == "velocity":
            return out
        sigma = torch.as_tensor(sigma, device=out.device, dtype=torch.float32).clamp_min(self.cfg.min_sigma_x0)
        return ((noisy_tokens.float() - out.float()) / sigma).to(out.dtype)

    def batch_inputs(self, batch: PackedBatch, noisy: NoisyState | None = None) -> tuple[SequenceInputs, FlowTargets | None]:
        """What a packed batch's input embeddings are made of, and the flow targets of its generation targets.

        Every image is encoded once (its clean copy and, for a target, x₀ share the encoding). The noisy copies
        of the targets get the seeded draw (σ and noise from each image's seed), or with `noisy` the given tokens
        and σ; there are then no flow targets (None).
        """
        lay = batch.layout
        # under IL-RoPE the cells are rows 1 and 2 of the positions (read there, as they always were)
        cells = None if self.cfg.positions == "il_rope" else batch.grid_cells
        inputs = SequenceInputs(batch.input_ids, batch.position_ids, lay.n_und, grid_cells=cells)
        if not batch.num_images:
            return inputs, None
        dtype, dev = self.backbone.embed_tokens.weight.dtype, batch.input_ids.device
        inputs.vit_pixels, inputs.vit_index = list(batch.vit_pixels), batch.vit_index
        has_clean = batch.image_has_clean.tolist()
        target_ids = batch.image_is_target.nonzero().flatten().tolist()
        encode = batch.encoded_images.nonzero().flatten().tolist()
        seeds = batch.image_seed[encode].tolist() if self.cfg.vae_sample_posterior else None
        tokens = self.image_tokens([batch.vae_pixels[i] for i in encode], seeds) if encode else []
        x0 = {i: t.to(dtype) for i, t in zip(encode, tokens)}  # per image (gh*gw, C*p*p)
        if batch.vae_clean_index.numel():
            inputs.clean_tokens = torch.cat([x0[i] for i in encode if has_clean[i]], dim=0)
            inputs.clean_index = batch.vae_clean_index
        if not target_ids:
            return inputs, None
        counts = _target_token_counts(batch)
        inputs.noisy_index = batch.noisy_index
        inputs.noisy_target = torch.arange(counts.shape[0], device=counts.device).repeat_interleave(counts)
        if noisy is not None:
            want = ((len(target_ids),), (batch.noisy_index.numel(), self.token_dim))
            got = (tuple(noisy.sigmas.shape), tuple(noisy.tokens.shape))
            if got != want:
                raise ValueError(f"NoisyState: sigmas {got[0]} and tokens {got[1]} do not match the batch: "
                                 f"expected {want[0]} and {want[1]}")
            inputs.noisy_tokens = noisy.tokens.to(dev, dtype)
            inputs.sigmas = noisy.sigmas.to(dev, torch.float32)
            return inputs, None
        x0_t = [x0[i] for i in target_ids]
        sigmas, noise = draw_sigmas_and_noise(
            batch.image_seed[target_ids], [tuple(t.shape) for t in x0_t], [t.shape[0] for t in x0_t],
            self.cfg.timestep_sampling, dev, dtype,
        )
        sigma_tok = sigmas.repeat_interleave(counts.to(dev))[:, None]
        x0_cat, eps = torch.cat(x0_t), torch.cat(noise)
        inputs.noisy_tokens = add_noise(x0_cat, eps, sigma_tok).to(dtype)
        inputs.sigmas = sigmas
        weights = batch.image_loss_weight[target_ids].to(dtype).repeat_interleave(counts.to(dev))
        return inputs, FlowTargets(velocity_target(x0_cat, eps), weights)

    def embed_inputs(self, inputs: SequenceInputs,
                     all_paths: bool = False) -> tuple[torch.Tensor, GenerationModulation | None]:
        """The input embeddings (N, hidden) of a sequence and the timestep modulation of its generation tokens.

        Text ids go through the token embedding; ViT copies through the ViT and the connector; clean and noisy
        VAE copies through `embed_latents` at their positions. The modulation has one row per σ: row 0 is σ = 0
        (clean VAE tokens), row 1 + i the i-th noisy target's σ (float32). With additive timestep conditioning
        it is added to the generation tokens' embeddings here and None is returned in its place; None as well
        when the sequence has no generation tokens (unless `all_paths`).

        all_paths: a path the sequence has no input for (no ViT image, no VAE token, no generation token) still
        runs, on zero rows (the ViT, when it trains, on one blank patch whose features are then dropped), so
        that every parameter is in the graph; the embeddings are unchanged. See `forward`.
        """
        pos = inputs.position_ids
        x = self.backbone.embed_tokens(inputs.input_ids)
        none = torch.zeros(0, dtype=torch.long, device=x.device)
        has_vae = any(i is not None and i.numel() for i in (inputs.clean_index, inputs.noisy_index))
        if inputs.grid_cells is None and self.cfg.positions != "il_rope" and has_vae:
            raise ValueError(f"positions '{self.cfg.positions}' do not hold the grid cells of image tokens: give "
                             "SequenceInputs.grid_cells (a PackedBatch gives its own)")

        def cells(index: torch.Tensor) -> torch.Tensor | None:
            return None if inputs.grid_cells is None else inputs.grid_cells[:, index]

        if inputs.vit_pixels:
            x = x.index_copy(0, inputs.vit_index, self.embed_vit(inputs.vit_pixels).to(x.dtype))
        elif all_paths:
            x = x.index_copy(0, none, self.connector(self._no_vit_features(x)).to(x.dtype))
        clean = inputs.clean_tokens
        if clean is None and inputs.clean_pixels:
            clean = torch.cat(self.image_tokens(inputs.clean_pixels), dim=0)
        if clean is not None and inputs.clean_index is not None and inputs.clean_index.numel():
            x = x.index_copy(0, inputs.clean_index, self.embed_latents(
                clean.to(x.dtype), pos[:, inputs.clean_index], cells(inputs.clean_index)))
        noisy = inputs.noisy_index is not None and inputs.noisy_index.numel() > 0
        if noisy:
            x = x.index_copy(0, inputs.noisy_index, self.embed_latents(inputs.noisy_tokens.to(x.device, x.dtype),
                                                                       pos[:, inputs.noisy_index],
                                                                       cells(inputs.noisy_index)))
        elif all_paths:
            x = x.index_copy(0, none, self.embed_latents(x.new_zeros(0, self.token_dim), pos[:, none]))
        n_und = inputs.n_und
        n_gen = x.shape[0] - n_und
        if n_gen <= 0 and not all_paths:
            return x, None
        rows = torch.zeros(1, device=x.device)
        index = torch.zeros(max(n_gen, 0), dtype=torch.long, device=x.device)
        if noisy:
            rows = torch.cat((rows, inputs.sigmas.float()))
            index[inputs.noisy_index - n_und] = inputs.noisy_target.to(x.device) + 1
        if self.cfg.timestep_conditioning == "adaln":
            return x, GenerationModulation(self.time_embed(rows).to(x.dtype), index)
        embedder = self.additive_time if self.additive_time is not None else self.time_embed  # (BAGEL's)
        add = embedder(rows).to(x.dtype).index_select(0, index)  # the embedding of each token's σ
        return torch.cat((x[:n_und], x[n_und:] + add)), None

    def _all_paths(self) -> bool:
        if self.all_paths_in_training == "data_parallel":
            import torch.distributed as dist

            return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return bool(self.all_paths_in_training)

    def _no_vit_features(self, like: torch.Tensor) -> torch.Tensor:
        """Zero rows of ViT features (0, vit_hidden), in the graph of the ViT: the features of one blank
        patch, dropped (`embed_inputs` with all_paths and no ViT image). The ViT runs even when frozen: under
        FSDP2 each of its layers is a shard unit whose weights every rank must gather together."""
        p = self.vit_patch
        return self.vit([torch.zeros(3, p, p, device=like.device)])[0][:0].to(like.dtype)

    def forward(
        self, batch: PackedBatch | SequenceInputs, return_logits: bool = False, noisy: NoisyState | None = None,
        *, attention: object | None = None, logit_rows: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Loss terms of a packed batch; optionally the text logits of the understanding tokens.

        noisy: sampling mode - the targets' noisy tokens and σ come from the caller (see `NoisyState`) instead
            of the seeded draw; `velocity` is then the prediction for those tokens and the flow loss is 0.

        Given `SequenceInputs` instead of a batch, one step of incremental generation: the backbone runs with
        `attention` (a backend that holds the context, e.g. a KV cache); the output has no loss terms, the text
        logits of the understanding rows `logit_rows` and the velocity of the noisy tokens (in `noisy_index`
        order). It runs here, in the forward, so that wrappers of the model (sharding) see every call.
        """
        if isinstance(batch, SequenceInputs):
            return self._step(batch, attention, logit_rows)
        lay = batch.layout
        n_und = lay.n_und
        # Data-parallel training: every path runs, on zero rows where the batch has nothing for it (a batch of
        # questions has no generation token, a text-only batch no ViT image), so every parameter is in the graph
        # of every step - with a zero gradient where the batch has nothing for it: DDP and FSDP2 reduce the
        # gradients of the parameters each rank used, and ranks must agree. (One process needs none of it: a
        # parameter without a gradient, and one whose gradient is zero, are both left out of the update -
        # `MogaoModule.on_before_optimizer_step` - so the two give the same training.)
        all_paths = self.training and torch.is_grad_enabled() and self._all_paths()
        inputs, flow = self.batch_inputs(batch, noisy)
        x, mod = self.embed_inputs(inputs, all_paths)
        sigmas, x_sigma = inputs.sigmas, inputs.noisy_tokens
        prepared = self.attention.prepare(lay, self.cfg.text_sees_vae)
        h_und, h_gen = self.backbone(x, batch.position_ids, n_und, self.attention, prepared, mod, all_paths)

        labels = batch.labels[:n_und]
        sel = labels != -100
        logits_sel = self.backbone.lm_head(h_und[sel]).float()
        text_sum = F.cross_entropy(logits_sel, labels[sel], reduction="sum")
        text_weight = sel.sum().to(text_sum.dtype)
        velocity = None
        if sigmas is not None:
            sigma_tok = sigmas.repeat_interleave(_target_token_counts(batch))[:, None]
            velocity = self.predict_velocity(h_gen.index_select(0, batch.noisy_index - n_und), x_sigma, sigma_tok)
        if flow is not None:
            pred, want = velocity.float(), flow.velocity.float()
            if self.cfg.prediction == "x0":  # σ·(v̂ − v) = x̂₀ − x₀ (σ above the clamp): the MSE of x̂₀
                scale = sigma_tok.float().clamp_min(self.cfg.min_sigma_x0)
                pred, want = pred * scale, want * scale
            image_sum, image_weight = self.flow_loss(pred, want, flow.weights.float())
        else:
            image_sum = h_gen.sum() * 0.0 if h_gen.numel() else text_sum * 0.0
            if all_paths:  # the velocity head on zero rows: in the graph, adds nothing
                image_sum = image_sum + self.latent_proj.proj_out(h_gen[:0]).float().sum()
            image_weight = torch.zeros((), device=x.device)
        terms = LossTerms(text_sum, text_weight, image_sum, image_weight)
        logits = self.backbone.lm_head(h_und).float() if return_logits else None
        return ModelOutput(terms=terms, velocity=velocity, text_logits=logits)

    def _step(self, inputs: SequenceInputs, attention: object, logit_rows: torch.Tensor | None) -> ModelOutput:
        if attention is None:
            raise ValueError("a forward on SequenceInputs needs the attention backend that holds the context")
        x, mod = self.embed_inputs(inputs)
        h_und, h_gen = self.backbone(x, inputs.position_ids, inputs.n_und, attention, None, mod)
        logits = None
        if logit_rows is not None and logit_rows.numel():
            logits = self.backbone.lm_head(h_und.index_select(0, logit_rows.to(h_und.device))).float()
        velocity = None
        if inputs.noisy_index is not None and inputs.noisy_index.numel():
            sigma_tok = inputs.sigmas.float().to(x.device)[inputs.noisy_target.to(x.device)][:, None]
            velocity = self.predict_velocity(h_gen.index_select(0, inputs.noisy_index - inputs.n_und),
                                             inputs.noisy_tokens.to(x.device), sigma_tok)
        return ModelOutput(terms=None, velocity=velocity, text_logits=logits)


def _check_options(cfg: ModelConfig, hidden: int, autoencoder: LatentAutoencoder) -> None:
    """ConfigError naming the field for a combination of the BAGEL options that cannot work."""
    if cfg.timestep_embedding not in ("mogao", "bagel"):
        raise ConfigError(f"timestep_embedding must be 'mogao' or 'bagel', got '{cfg.timestep_embedding}'")
    if cfg.timestep_embedding == "bagel" and cfg.timestep_conditioning != "additive":
        raise ConfigError("timestep_embedding 'bagel' is BAGEL's additive conditioning: it needs "
                          "timestep_conditioning 'additive'")
    if cfg.vit_positions not in VisionEncoder.POSITIONS:
        raise ConfigError(f"vit_positions must be one of {', '.join(VisionEncoder.POSITIONS)}, got "
                          f"'{cfg.vit_positions}'")
    for name in ("latent_position_table", "vit_position_table"):
        side = getattr(cfg, name)
        if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side <= 0 or hidden % 4):
            raise ConfigError(f"{name} must be a positive table side (or None), and the LLM width a multiple of 4; "
                              f"got {side!r} for width {hidden}")
    if cfg.latent_position_table is not None and cfg.latent_position_embedding:
        raise ConfigError("latent_position_table replaces latent_position_embedding: set "
                          "latent_position_embedding false")
    check_choice(cfg.positions, POSITION_SCHEMES, "positions")
    check_choice(cfg.rope_axes, ROPE_AXES, "rope_axes")
    if cfg.sequence_format not in ("mogao", "bagel"):
        raise ConfigError(f"sequence_format must be 'mogao' or 'bagel', got '{cfg.sequence_format}'")
    if cfg.sequence_format == "bagel" and cfg.attention == "flash_varlen":
        raise ConfigError("sequence_format 'bagel' puts marker tokens inside image blocks, which the flash_varlen "
                          "decomposition has no place for: use attention 'sdpa_dense' or 'flex'")
    if cfg.vae_sample_posterior and not isinstance(autoencoder, DiffusersVAE):
        raise ConfigError(f"vae_sample_posterior needs a diffusers VAE (autoencoder '{cfg.autoencoder}' has no "
                          "posterior to sample)")


def _target_token_counts(batch: PackedBatch) -> torch.Tensor:
    """Tokens of each generation target's noisy copy, in target order (the order of `batch.noisy_index`)."""
    grids = batch.image_grid[batch.image_is_target]
    return grids[:, 0] * grids[:, 1]
