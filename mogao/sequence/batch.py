"""`PackedBatch`: what the packer hands to the model - whole samples packed into one token budget."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from mogao.sequence.layout import TokenLayout


@dataclass
class PackedBatch:
    """One packed batch. Token tensors are in the physical order of `layout` (see `mogao.sequence.layout`).

    N = number of tokens, I = number of images in the pack (image-major order: sample by sample, then the
    order of the images inside each sample). Every image has a ViT copy of gh*gw tokens, except a generation
    target that ends its sample under `DataConfig.drop_unread_vit`; generation targets also have a noisy VAE copy,
    and images whose clean VAE copy some token reads a clean VAE copy, of gh*gw tokens each.

    input_ids:      (N,)  text token ids at text positions (markers of wrapped copies included), 0 elsewhere
    labels:         (N,)  next-token CE target of each token (-100 where none): the label of a text token is the
                          next logical token when that token is loss-bearing text (incl. begin-of-image markers)
    position_ids:   (3, N) rotary positions (T, H, W) under the model's position scheme (IL-RoPE, or BAGEL's
                          1-D positions as (p, p, p)); each image token's grid cell is `grid_cells`
    vit_pixels:     one tensor (3, gh*vit_patch, gw*vit_patch), float in [0, 1], per image with a ViT copy
                          (image_has_vit), in image order: what the ViT embeds into the rows `vit_index`
    vae_pixels:     I tensors (3, gh*vae_patch, gw*vae_patch), float in [0, 1]
    image_grid:     (I, 2) token grid (gh, gw) of each image
    image_is_target:(I,) bool, True for generation targets (they have a noisy copy)
    image_has_clean:(I,) bool, True for images with a clean VAE copy (`DataConfig.drop_unread_vae`)
    image_has_vit:  (I,) bool, True for images with a ViT copy (`DataConfig.drop_unread_vit`)
    image_seed:     (I,) int64 seed of the image's timestep and noise draw (independent of the pack it lands in)
    image_loss_weight: (I,) float weight of the image's flow loss (0 for condition images)
    vit_index:      (sum gh*gw over image_has_vit,) physical positions of ViT tokens; image-major, row-major
                          inside an image
    vae_clean_index:(sum gh*gw over image_has_clean,) physical positions of clean VAE tokens; same order
    noisy_index:    (sum over targets gh*gw,) physical positions of noisy VAE tokens; same order
    sample_ids:     the samples' ids (file:line or the JSONL `id`), for logs and fault reports
    budget:         the token budget the pack was filled to
    data_state:     the data stream's position right after this batch (set by the training stream, so the loader
                    position saved in a checkpoint is that of the last batch trained on, not of one prefetched)
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    layout: TokenLayout
    vit_pixels: list[torch.Tensor]
    vae_pixels: list[torch.Tensor]
    image_grid: torch.Tensor
    image_is_target: torch.Tensor
    image_has_clean: torch.Tensor
    image_has_vit: torch.Tensor
    image_seed: torch.Tensor
    image_loss_weight: torch.Tensor
    vit_index: torch.Tensor
    vae_clean_index: torch.Tensor
    noisy_index: torch.Tensor
    sample_ids: list[str] = field(default_factory=list)
    budget: int = 0
    data_state: dict | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_images(self) -> int:
        return int(self.image_grid.shape[0])

    @property
    def encoded_images(self) -> torch.Tensor:
        """(I,) bool: the images whose VAE latents the forward needs (a clean copy or a noisy one); the others
        are read through their ViT copy only."""
        return self.image_has_clean | self.image_is_target

    @property
    def grid_cells(self) -> torch.Tensor:
        """(2, N) int64 (row, column) of every image token in its image's token grid (0 for text tokens), from
        the images' grids and copy indexes (every copy is row-major): what the latent position code and tables
        read, whatever the position scheme (under IL-RoPE it equals rows 1 and 2 of `position_ids`)."""
        cells = torch.zeros(2, self.num_tokens, dtype=torch.long, device=self.input_ids.device)
        grids = self.image_grid.to(cells.device)
        for images, index in ((self.image_has_vit, self.vit_index), (self.image_has_clean, self.vae_clean_index),
                              (self.image_is_target, self.noisy_index)):
            g = grids[images.to(cells.device)]
            if not index.numel():
                continue
            counts = g[:, 0] * g[:, 1]
            width = g[:, 1].repeat_interleave(counts)
            first = (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
            within = torch.arange(int(counts.sum()), device=cells.device) - first  # row-major cell number
            cells[:, index.to(cells.device)] = torch.stack((within // width, within % width))
        return cells

    @property
    def padding_fraction(self) -> float:
        """Share of the token budget left unused by this pack."""
        return 0.0 if self.budget <= 0 else 1.0 - self.num_tokens / self.budget

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif isinstance(v, TokenLayout):
                v = v.to(device)
            elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                v = [t.to(device, non_blocking=non_blocking) for t in v]
            out[f.name] = v
        return PackedBatch(**out)
