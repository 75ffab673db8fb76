"""Peak GPU memory of the `recipes/bagel-7b` recipes on paper: weights, gradients, optimizer state and
activations at each recipe's token budget, from BAGEL-7B-MoT's published architecture (Qwen2.5-7B in two
experts, SigLIP-so400m less its last layer, the FLUX autoencoder: `mogao.bagel.configs.bagel_7b_mot_configs`).
What each recipe trains, its optimizer, token budget and GPUs are read from its YAML file. Computed, not
measured; prints a markdown table (docs/bagel.md). The `bagel` part of `benchmarks/gpu_check.py` measures the
same recipes on a GPU and sets its figures beside these (`recipe_memory`).

    python benchmarks/bagel_memory.py [--tokens 8192] [--qlora-tokens 4096]

Activations (per-layer activation checkpointing, which the recipes' FSDP2 strategy turns on): the input of
every decoder layer kept for the backward pass (N x hidden, bf16), plus the peak of one layer recomputed in the
backward pass (its attention projections and the MLP's three intermediate tensors, both experts together over
the N tokens, with their gradients), plus the LM head's fp32 logits and their gradient for the text rows that
have a loss (a quarter of the tokens assumed). Allocator slack and CUDA context (~1-2 GB) are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

GB = 1024**3
ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "bagel-7b"
if str(ROOT) not in sys.path:  # (the project and its callbacks, without an install)
    sys.path.insert(0, str(ROOT))
LATENT_TOKEN = 16 * 2 * 2  # 16 latent channels x a 2x2 patch
# bytes of optimizer state per trained parameter, by the recipes' optimizer class paths
STATE_BYTES = {"torch.optim.AdamW": 8, "torch.optim.Adam": 8, "bitsandbytes.optim.PagedAdamW8bit": 2,
               "bitsandbytes.optim.AdamW8bit": 2, "mogao.training.optim.AdamW8bit": 2}


def _shapes() -> tuple[dict[str, int], dict[str, int]]:
    """BAGEL-7B-MoT's LLM and ViT sizes, from its configs as `mogao.bagel` reads them (the ViT one layer
    shallower than its config: BAGEL drops the last)."""
    from mogao.bagel.configs import bagel_7b_mot

    a = bagel_7b_mot()
    llm = {"hidden": a.llm.hidden_size, "inter": a.llm.intermediate_size, "layers": a.llm.num_layers,
           "heads": a.llm.num_heads, "kv_heads": a.llm.num_kv_heads, "vocab": a.llm.vocab_size}
    vit = {"hidden": a.vit.hidden_size, "inter": a.vit.intermediate_size, "layers": a.vit.layers,
           "patch": a.vit.patch_size, "side": a.vit.positions_per_side, "latent_side": a.settings.max_latent_size}
    return llm, vit


LLM, VIT = _shapes()


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
    vit = v["layers"] * vit_layer + 3 * v["patch"] ** 2 * v["hidden"] + v["side"] ** 2 * v["hidden"]
    return {
        "und": per_expert + 2 * LLM["vocab"] * h,  # + embeddings and the untied LM head
        "gen": per_expert,
        "vit": vit,
        "connector": v["hidden"] * h + h + h * h + h,
        "latent": 2 * (LATENT_TOKEN * h + h) + 4 * h * 256,  # vae2llm, llm2vae, timestep MLP
        "tables": (v["latent_side"] ** 2 + v["side"] ** 2) * h,  # the latent and ViT position tables
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


def read_recipe(name: str) -> dict:
    """What the memory of a recipe depends on, from `recipes/bagel-7b/<name>.yaml`: the LoRA spec (None: full
    fine-tuning) or the parts trained in full, the optimizer's class path, the token budget and the GPUs."""
    import yaml

    cfg = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    init = cfg["model"]["init_args"]
    return {"name": name, "lora": init.get("lora"), "train": init.get("train"),
            "optimizer": init["optimizer"]["class_path"], "tokens": int(cfg["data"]["data"]["token_budget"]),
            "devices": int(cfg["trainer"].get("devices") or 1)}


def recipe_names() -> list[str]:
    """The recipes, in the table's order: by task, LoRA before QLoRA, full fine-tuning last."""
    names = [p.stem for p in RECIPES.glob("*.yaml")]
    task = {"edit": 0, "interleaved": 1, "t2i": 2}
    return sorted(names, key=lambda n: (n == "full", task.get(n.split("-")[-1], 3), n.startswith("q"), n))


def recipe_memory(name: str, tokens: int | None = None) -> dict:
    """The computed peak of one recipe (GiB): weights, gradients, optimizer state, activations, total; `label`
    names the row (full fine-tuning: per GPU of its recipe's GPUs). tokens: the token budget (None: the
    recipe's)."""
    from mogao.lora.spec import LoraSpec

    r = read_recipe(name)
    c = counts()
    total = sum(v for k, v in c.items() if not k.startswith("layer_"))
    n = tokens or r["tokens"]
    state = STATE_BYTES[r["optimizer"]]
    if r["lora"] is None:  # full fine-tuning, sharded over the recipe's GPUs (fp32 master weights)
        world = r["devices"]
        trained = sum(c[p] for p in (r["train"] or ["und", "gen"]))
        gathered = 2 * (c["layer_attn"] + c["layer_mlp"]) * 2 * 2  # a layer's two experts all-gathered in bf16
        parts = (total * 4 / world + gathered, trained * 4 / world, trained * state / world, activations(n))
        label = f"{name} (per GPU of {world})"
    else:
        spec = LoraSpec(**r["lora"])
        h = LLM["hidden"]
        full = {"latent_proj": 2 * LATENT_TOKEN * h + h + LATENT_TOKEN}  # the latent in / out projections
        trained = lora_params(c, spec.rank, spec.modules("und"), spec.modules("gen")) + sum(full[p] for p in spec.full)
        if spec.quantize == "nf4":  # the experts' linear weights in NF4 (0.5 byte + ~0.127 bit of double-quantised
            linear = 2 * LLM["layers"] * (c["layer_attn"] + c["layer_mlp"])  # constants); the rest bf16
            weights = linear * (0.5 + 0.127 / 8) + (total - linear) * 2
        else:
            weights = total * 2
        parts = (weights, trained * 4, trained * state, activations(n))
        label = name
    keys = ("weights", "gradients", "optimizer", "activations")
    return {"label": label, "tokens": n, "trained": trained, **{k: v / GB for k, v in zip(keys, parts)},
            "total": sum(parts) / GB}


# ---- measured: each recipe trained a few steps on a GPU through `mogao fit`'s own code ---------------------

GiB = 2**30
CARD_24GB = 24 * GiB  # what a "24 GB" card (RTX 3090 / 4090, L4, A10) holds
TASKS = {"edit": ("edit", "caption", "t2i"), "interleaved": ("story", "caption", "t2i"), "t2i": ("t2i",)}


def settings_key(name: str) -> str:
    """A recipe's YAML with its run folder left out: two recipes with the same key train the same model with the
    same adapters, optimizer, strategy and data settings (they differ in the data a user gives them)."""
    import json

    import yaml

    cfg = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    cfg.get("trainer", {}).pop("default_root_dir", None)
    return json.dumps(cfg, sort_keys=True)


def measurement_plan(names: list[str]) -> list[tuple[str, list[str]]]:
    """(recipe to run, recipes with the same settings) in the order of `names`: each setting is run once."""
    plan: dict[str, tuple[str, list[str]]] = {}
    for n in names:
        key = settings_key(n)
        if key in plan:
            plan[key][1].append(n)
        else:
            plan[key] = (n, [])
    return list(plan.values())


def write_model_folder(root: Path, arch: str) -> Path:
    """A BAGEL folder to point a recipe at. arch "tiny": the tiny BAGEL folder of the tests (weights included);
    "7b": BAGEL-7B-MoT's configs (`bagel_7b_mot_configs`), the tiny folder's tokenizer (BAGEL's special tokens,
    300 ids) and an `ema.safetensors` holding no tensor. The measurement replaces the weights anyway: the model
    is built with random weights on the device (`mogao.bagel.load.random_bagel_model`)."""
    import json
    import shutil

    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from tiny_bagel import write_tiny_bagel

    tiny = write_tiny_bagel(root / "BAGEL-tiny").path
    if arch == "tiny":
        return tiny
    from safetensors.torch import save_file

    from mogao.bagel.configs import bagel_7b_mot_configs

    folder = root / "BAGEL-7B-MoT-random"
    folder.mkdir(parents=True, exist_ok=True)
    llm, vit = bagel_7b_mot_configs()
    (folder / "llm_config.json").write_text(json.dumps(llm, indent=2))
    (folder / "vit_config.json").write_text(json.dumps(vit, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / f, folder / f)
    save_file({}, str(folder / "ema.safetensors"))
    return folder


def _architecture(folder: Path):
    from mogao.bagel.configs import bagel_7b_mot
    from mogao.bagel.folder import check_bagel_folder

    if (folder / "ae.safetensors").is_file():  # a folder with its weights: its architecture as it is read
        return check_bagel_folder(folder).arch
    return bagel_7b_mot()


def synthetic_data(name: str, arch, tokenizer, out: Path, data: dict, n: int = 8) -> tuple[Path, dict[str, list[int]]]:
    """A JSONL file of built-in shapes samples for a recipe (`TASKS`: its task's samples, and for an interleaved
    stage image captions and text-to-image samples too), its images drawn at the size its `max_image_tokens`
    gives, and {task: the tokens of each sample} as the recipe's data settings lower them (no dropout)."""
    import math
    from dataclasses import replace

    from mogao.bagel.load import bagel_model_config
    from mogao.data import DataConfig, lower_sample, samples_from_dicts
    from mogao.data.builtin import make_builtin
    from mogao.data.importers import write_jsonl

    cfg = bagel_model_config(arch, "-")
    vae_patch = cfg.latent_patch * 2 ** (len(arch.settings.autoencoder.block_out_channels) - 1)
    dcfg = replace(DataConfig(**data), vit_patch=arch.vit.patch_size, vae_patch=vae_patch,
                   drop_unread_vae=not cfg.text_sees_vae, positions=cfg.positions,
                   sequence_format=cfg.sequence_format, p_drop_text=0.0, p_drop_images=0.0, token_budget=1 << 30)
    side = math.isqrt(dcfg.max_image_tokens) * vae_patch
    (out / "img").mkdir(parents=True, exist_ok=True)
    rows, sizes = [], {}
    for task in TASKS[next((t for t in TASKS if name.endswith(t)), "interleaved")]:
        made = make_builtin(task, n=n, image_size=side, seed=1)
        sizes[task] = []
        for i, s in enumerate(made.samples):
            for j, seg in enumerate(s["segments"]):
                if "image" in seg:
                    path = out / "img" / f"{task}-{i}-{j}.png"
                    seg["image"].save(path)
                    seg["image"] = str(path.relative_to(out))
            sizes[task].append(lower_sample(samples_from_dicts([s], root=out)[0], tokenizer, dcfg).num_tokens)
            rows.append(s)
    order = sorted(range(len(rows)), key=lambda i: (i % n, i))  # the tasks' samples alternate
    return write_jsonl([rows[i] for i in order], out / "data.jsonl"), sizes


@contextlib.contextmanager
def _no_linear4bit_init() -> Iterator[None]:
    """bitsandbytes' `Linear4bit` is an `nn.Linear`: made on the host, it draws random float32 weights there
    (kaiming init), which `mogao.lora.quant.quantize_nf4` replaces at once with the model's weights. For
    BAGEL-7B-MoT's ~7 B adapted weights that draw takes tens of seconds of host time and changes nothing the
    measurement reads (GPU memory, step time): it is skipped here."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        yield
        return
    cls = bnb.nn.Linear4bit
    had = "reset_parameters" in cls.__dict__
    old = cls.__dict__.get("reset_parameters")
    cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        if had:
            cls.reset_parameters = old
        else:
            del cls.reset_parameters


def measure_recipe(name: str, folder: Path, work: Path, steps: int = 3, cpu: bool = False,
                   args: tuple[str, ...] = (), dtype: str = "bfloat16") -> dict:
    """Train recipe `name` `steps` optimizer steps as `mogao fit --config bagel-7b/<name>` would (its module,
    LoRA spec, optimizer, strategy, precision and data settings, parsed from its YAML by the same CLI), with
    the model of `folder` built with random weights on the device instead of read from files, on synthetic
    data (`synthetic_data`). What it measures, in one dict: trainable parameters, tokens and samples per step,
    CUDA peak memory (allocated, reserved) from the start of the fit to its end, step seconds (the first step
    apart), losses. `args`: more command-line overrides (the CPU dry run's sizes). dtype: of the random weights
    (BAGEL's files hold bfloat16; the CPU dry run takes float32, which a CPU multiplies much faster)."""
    import gc
    import time

    import lightning.pytorch as pl
    import torch
    import yaml
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
    from transformers import AutoTokenizer

    import mogao.bagel.load as bagel_load
    from callbacks.preemption import PreemptionCheckpoint
    from mogao.recipes import build_cli

    cuda = torch.cuda.is_available() and not cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, dtype)
    arch = _architecture(folder)
    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    data = dict(recipe["data"]["data"])
    for a in args:  # (the dry run's smaller data sizes)
        if a.startswith("--data.data."):
            key, value = a.removeprefix("--data.data.").split("=", 1)
            data[key] = type(data[key])(value) if key in data else int(value)
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(folder))
    jsonl, sizes = synthetic_data(name, arch, tok, work / "data", data)
    over = {t: (sum(k > data["token_budget"] for k in n), len(n), min(n)) for t, n in sizes.items()
            if max(n) > data["token_budget"]}  # {task: (samples over the budget, samples, fewest tokens)}
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0  # (what an earlier recipe in this process left)

    def random_model(source, overrides=None):  # what `init_from` reads, with random weights made on the device
        return bagel_load.random_bagel_model(arch, device, dtype=dtype, overrides=overrides, folder=source)

    t0 = time.perf_counter()
    real = bagel_load.load_any_model
    bagel_load.load_any_model = random_model
    try:
        with _no_linear4bit_init():
            cli = build_cli(["--config", str(RECIPES / f"{name}.yaml"), f"--model.init_args.init_from={folder}",
                             f"--model.init_args.tokenizer={folder}", f"--data.path={jsonl}", "--data.num_workers=0",
                             f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={work / 'run'}",
                             "--trainer.enable_progress_bar=false", *args], run=False)
    finally:
        bagel_load.load_any_model = real
    module, trainer = cli.model, cli.trainer
    quantized = bool(getattr(getattr(module.model, "lora_state", None), "quantized", False))
    if quantized:
        # bitsandbytes quantizes an NF4 layer's weight when it is moved to the GPU: a run from a folder has its
        # base on the host, and FSDP2 moves it as it shards; here it is already on the GPU, so it is moved in place
        module.model.cuda()
    build_s = time.perf_counter() - t0
    # three steps write no checkpoint and the trained adapter is not saved: nothing here is worth the disk
    trainer.callbacks = [c for c in trainer.callbacks
                         if not isinstance(c, (ModelCheckpoint, OnExceptionCheckpoint, PreemptionCheckpoint))]
    module.on_fit_end = lambda: None
    times, tokens, samples, losses, outside = [], [], [], [], [0]

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
                free, total = torch.cuda.mem_get_info()  # device memory torch's allocator does not hold: the
                outside[0] = max(outside[0], total - free - torch.cuda.memory_reserved())  # context, NCCL, paged
            times.append(time.perf_counter() - self.t)
            tokens.append(batch.num_tokens)
            samples.append(len(batch.sample_ids))
            losses.append(pl_module.last_metrics.get("loss"))

    trainer.callbacks.append(Clock())
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()  # (the bf16 copies the NF4 quantization freed)
        torch.cuda.reset_peak_memory_stats()
    flush = torch.set_flush_denormal(not cuda)  # (CPU: the tiny model's tiny gradients are no reason to crawl)
    try:
        trainer.fit(module, datamodule=cli.datamodule)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    row = {"recipe": name, "trainable": sum(module.trainable_counts.values()), "steps": len(times), "wanted": steps,
           "tokens": tokens, "samples": samples, "budget": data["token_budget"],
           "losses": losses, "nonfinite": module.faults.steps, "build_s": build_s,
           "first_step_s": times[0] if times else None,
           "step_s": sum(times[1:]) / len(times[1:]) if len(times) > 1 else None, "over_budget": over,
           "quantized": quantized, "device": str(device)}
    if cuda:
        paged = [t for opt in trainer.optimizers for st in opt.state.values() for t in st.values()
                 if torch.is_tensor(t) and getattr(t, "is_paged", False)]
        row.update(peak_allocated=torch.cuda.max_memory_allocated() - before,
                   peak_reserved=torch.cuda.max_memory_reserved(), start_allocated=before, outside=outside[0],
                   paged=sum(t.numel() * t.element_size() for t in paged))  # (bitsandbytes' paged optimizer state)
        # what a GPU must hold: the allocator's peak and the most seen outside it at a step's end (CUDA context,
        # NCCL buffers, paged optimizer state resident on the device)
        row["device_peak"] = row["peak_reserved"] + outside[0]
    del cli, module, trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def measured_row(r: dict) -> dict:
    """A measurement as the GPU check's table row: GiB, the computed figure for the same recipe (`recipe_memory`) at
    its token budget and at the tokens of the largest step (the ratio's), and whether a QLoRA recipe's peak fits a
    24 GB card."""
    most = max(r["tokens"]) if r["tokens"] else None
    row = {"recipe": r["recipe"], "trainable": r["trainable"], "tokens": most, "step_s": r["step_s"],
           "first_step_s": r["first_step_s"], "computed_gib": recipe_memory(r["recipe"])["total"]}
    if r.get("peak_allocated") is not None:
        row["peak_gib"] = r["peak_allocated"] / GiB
        row["reserved_gib"] = r["peak_reserved"] / GiB
        if most:  # (the peak comes with the largest pack)
            row["computed_same_tokens_gib"] = recipe_memory(r["recipe"], tokens=most)["total"]
            row["ratio"] = row["peak_gib"] / row["computed_same_tokens_gib"]
        if r["recipe"].startswith("qlora"):
            fits = r["device_peak"] <= CARD_24GB
            row["fits_24gb"] = f"{'yes' if fits else 'NO'} ({r['device_peak'] / GiB:.1f} GiB)"
    return row


def _not_run(name: str, cuda: bool) -> str | None:
    """Why recipe `name` cannot be measured here (None: it can)."""
    r = read_recipe(name)
    if r["devices"] > 1:
        return (f"needs {r['devices']} GPUs: FSDP2 shards its weights, gradients and Adam state {r['devices']} "
                "ways, and one GPU would hold them whole (14.7 B parameters x 16 bytes); a run of fewer layers on "
                "one GPU does not give the per-GPU peak either (the sharded state and the per-rank activations "
                "scale differently), so it is not measured on one GPU")
    if (r["lora"] or {}).get("quantize") == "nf4" and not cuda:
        return "needs CUDA (bitsandbytes' NF4 base)"
    return None


def measure(names: list[str], folder: Path, work: Path, steps: int = 3, cpu: bool = False, args: tuple[str, ...] = (),
            isolate: bool = True, one_process: bool = True, time_left=None, dtype: str = "bfloat16") -> Iterator[dict]:
    """Rows for the recipes `names`, yielded as they come: a measurement (`measure_recipe`), {"recipe",
    "same_as"} for a recipe with the settings of one measured before it (`measurement_plan`), {"recipe",
    "needs"} for one that cannot run here (`_not_run`), {"recipe", "error"} for one that failed.

    isolate: run the recipes in child processes (a fresh CUDA allocator; a crash costs only its process), one
    for all (one_process) or one each; in one process each recipe's model, optimizer and trainer are freed
    before the next starts, the allocator's cache emptied and its peak counters reset, and the row records
    what was still allocated when it started (`start_allocated`). time_left: seconds left (a callable); a child
    still running then is stopped and its remaining recipes are reported as not reached."""
    import torch

    cuda = torch.cuda.is_available() and not cpu
    todo, not_run = [], []
    for name, twins in measurement_plan(names):
        why = _not_run(name, cuda)
        if why:
            not_run += [{"recipe": n, "needs": why} for n in (name, *twins)]
        else:
            todo.append((name, twins))
    yield from _runs(todo, folder, work, steps, cpu, args, isolate, one_process, time_left, dtype)
    yield from not_run


def _runs(todo: list[tuple[str, list[str]]], folder: Path, work: Path, steps: int, cpu: bool, args: tuple[str, ...],
          isolate: bool, one_process: bool, time_left, dtype: str) -> Iterator[dict]:
    """`measure`'s rows of the recipes it runs (`todo`: each with the recipes that share its settings)."""
    import subprocess
    import time

    if not isolate:
        import torch.distributed as dist

        had_group = dist.is_available() and dist.is_initialized()
        try:
            for name, twins in todo:
                try:
                    yield measure_recipe(name, folder, work / name, steps, cpu, args, dtype)
                except Exception as e:
                    yield {"recipe": name, "error": f"{type(e).__name__}: {e}"[-1500:]}
                yield from ({"recipe": t, "same_as": name} for t in twins)
        finally:  # the strategy's process group (one rank) is not left to the rest of this process
            if not had_group and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        return
    groups = [todo] if one_process else [[t] for t in todo]
    for group in groups:
        out = work / f"rows.{group[0][0]}.jsonl"
        log = work / f"log.{group[0][0]}.txt"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--measure", *[n for n, _ in group], "--folder", str(folder), "--work",
               str(work), "--steps", str(steps), "--out", str(out), "--dtype", dtype, *(["--cpu"] if cpu else []),
               *[f"--arg={a}" for a in args]]
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        pending, read = list(group), [0]
        stopped = False
        while proc.poll() is None:
            yield from _new_rows(out, read, pending)
            if time_left is not None and time_left() < 2:
                proc.kill()
                stopped = True
                break
            time.sleep(1.0)
        proc.wait()
        yield from _new_rows(out, read, pending)
        tail = log.read_text()[-1500:] if log.exists() else ""
        for name, twins in pending:
            if stopped:
                yield {"recipe": name, "error": "not reached: stopped at the time budget", "reached": False}
            else:
                yield {"recipe": name, "error": f"the measuring process exited with {proc.returncode}: {tail}"}
            yield from ({"recipe": t, "same_as": name} for t in twins)


def _new_rows(out: Path, read: list[int], pending: list[tuple[str, list[str]]]) -> Iterator[dict]:
    """The rows a measuring process appended to `out` since `read[0]` lines (then with those of its recipes'
    twins), each recipe taken off `pending`."""
    import json

    lines = out.read_text().splitlines() if out.exists() else []
    for line in lines[read[0]:]:
        row = json.loads(line)
        done = next(g for g in pending if g[0] == row["recipe"])
        pending.remove(done)
        yield row
        yield from ({"recipe": t, "same_as": row["recipe"]} for t in done[1])
    read[0] = len(lines)


def _child(names: list[str], folder: Path, work: Path, steps: int, out: Path, cpu: bool, args: tuple[str, ...],
           dtype: str) -> None:
    """One measuring process: each recipe in turn, a JSON line per recipe in `out` as soon as it is measured."""
    import json

    for name in names:
        try:
            row = measure_recipe(name, folder, work / name, steps, cpu, args, dtype)
        except Exception as e:  # (recorded; the next recipe starts on a freed allocator)
            import traceback

            row = {"recipe": name, "error": f"{type(e).__name__}: {e}"[-1200:],
                   "trace": traceback.format_exc()[-2000:]}
        with open(out, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=None, help="token budget of the LoRA and full recipes "
                                                             "(default: each recipe's)")
    ap.add_argument("--qlora-tokens", type=int, default=None, help="token budget of the QLoRA recipes "
                                                                   "(default: each recipe's)")
    ap.add_argument("--measure", nargs="+", metavar="RECIPE", help=argparse.SUPPRESS)  # (one measuring process)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    ap.add_argument("--arg", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        _child(args.measure, args.folder, args.work, args.steps, args.out, args.cpu, tuple(args.arg), args.dtype)
        return
    c = counts()
    total = sum(v for k, v in c.items() if not k.startswith("layer_"))
    print(f"BAGEL-7B-MoT: {total / 1e9:.2f} B parameters (understanding expert with embeddings and LM head "
          f"{c['und'] / 1e9:.2f} B, generation expert {c['gen'] / 1e9:.2f} B, ViT {c['vit'] / 1e6:.0f} M, "
          f"autoencoder {c['ae'] / 1e6:.0f} M)\n")
    print("| recipe | weights | gradients | optimizer state | activations | total |")
    print("|---|---|---|---|---|---|")
    for name in recipe_names():
        m = recipe_memory(name, args.qlora_tokens if name.startswith("qlora") else args.tokens)
        cells = " | ".join(f"{m[k]:.1f} GB" for k in ("weights", "gradients", "optimizer", "activations"))
        print(f"| {m['label']} | {cells} | **{m['total']:.1f} GB** |")


if __name__ == "__main__":
    main()
