"""The KV-cached generation loop against full recomputation, on a small random model (4 layers, hidden 256).

- image sampling: one Euler step (velocity of a 256-token image block) against a cached context vs re-running
  the whole packed sequence (context + image) every step, at 256 and 1024 context tokens;
- CFG: the three guidance branches as one batched forward vs three forwards one after another;
- text decoding: tokens/s with the cache vs re-running the sequence for every token.

    .venv/bin/python benchmarks/generation.py          (CUDA when available, else CPU)

`measure` runs the same rows for any device, model size and context lengths (`benchmarks/gpu_check.py`).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts, train_tokenizer
from mogao.data.shapes_mini import caption_corpus, draw_shape
from mogao.inference import GenerationConfig, GenerationSession, Guidance
from mogao.inference.cache import Piece, cached_forward, text_piece
from mogao.inference.guidance import FULL, IMAGE_ONLY, NONE
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import NoisyState
from mogao.model.tiny import save_tiny_llm, save_tiny_vit
from mogao.sequence.modality import Modality

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle_sampler import _with_text, _without_last_token, build_generation_batch  # noqa: E402 (the recompute baseline)

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


def _build(root: Path, dev: torch.device, hidden: int = 256, layers: int = 4):
    tok = train_tokenizer(caption_corpus(), vocab_size=512)
    llm = save_tiny_llm(root / "llm", vocab_size=len(tok), hidden_size=hidden, layers=layers,
                        heads=max(4, hidden // 128), kv_heads=2)
    vit = save_tiny_vit(root / "vit", hidden_size=64, patch_size=4)
    torch.manual_seed(0)
    model = load_model(ModelConfig(llm=str(llm), vit=str(vit), autoencoder="pixel", latent_patch=4))
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


def measure(dev: torch.device, contexts: tuple[int, ...] = (256, 1024), repeat: int = 10, n_new: int = 32,
            hidden: int = 256, layers: int = 4) -> Iterator[dict]:
    """The benchmark's rows, yielded as they are measured: `measurement`, `fast` / `slow` seconds (or tokens/s
    for decoding) of the cached or batched path and of recomputation or sequential branches, `speedup`."""
    with tempfile.TemporaryDirectory() as d:
        model, tok = _build(Path(d), dev, hidden, layers)
    for ctx in contexts:
        c, f = bench_sampling(model, tok, dev, ctx, repeat)
        yield {"measurement": f"image step, {ctx}-token context, {GRID[0] * GRID[1]}-token image", "unit": "s",
               "fast": c, "slow": f, "speedup": f / c}
    b, sq = bench_cfg(model, tok, dev, repeat)
    yield {"measurement": "3-branch CFG step (batched vs sequential)", "unit": "s", "fast": b, "slow": sq,
           "speedup": sq / b}
    ctx = contexts[0]
    tc, tf = bench_decode(model, tok, dev, ctx, n_new)
    yield {"measurement": f"text decoding, {ctx}-token context (tokens/s)", "unit": "tok/s", "fast": tc,
           "slow": tf, "speedup": tc / tf}


def main() -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else (platform.processor() or platform.machine())
    rows = []
    for r in measure(dev):
        if r["unit"] == "s":
            rows.append((r["measurement"], f"{r['fast'] * 1e3:.1f} ms", f"{r['slow'] * 1e3:.1f} ms",
                         f"{r['speedup']:.2f}x"))
        else:
            rows.append((r["measurement"], f"{r['fast']:.1f} tok/s", f"{r['slow']:.1f} tok/s",
                         f"{r['speedup']:.2f}x"))
    print(f"machine: {platform.platform()} | {name} | {os.cpu_count()} CPUs | torch {torch.__version__} | "
          f"{dev.type}, {torch.get_num_threads()} threads | model: 4 layers, hidden 256, fp32")
    print()
    print("| measurement | cached / batched | recompute / sequential | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
