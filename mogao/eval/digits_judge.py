"""A judge of generated digits, fitted on real handwritten digits (`sklearn.datasets.load_digits`, train split
only), in two parts:

- accuracy: an RBF support-vector classifier (`sklearn.svm.SVC`) on the image reduced to 8x8 ink (box
  averaging, the inverse of how the data was upscaled); 99.2% on the real validation split, fits in 0.1 s.
- Fréchet distance: torchmetrics' `FrechetInceptionDistance` with a custom `feature` network, `DigitsNet`, a
  small CNN trained as a digit classifier whose 64-d penultimate activations are the embedding.

Inputs are what the built-in digits tasks render: a real 8x8 digit drawn dark on white and upscaled bilinearly
to `DIGIT_SIZE` pixels (`mogao.data.builtin.digits.render_digit`), and both parts are fitted on exactly those
renders. A generated image of another size is first resized to `DIGIT_SIZE` with the same bilinear resampling.

The CNN trains in a few seconds on CPU, deterministically from its seed (random shifts of up to two pixels as
augmentation), and is cached as a state dict under the cache directory (`$MOGAO_CACHE_DIR`, else
`~/.cache/mogao`), keyed by everything that changes its weights. The classifier is refitted per process.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.svm import SVC
from torch import nn

from mogao.data.builtin.digits import load_digit_images, render_digit, split_indices

DIGIT_SIZE = 32
NET_SIZE = 16  # the network's input side: the digits hold 8x8 real pixels, so 16 loses nothing and trains fast
JUDGE_VERSION = 1  # bump when the architecture or the training changes: old cache entries are then ignored
_EPOCHS = 10
_BATCH = 128
_LR = 5e-3

FEATURE_DESCRIPTION = (
    "FID: torchmetrics FrechetInceptionDistance with a custom 64-d feature network instead of Inception: the "
    "penultimate ReLU layer of a CNN (conv 1->32, pool, conv 32->32, pool, linear 512->64) on 16x16 greyscale "
    "ink, trained (seeded) as a 10-way digit classifier on the load_digits train split rendered as the built-in "
    "digits tasks render them; generated images vs the real validation split"
)
CLASSIFIER_DESCRIPTION = (
    "digit accuracy: sklearn SVC (RBF, C=1, gamma='scale') fitted on the load_digits train split rendered as "
    f"the built-in digits tasks render them, applied to images resized bilinearly to {DIGIT_SIZE}x{DIGIT_SIZE} "
    "and box-averaged to 8x8 ink"
)


def default_cache_dir() -> Path:
    """`$MOGAO_CACHE_DIR`, else `~/.cache/mogao`."""
    env = os.environ.get("MOGAO_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mogao"


class DigitsNet(nn.Module):
    """Digit classifier and feature extractor.

    Input: (N, 3, H, W) RGB images of dark digits on a light ground, float in [0, 1] (uint8 in [0, 255] is
    also accepted); resized to `DIGIT_SIZE` when H or W differ. `features` gives (N, 64) penultimate ReLU
    activations; `forward` gives the same features (the interface torchmetrics' FID expects of a `feature`
    network; `num_features` tells it the width); `logits` gives (N, 10).
    """

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(32 * 4 * 4, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    @staticmethod
    def ink(images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB -> (N, 1, NET_SIZE, NET_SIZE) ink in [0, 1] (1 = black)."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        grey = x.mean(dim=1, keepdim=True)
        if grey.shape[-2:] != (NET_SIZE, NET_SIZE):
            grey = nn.functional.interpolate(grey, size=(NET_SIZE, NET_SIZE), mode="bilinear",
                                             align_corners=False, antialias=True)
        return 1.0 - grey

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.ink(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, DIGIT_SIZE, DIGIT_SIZE) float in [0, 1]; resized bilinearly (as `render_digit`
    upscales) when another size."""
    arrays = []
    for img in images:
        img = img.convert("RGB")
        if img.size != (DIGIT_SIZE, DIGIT_SIZE):
            img = img.resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@functools.lru_cache(maxsize=2)
def real_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, DIGIT_SIZE, DIGIT_SIZE) float in [0, 1], labels (N,)) of a split, rendered as the built-in
    digits tasks render them."""
    idx = split_indices(split)
    labels = load_digit_images()[1][idx]
    return images_to_tensor([render_digit(int(i), DIGIT_SIZE) for i in idx]), torch.from_numpy(labels)


def _shifted(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Each image shifted by a random whole number of pixels (the ground around a digit is blank, so wrapping
    around is harmless)."""
    out = torch.empty_like(x)
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2), generator=g).tolist()
    for i, (dy, dx) in enumerate(shifts):
        out[i] = torch.roll(x[i], shifts=(dy, dx), dims=(-2, -1))
    return out


def train_digits_net(seed: int = 0) -> DigitsNet:
    """Fit a `DigitsNet` on the train split (seeded, CPU; a few seconds)."""
    images, labels = real_digits("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and stays fast on a busy machine
    try:
        return _fit(images, labels, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(images: torch.Tensor, labels: torch.Tensor, seed: int) -> DigitsNet:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=_LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=_LR, total_steps=_EPOCHS * -(-len(labels) // _BATCH))
    net.train()
    for _ in range(_EPOCHS):
        order = torch.randperm(len(labels), generator=g)
        for start in range(0, len(labels), _BATCH):
            b = order[start:start + _BATCH]
            x = _shifted(images[b], g)
            loss = nn.functional.cross_entropy(net.logits(x), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


def _cache_key(seed: int) -> str:
    text = f"v{JUDGE_VERSION}-size{DIGIT_SIZE}-{NET_SIZE}-epochs{_EPOCHS}-batch{_BATCH}-lr{_LR}-seed{seed}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def load_digits_net(seed: int = 0, cache_dir: str | Path | None = None) -> DigitsNet:
    """The cached `DigitsNet` for `seed`, trained and saved on first use."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"digits-judge-{_cache_key(seed)}.pt"
    net = DigitsNet()
    if path.is_file():
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return net.eval().requires_grad_(False)
        except (RuntimeError, OSError, EOFError, ValueError):
            pass  # an unreadable cache entry is rebuilt below
    net = train_digits_net(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)
    return net


def classifier_features(images: torch.Tensor) -> np.ndarray:
    """(N, 3, DIGIT_SIZE, DIGIT_SIZE) in [0, 1] -> (N, 64) ink of the 8x8 box averages, in [0, 1]."""
    grey = images.float().mean(dim=1, keepdim=True)
    small = nn.functional.adaptive_avg_pool2d(grey, 8)
    return (1.0 - small).flatten(1).numpy().astype(np.float64)


@functools.lru_cache(maxsize=1)
def digits_classifier() -> SVC:
    """The SVC fitted on the train split (deterministic; about 0.1 s)."""
    images, labels = real_digits("train")
    return SVC(C=1.0, gamma="scale").fit(classifier_features(images), labels.numpy())


def classify(images: torch.Tensor | Sequence[Image.Image]) -> np.ndarray:
    """(N,) predicted digits of images (PIL, or (N, 3, DIGIT_SIZE, DIGIT_SIZE) in [0, 1])."""
    x = images if isinstance(images, torch.Tensor) else images_to_tensor(images)
    return digits_classifier().predict(classifier_features(x))


def digit_accuracy(images: torch.Tensor | Sequence[Image.Image], labels: Sequence[int]) -> float:
    """Share of images classified as their label."""
    if len(labels) == 0:
        raise ValueError("digit_accuracy needs at least one image")
    return float((classify(images) == np.asarray(list(labels))).mean())


@torch.no_grad()
def digits_fid(net: DigitsNet, generated: torch.Tensor | Sequence[Image.Image], real: torch.Tensor) -> float:
    """Fréchet distance between `generated` and `real` images in the net's 64-d feature space (both need at
    least two images)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    gen = generated if isinstance(generated, torch.Tensor) else images_to_tensor(generated)
    if len(gen) < 2 or len(real) < 2:
        raise ValueError("the Fréchet distance needs at least two generated and two real images")
    fid = FrechetInceptionDistance(feature=net, normalize=True)
    for i in range(0, len(real), 256):
        fid.update(real[i:i + 256], real=True)
    for i in range(0, len(gen), 256):
        fid.update(gen[i:i + 256], real=False)
    return float(fid.compute())
