"""Training throughput (tokens/s) and MFU of a random-init MoT Mogao model on packed interleaved batches, for
each attention backend x activation checkpointing on/off. Prints a markdown table naming the machine.

    python benchmarks/train_throughput.py --preset tiny                 # CPU: a tiny model, seconds
    python benchmarks/train_throughput.py --preset 1.5b --tokens 8192   # CUDA, bf16: Qwen2.5-1.5B-like experts
    python benchmarks/train_throughput.py --preset 0.5b --backends flash_varlen flex

Presets: `tiny` (2 layers, hidden 64), `0.5b` / `1.5b` (the Qwen2.5-0.5B / 1.5B architectures from
`mogao.model.known`, both experts, no download: built from config, random weights). The vision side is a small
SigLIP (2 layers) and the pixel autoencoder, so the figures are those of the backbone. One process, one
device, full training steps (forward, backward, AdamW step); FLOPs from `mogao.training.flops.training_flops`
(ECTF pair count, both experts), peak FLOP/s from Lightning's device table (none on CPU: no MFU).

Target on an H100 in bf16: 40% MFU at 8k tokens for the 1.5b preset.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

PRESETS = {
    "tiny": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True},
    "0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
}
VIT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "patch_size": 8, "image_size": 64}


def llm_config(preset: str) -> dict:
    """The backbone LLM config of a preset (a `transformers` config dict)."""
    from mogao.model.known import KNOWN_LLMS

    llm = PRESETS[preset]
    return dict(KNOWN_LLMS[llm]) if isinstance(llm, str) else dict(llm)


def build_model(preset: str, attention: str, device: torch.device | str | None = None):
    """Random-init model of a preset; with `device`, parameters are created there (a 1.5b preset initialises
    in seconds on a GPU instead of a minute on the host)."""
    from mogao.model.config import ModelConfig, architecture_record
    from mogao.model.io import load_model

    cfg = ModelConfig(llm="random", vit="random", autoencoder="pixel", latent_patch=8, attention=attention)
    record = architecture_record(cfg, llm_config(preset), VIT, None)
    if device is not None:
        try:
            with torch.device(device):
                return load_model(record)
        except Exception as e:  # some part cannot be created there: build on the host (slower, same model)
            print(f"building on {device} failed ({type(e).__name__}: {e}); building on the host", flush=True)
    return load_model(record)


def make_batches(tokens: int, n: int, vit_patch: int, vae_patch: int) -> list:
    """`n` packs of about `tokens` tokens of interleaved caption / condition / generation samples."""
    from mogao.data import DataConfig, lower_sample, pack_plans, samples_from_dicts, train_tokenizer
    from mogao.data.shapes_mini import caption_corpus, interleaved_samples

    tok = train_tokenizer(caption_corpus(), vocab_size=300)
    cfg = DataConfig(token_budget=tokens, max_image_tokens=max(16, tokens // 32), vit_patch=vit_patch, vae_patch=vae_patch,
                     p_drop_text=0.0, p_drop_images=0.0, too_long="skip")
    out, seed = [], 0
    while len(out) < n:
        samples = samples_from_dicts(interleaved_samples(64, seed=seed, max_targets=2, size=(64, 64)))
        plans = [q for i, s in enumerate(samples) if (q := lower_sample(s, tok, cfg, index=i)) is not None]
        out += [b for b in pack_plans(plans, tokens) if b.num_tokens > tokens // 2]
        seed += 1
    return out[:n]


def run_one(preset: str, attention: str, checkpointing: bool, tokens: int, steps: int, warmup: int,
            device: torch.device, dtype: torch.dtype, batches: list | None = None) -> dict:
    """Time `steps` training steps after `warmup` ones. `batches`: packs from `make_batches` to reuse (e.g. across
    calls); built here when None."""
    from mogao.training.flops import peak_flops, training_flops
    from mogao.training.strategies import checkpoint_layer

    torch.manual_seed(0)
    on_device = device if device.type == "cuda" else None
    model = build_model(preset, attention, on_device).to(device=device, dtype=dtype).train()
    model.autoencoder.requires_grad_(False)
    if checkpointing:
        for layer in model.backbone.layers:
            checkpoint_layer(layer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=device.type == "cuda")
    if batches is None:
        batches = make_batches(tokens, 4, model.vit_patch, model.vae_patch)
    batches = [b.to(device) for b in batches]
    if dtype != torch.float32:  # images enter in the compute dtype
        for b in batches:
            b.vit_pixels = [p.to(dtype) for p in b.vit_pixels]
            b.vae_pixels = [p.to(dtype) for p in b.vae_pixels]

    def step(b) -> None:
        out = model(b)
        loss = out.terms.text_sum / out.terms.text_weight.clamp_min(1) + out.terms.image_sum
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(batches[i % len(batches)])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, n_tok, n_flops = time.perf_counter(), 0, 0
    for i in range(steps):
        b = batches[i % len(batches)]
        step(b)
        n_tok += b.num_tokens
        n_flops += training_flops(model, b).total
    sync()
    dt = time.perf_counter() - t0
    peak = peak_flops(device, dtype)
    return {"tokens_per_s": n_tok / dt, "tflops": n_flops / dt / 1e12,
            "mfu": None if not peak else n_flops / dt / peak, "peak_flops": peak, "step_s": dt / steps,
            "tokens_per_step": n_tok / steps, "flops_per_step": n_flops / steps,
            "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "params": sum(p.numel() for p in model.parameters())}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads " \
           f"(torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model size (default: tiny on CPU, 1.5b on CUDA)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per packed batch (default 1024 CPU, 8192 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 5 CUDA)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="attention backends (default: sdpa_dense on CPU; sdpa_dense flash_varlen flex on CUDA)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    preset = args.preset or ("1.5b" if cuda else "tiny")
    tokens = args.tokens or (8192 if cuda else 1024)
    steps, warmup = args.steps or (20 if cuda else 3), args.warmup if args.warmup is not None else (5 if cuda else 1)
    backends = args.backends or (["sdpa_dense", "flash_varlen", "flex"] if cuda else ["sdpa_dense"])
    print(f"### Training throughput: preset {preset}, {tokens} tokens/batch, {str(dtype).split('.')[-1]}, "
          f"{steps} timed steps\n\nMachine: {machine(device)}\n")
    print("| attention | act. ckpt | params | tokens/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for backend in backends:
        for ckpt in (False, True):
            try:
                r = run_one(preset, backend, ckpt, tokens, steps, warmup, device, dtype)
            except Exception as e:  # a backend unavailable here (e.g. flex backward on CPU) is reported
                print(f"| {backend} | {'on' if ckpt else 'off'} | - | failed: {type(e).__name__}: "
                      f"{str(e)[:60]} | | |")
                continue
            mfu = "n/a (no peak on CPU)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"| {backend} | {'on' if ckpt else 'off'} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:.0f} "
                  f"| {r['tflops']:.4f} | {mfu} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
