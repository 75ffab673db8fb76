"""The KV-cached generation loop against full recomputation, on a small random model (4 layers, hidden 256).

- image sampling: one Euler step (velocity of a 256-token image block) against a cached context vs re-running
  the whole packed sequence (context + image) every step, at 256 and 1024 context tokens;
- CFG: the three guidance branches as one batched forward vs three forwards one after another;
- text decoding: tokens/s with the cache vs re-running the sequence for every token.

    .venv/bin/python benchmarks/generation.py          (CUDA when available, else CPU)
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts, train_tokenizer
from mogao.data.shapes_mini import caption_corpus, draw_shape
from mogao.inference import GenerationConfig, GenerationSession, Guidance, build_generation_batch
from mogao.inference.cache import Piece, cached_forward, text_piece
from mogao.inference.guidance import FULL, IMAGE_ONLY, NONE
from mogao.inference.simple import _with_text, _without_last_token
from mogao.modality import Modality
from mogao.model.mogao import ModelConfig, MogaoModel, NoisyState
from mogao.model.tiny import save_tiny_llm, save_tiny_vit

IMAGE = 64  # pixels: a 16 x 16 grid = 256 tokens with the pixel autoencoder and latent patch 4
GRID = (16, 16)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev: torch.device, repeat: int) -> float:
    """Median seconds of `repeat` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _build(root: Path, dev: torch.device):
    tok = train_tokenizer(caption_corpus(), vocab_size=512)
    llm = save_tiny_llm(root / "llm", vocab_size=len(tok), hidden_size=256, layers=4, heads=4, kv_heads=2)
    vit = save_tiny_vit(root / "vit", hidden_size=64, patch_size=4)
    torch.manual_seed(0)
    model = MogaoModel.from_parts(ModelConfig(llm=str(llm), vit=str(vit), autoencoder="pixel", latent_patch=4))
    return model.to(dev).eval(), tok


def _text_of(tok, n_tokens: int) -> str:
    """Caption text of at least n_tokens tokens, cut to exactly n_tokens."""
    words = " ".join(caption_corpus()).split()
    ids: list[int] = []
    i = 0
    while len(ids) < n_tokens:
        ids += tok(" " + words[i % len(words)], add_special_tokens=False)["input_ids"]
        i += 1
    return tok.decode(ids[:n_tokens])


def bench_sampling(model, tok, dev, context: int, repeat: int) -> tuple[float, float]:
    text = _text_of(tok, context)
    s = GenerationSession(model, tok, 1, GenerationConfig(image_size=IMAGE), Guidance(1.0, 1.0))
    s.add_user_turn([[{"text": text}]])
    s.begin_image([0])
    x = torch.randn(GRID[0] * GRID[1], model.token_dim, device=dev)
    cached = _time(lambda: s.velocity([0], [x], 0.5, GRID), dev, repeat)
    batch, _ = build_generation_batch(model, tok, [[{"text": text}]], image_size=IMAGE)
    batch = batch.to(dev)
    state = NoisyState(torch.tensor([0.5], device=dev), x)
    with torch.no_grad():
        full = _time(lambda: model(batch, noisy=state), dev, repeat)
    return cached, full


def bench_cfg(model, tok, dev, repeat: int) -> tuple[float, float]:
    s = GenerationSession(model, tok, 1, GenerationConfig(image_size=IMAGE), Guidance())
    s.add_user_turn([[{"image": draw_shape("circle", "red")}, {"text": _text_of(tok, 128)}]])
    s.begin_image([0])
    x = torch.randn(GRID[0] * GRID[1], model.token_dim, device=dev)
    batched = _time(lambda: s.velocity([0], [x], 0.5, GRID), dev, repeat)

    def sequential():
        for b in (FULL, IMAGE_ONLY, NONE):
            cached_forward(model, s.cache, [s.row(0, b)],
                           [[Piece(Modality.VAE_NOISY, tokens=x, sigma=0.5, grid=GRID)]], commit=False)

    return batched, _time(sequential, dev, repeat)


def bench_decode(model, tok, dev, context: int, n_new: int) -> tuple[float, float]:
    text = _text_of(tok, context)
    s = GenerationSession(model, tok, 1, GenerationConfig(image_size=IMAGE))
    s.add_user_turn([[{"text": text}]])
    ids = torch.randint(3, len(tok), (n_new,)).tolist()

    def cached():
        for t in ids:
            cached_forward(model, s.cache, [0], [[text_piece([t])]], commit=True)

    _sync(dev)
    t0 = time.perf_counter()
    cached()
    _sync(dev)
    t_cached = time.perf_counter() - t0
    cfg = DataConfig(token_budget=1 << 20, max_image_tokens=256, vit_patch=model.vit_patch,
                     vae_patch=model.vae_patch, p_drop_text=0.0, p_drop_images=0.0)
    prompt = _without_last_token(lower_sample(samples_from_dicts([{"segments": [{"text": text}]}])[0], tok, cfg))
    _sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(n_new):
            plan = _with_text(prompt, ids[:k])
            model(collate_plans([plan], plan.num_tokens).to(dev), return_logits=True)
    _sync(dev)
    return n_new / t_cached, n_new / (time.perf_counter() - t0)


def main() -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else (platform.processor() or platform.machine())
    with tempfile.TemporaryDirectory() as d:
        model, tok = _build(Path(d), dev)
    repeat = 10
    rows = []
    for ctx in (256, 1024):
        c, f = bench_sampling(model, tok, dev, ctx, repeat)
        rows.append((f"image step, {ctx}-token context, 256-token image", f"{c * 1e3:.1f} ms", f"{f * 1e3:.1f} ms",
                     f"{f / c:.2f}x"))
    b, sq = bench_cfg(model, tok, dev, repeat)
    rows.append(("3-branch CFG step (batched vs sequential)", f"{b * 1e3:.1f} ms", f"{sq * 1e3:.1f} ms",
                 f"{sq / b:.2f}x"))
    tc, tf = bench_decode(model, tok, dev, 256, 32)
    rows.append(("text decoding, 256-token context (tokens/s)", f"{tc:.1f} tok/s", f"{tf:.1f} tok/s",
                 f"{tc / tf:.2f}x"))
    print(f"machine: {platform.platform()} | {name} | {os.cpu_count()} CPUs | torch {torch.__version__} | "
          f"{dev.type}, {torch.get_num_threads()} threads | model: 4 layers, hidden 256, fp32")
    print()
    print("| measurement | cached / batched | recompute / sequential | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
