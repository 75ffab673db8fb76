"""Training data at scale: start-up time to the first packed batch and peak resident memory per rank, JSONL
source vs prepared folder (`mogao data prepare`), at 10k, 100k and 1M synthetic samples; and the loader's
samples/s and packed tokens/s next to what the ~1.5B preset consumes on one H100 (computed, not measured).

    python benchmarks/data_scale.py                         # 10k, 100k, 1M; data cached in /tmp/mogao_data_scale
    python benchmarks/data_scale.py --sizes 10000 100000    # fewer sizes

Each measurement launches 2 ranks (processes, a gloo process group) of `MogaoDataModule` with 2 DataLoader workers
each, as `mogao fit --trainer.devices=2 --data.num_workers=2` reads data; a rank reports the seconds from its
process start to its first batch (imports included, and separately the data part: reading the source and the
first batch), its peak resident memory (main process, and the largest of its workers), then reads batches for a
few seconds for samples/s and packed tokens/s. Samples are text-to-image pairs: a short caption and one 16x16
PNG (8 distinct images, reused by path in the JSONL). The prepared folders are written directly as the shards
`mogao data prepare` writes (preparing 1M lines here would take minutes); `mogao data prepare` itself is timed on
the 10k JSONL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

T0 = time.time()  # process start, for "start-up to the first batch" (the imports are part of it)

CACHE = Path("/tmp/mogao_data_scale")
IMAGES = 8
CAPTIONS = ["a red circle", "a green square", "a blue triangle", "a yellow circle on the left",
            "two red squares", "a small blue circle", "a big green triangle", "a dog and a cat"]
DATA = {"token_budget": 1024, "max_image_tokens": 16, "vit_patch": 4, "vae_patch": 4, "lookahead": 8, "seed": 0}
MEASURE_S = 6.0


# ---- data -----------------------------------------------------------------------------------------------

def _png(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, format="PNG")
    return buf.getvalue()


def _sample(i: int) -> dict:
    return {"id": f"s{i}", "segments": [{"text": CAPTIONS[i % len(CAPTIONS)], "loss": False},
                                        {"image": f"img/{i % IMAGES}.png", "generate": True}]}


def make_jsonl(n: int) -> Path:
    root = CACHE / f"n{n}"
    path = root / "data.jsonl"
    if path.is_file():
        return path
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(IMAGES):
        (root / "img" / f"{i}.png").write_bytes(_png(i))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for start in range(0, n, 10_000):
            f.write("".join(json.dumps(_sample(i)) + "\n" for i in range(start, min(n, start + 10_000))))
    tmp.replace(path)
    return path


def make_prepared(n: int, jsonl: Path) -> Path:
    """The folder `mogao data prepare jsonl` would write, built from the same rows directly (fast)."""
    import pyarrow as pa

    from mogao.data import prepared

    out = CACHE / f"n{n}" / "data.prepared"
    if prepared.is_prepared(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    images = [_png(i) for i in range(IMAGES)]
    size = prepared.SHARD_SIZE
    shards = []
    for k, start in enumerate(range(0, n, size)):
        rows = []
        for i in range(start, min(n, start + size)):
            rows.append({"id": f"s{i}", "line": i + 1, "image_paths": [f"img/{i % IMAGES}.png"],
                         "images": [images[i % IMAGES]],
                         "segments": [{"text": CAPTIONS[i % len(CAPTIONS)], "image": None, "generate": False,
                                       "loss": 0.0},
                                      {"text": None, "image": 0, "generate": True, "loss": 1.0}]})
        name = f"shard-{k:05d}.arrow"
        with pa.OSFile(str(out / name), "wb") as sink, pa.ipc.new_stream(sink, prepared.SCHEMA) as w:
            w.write_table(pa.Table.from_pylist(rows, schema=prepared.SCHEMA))
        shards.append({"file": name, "rows": len(rows)})
    manifest = {"format": prepared.FORMAT, "version": prepared.VERSION, "source": str(jsonl.resolve()),
                "source_bytes": jsonl.stat().st_size, "shard_size": size, "samples": n, "images": n, "targets": n,
                "bad": 0, "shards": shards, "problems": []}
    (out / prepared.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def make_tokenizer() -> Path:
    out = CACHE / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        from mogao.data import train_tokenizer

        words = " ".join(CAPTIONS).split()
        tok = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))], vocab_size=400)
        tok.save_pretrained(out)
    return out


# ---- one rank -------------------------------------------------------------------------------------------

def _peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # (kilobytes on Linux)


def child(rank: int, world: int, port: int, path: str, workers: int) -> None:
    import torch.distributed as dist

    from mogao.data import DataConfig
    from mogao.training.datamodule import MogaoDataModule

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t_imports = time.time() - T0
    dm = MogaoDataModule(str(CACHE / "tokenizer"), path=path, data=DataConfig(**DATA), num_workers=workers,
                         worker_timeout=300)
    dm._rank = lambda: (rank, world)  # (what the trainer gives a rank)
    t = time.time()
    dm.setup("fit")
    t_setup = time.time() - t
    loader = dm.train_dataloader()
    it = iter(loader)
    batch = next(it)
    t_first = time.time() - T0
    t_data = time.time() - t
    dm.consumed(batch)
    peak_first = _peak_mb(resource.RUSAGE_SELF)
    samples = tokens = 0
    start = time.time()
    while time.time() - start < MEASURE_S:
        batch = next(it)
        dm.consumed(batch)
        samples += len(batch.sample_ids)
        tokens += batch.num_tokens
    elapsed = time.time() - start
    state = dm.state_dict()  # (an all-gather over the ranks, as a checkpoint does)
    del it, loader
    dm._train = None
    import gc

    gc.collect()
    time.sleep(1.0)
    dist.destroy_process_group()
    print("RESULT " + json.dumps({
        "rank": rank, "first_batch_s": t_first, "imports_s": t_imports, "setup_s": t_setup, "data_s": t_data,
        "peak_mb": _peak_mb(resource.RUSAGE_SELF), "peak_first_mb": peak_first,
        "worker_peak_mb": _peak_mb(resource.RUSAGE_CHILDREN), "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed, "state_bytes": len(json.dumps(state))}), flush=True)


def launch(path: Path, world: int = 2, workers: int = 2) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(r), str(world), str(port), str(path),
                               str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"rank failed ({p.returncode}):\n{stderr[-3000:]}")
        out.append(json.loads(lines[-1][7:]))
    return out


# ---- what a GPU consumes (computed) ---------------------------------------------------------------------

def h100_tokens_per_s(mfu: float = 0.40, peak: float = 989e12) -> tuple[float, float]:
    """Tokens/s the 1.5b preset trains at on one H100 at `mfu` (docs/distributed.md's assumption), from the
    FLOPs per token of its method: 6 x expert linear parameters (each token runs one expert), the LM head on
    20% of tokens, attention at 2048 keys a query (4k-token samples); vision left out (small at 1.5B's images).
    Returns (tokens/s, FLOPs per token)."""
    from mogao.model.known import KNOWN_LLMS

    c = KNOWN_LLMS["Qwen/Qwen2.5-1.5B-Instruct"]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter
    flops = 6 * per_layer * layers + 6 * h * c["vocab_size"] * 0.2 + 12 * hd * heads * layers * 2048
    return mfu * peak / flops, flops


# ---- main -----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--kinds", nargs="+", default=["jsonl", "prepared"], choices=["jsonl", "prepared"])
    ap.add_argument("--out", type=Path, help="also append the markdown table to this file")
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    make_tokenizer()
    rows = []
    notes = []
    # `mogao data prepare` itself, on the smallest JSONL
    from mogao.data.prepared import prepare

    small = make_jsonl(min(args.sizes))
    target = CACHE / "prepare_timing"
    if target.exists():
        import shutil

        shutil.rmtree(target)
    t = time.time()
    prepare(small, target, progress=False)
    dt = time.time() - t
    notes.append(f"`mogao data prepare` on the {min(args.sizes)}-line JSONL: {dt:.1f} s "
                 f"({min(args.sizes) / dt:,.0f} lines/s, one process, every image decoded)")
    for n in args.sizes:
        t = time.time()
        jsonl = make_jsonl(n)
        data = make_prepared(n, jsonl) if "prepared" in args.kinds else None
        print(f"data for {n}: {time.time() - t:.1f} s", file=sys.stderr)
        for kind in args.kinds:
            path = jsonl if kind == "jsonl" else data
            res = launch(path)
            row = {"n": n, "kind": kind,
                   "first_batch_s": max(r["first_batch_s"] for r in res),
                   "data_s": max(r["data_s"] for r in res),
                   "setup_s": max(r["setup_s"] for r in res),
                   "peak_mb": max(r["peak_mb"] for r in res),
                   "worker_peak_mb": max(r["worker_peak_mb"] for r in res),
                   "samples_per_s": sum(r["samples_per_s"] for r in res),
                   "tokens_per_s": sum(r["tokens_per_s"] for r in res)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    gpu, flops = h100_tokens_per_s()
    table = [f"Machine: {platform.node()}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
             f"Python {platform.python_version()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
             f"Command: `python benchmarks/data_scale.py{' --sizes ' + ' '.join(map(str, args.sizes)) if args.sizes != [10_000, 100_000, 1_000_000] else ''}`",
             "",
             "| samples | source | start-up to 1st batch, s | of which data, s | of which reading the source, s "
             "| peak RSS / rank, MB | peak RSS / worker, MB | samples/s (2 ranks) | packed tokens/s (2 ranks) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['n']:,} | {r['kind']} | {r['first_batch_s']:.1f} | {r['data_s']:.1f} | {r['setup_s']:.2f} | "
                     f"{r['peak_mb']:.0f} | {r['worker_peak_mb']:.0f} | {r['samples_per_s']:,.0f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    table += ["", *notes,
              f"The ~1.5B preset on one H100 at the 40% MFU docs/distributed.md assumes consumes **{gpu:,.0f} "
              f"packed tokens/s** (computed, not measured: {flops / 1e9:.2f} GFLOP/token from 6 x expert linear "
              "parameters + LM head on 20% of tokens + attention at 2048 keys/query; 0.40 x 989 TFLOP/s / that)."]
    text = "\n".join(table)
    print(text)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
    else:
        main()
