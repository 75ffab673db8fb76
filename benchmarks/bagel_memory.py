"""Peak GPU memory of the `recipes/bagel-7b` recipes on paper: weights, gradients, optimizer state and
activations at each recipe's token budget, from BAGEL-7B-MoT's published architecture (Qwen2.5-7B in two
experts, SigLIP-so400m less its last layer, the FLUX autoencoder). Computed, not measured; prints a markdown
table (docs/bagel.md). `benchmarks/gpu_check.py` is where a lent GPU would measure it.

    python benchmarks/bagel_memory.py [--tokens 8192]

Activations (per-layer activation checkpointing, which the recipes' FSDP2 strategy turns on): the input of
every decoder layer kept for the backward pass (N x hidden, bf16), plus the peak of one layer recomputed in the
backward pass (its attention projections and the MLP's three intermediate tensors, both experts together over
the N tokens, with their gradients), plus the LM head's fp32 logits and their gradient for the text rows that
have a loss (a quarter of the tokens assumed). Allocator slack and CUDA context (~1-2 GB) are not counted.
"""

from __future__ import annotations

import argparse

GB = 1024**3
LLM = {"hidden": 3584, "inter": 18944, "layers": 28, "heads": 28, "kv_heads": 4, "vocab": 152064}
VIT = {"hidden": 1152, "inter": 4304, "layers": 26, "patch": 14}  # so400m: 27 layers, BAGEL drops the last
LATENT_TOKEN = 16 * 2 * 2  # 16 latent channels x a 2x2 patch


def flux_ae_params() -> int:
    """Parameters of the FLUX autoencoder, from the shapes of its published `ae.safetensors` layout."""
    import math

    from mogao.bagel.flux_ae import FluxAEConfig, expected_flux_shapes

    return sum(math.prod(s) for s in expected_flux_shapes(FluxAEConfig()).values())


def expert_layer(h: int, inter: int, heads: int, kv: int) -> dict[str, int]:
    d = h // heads
    attn = h * h + h + 2 * (h * kv * d + kv * d) + h * h + 2 * d  # q (+bias), k, v (+bias), o, q/k norms
    mlp = 3 * h * inter
    return {"attn": attn, "mlp": mlp, "norms": 2 * h}


def counts() -> dict[str, int]:
    h, inter, L = LLM["hidden"], LLM["inter"], LLM["layers"]
    layer = expert_layer(h, inter, LLM["heads"], LLM["kv_heads"])
    per_expert = L * sum(layer.values()) + h  # + final norm
    v = VIT
    vit_layer = 4 * (v["hidden"] ** 2 + v["hidden"]) + 2 * v["hidden"] * v["inter"] + v["inter"] + v["hidden"] + 4 * v["hidden"]
    vit = v["layers"] * vit_layer + 3 * v["patch"] ** 2 * v["hidden"] + 70 * 70 * v["hidden"]
    return {
        "und": per_expert + 2 * LLM["vocab"] * h,  # + embeddings and the untied LM head
        "gen": per_expert,
        "vit": vit,
        "connector": v["hidden"] * h + h + h * h + h,
        "latent": 2 * (LATENT_TOKEN * h + h) + 4 * h * 256,  # vae2llm, llm2vae, timestep MLP
        "tables": (64 * 64 + 70 * 70) * h,
        "ae": flux_ae_params(),
        "layer_attn": layer["attn"], "layer_mlp": layer["mlp"],
    }


def lora_params(c: dict[str, int], rank: int, und: list[str], gen: list[str]) -> int:
    h, inter, kvd = LLM["hidden"], LLM["inter"], LLM["kv_heads"] * (LLM["hidden"] // LLM["heads"])
    dims = {"q_proj": (h, h), "k_proj": (h, kvd), "v_proj": (h, kvd), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return LLM["layers"] * sum(rank * (a + b) for m in und + gen for a, b in [dims[m]])


def activations(tokens: int) -> float:
    h, inter, L, vocab = LLM["hidden"], LLM["inter"], LLM["layers"], LLM["vocab"]
    kept = L * tokens * h * 2
    layer_peak = tokens * (6 * h + 3 * inter) * 2 * 2  # one layer's tensors and their gradients, bf16
    logits = (tokens // 4) * vocab * 4 * 2
    return kept + layer_peak + logits


ATT = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATT + ["gate_proj", "up_proj", "down_proj"]


def table(tokens_lora: int, tokens_qlora: int, tokens_full: int) -> list[tuple[str, float, float, float, float]]:
    c = counts()
    total = sum(v for k, v in c.items() if not k.startswith("layer_"))
    experts_linear = 2 * LLM["layers"] * (c["layer_attn"] + c["layer_mlp"])
    rows = []
    for name, und, gen, full_extra in (("lora-edit", ATT, ALL, 0), ("lora-interleaved", ATT, ALL, 0),
                                       ("lora-t2i", [], ALL, c["latent"])):
        trained = lora_params(c, 32, und, gen) + full_extra
        rows.append((name, total * 2 / GB, trained * 4 / GB, trained * 8 / GB, activations(tokens_lora) / GB))
        # QLoRA: the experts' linear weights in NF4 (0.5 byte + ~0.127 bit of double-quantised constants)
        nf4 = experts_linear * (0.5 + 0.127 / 8) + (total - experts_linear) * 2
        rows.append(("q" + name, nf4 / GB, trained * 4 / GB, trained * 2 / GB, activations(tokens_qlora) / GB))
    trained = c["und"] + c["gen"]
    world = 8
    rows.append((f"full (per GPU of {world})", total * 4 / world / GB + 2 * (c["layer_attn"] + c["layer_mlp"]) * 2 * 2 / GB,
                 trained * 4 / world / GB, trained * 8 / world / GB, activations(tokens_full) / GB))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="token budget of the LoRA and full recipes")
    ap.add_argument("--qlora-tokens", type=int, default=4096, help="token budget of the QLoRA recipes")
    args = ap.parse_args()
    c = counts()
    total = sum(v for k, v in c.items() if not k.startswith("layer_"))
    print(f"BAGEL-7B-MoT: {total / 1e9:.2f} B parameters (understanding expert with embeddings and LM head "
          f"{c['und'] / 1e9:.2f} B, generation expert {c['gen'] / 1e9:.2f} B, ViT {c['vit'] / 1e6:.0f} M, "
          f"autoencoder {c['ae'] / 1e6:.0f} M)\n")
    print("| recipe | weights | gradients | optimizer state | activations | total |")
    print("|---|---|---|---|---|---|")
    for name, *parts in table(args.tokens, args.qlora_tokens, args.tokens):
        cells = " | ".join(f"{p:.1f} GB" for p in parts)
        print(f"| {name} | {cells} | **{sum(parts):.1f} GB** |")


if __name__ == "__main__":
    main()
