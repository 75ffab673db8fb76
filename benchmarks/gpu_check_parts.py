"""The parts of `benchmarks/gpu_check.py`: each measures one group of GPU figures into a `Recorder`, which writes
its rows to a JSON file after every one (a part killed at its budget keeps what it had). Also the pytest plugin
that streams per-test results (`-p gpu_check_parts`) and one FSDP2 rank of tests/dist_child.py on CUDA.

Only the standard library is imported here; each part imports torch and the project when it starts.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def gpu_test_files() -> list[str]:
    """Test files holding tests marked `gpu` (relative to the repository root). The attention suite goes last:
    it is the longest (flex compiles), so a budget cut falls on it rather than on the quick checks."""
    files = [p for p in (ROOT / "tests").rglob("test_*.py") if "pytest.mark.gpu" in p.read_text(encoding="utf-8")]
    files.sort(key=lambda p: (p.name == "test_attention_gpu.py", p.relative_to(ROOT).as_posix()))
    return [p.relative_to(ROOT).as_posix() for p in files]  # (tests/<package>/test_*.py)


# ------------------------------------------------------------------------------------------- recording


@dataclass
class Recorder:
    """A part's rows, written to `path` after each one (atomic replace), so a killed part keeps its rows."""

    path: Path
    deadline: float
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    on_write: object = None

    def add(self, row: dict) -> None:
        row.setdefault("status", "failed: " + row["error"] if "error" in row else "ok")
        self.rows.append(row)
        self.write()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.write()

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self, **extra) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": self.rows, "notes": self.notes, **extra}, indent=1, default=str))
        os.replace(tmp, self.path)
        if callable(self.on_write):
            self.on_write()


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _over(rec: Recorder) -> bool:
    if rec.time_left() > 0:
        return False
    rec.note("stopped at its time budget; the rows not reached are marked")
    return True


# ------------------------------------------------------------------------------------------- the parts


def part_tests(rec: Recorder, s: dict, dry: bool, out: Path) -> None:
    events = out / "parts" / "tests.events.jsonl"
    events.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "gpu_check_parts", "-p", "no:cacheprovider",
           f"--junitxml={out / 'gpu_tests.xml'}", *gpu_test_files()]
    env = {**os.environ, "GPU_CHECK_EVENTS": str(events),
           "PYTHONPATH": os.pathsep.join([str(BENCH), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rec.note("command: " + shlex.join(cmd[1:]))
    log = out / "parts" / "tests.pytest.log"  # a file, not a pipe: long failure output cannot block pytest
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seen, collected = 0, []

    def drain() -> None:
        nonlocal seen, collected
        if not events.exists():
            return
        text = events.read_text()
        lines = text[: text.rfind("\n") + 1].splitlines()  # complete lines only: pytest may be mid-write
        for line in lines[seen:]:
            e = json.loads(line)
            if "collected" in e:
                collected = e["collected"]
            else:
                rec.add({"test": e["nodeid"], "outcome": e["outcome"], "seconds": e["duration"],
                         "message": e["message"], "status": "failed" if e["outcome"] in ("failed", "error") else "ok"})
        seen = len(lines)

    while proc.poll() is None:
        drain()
        if rec.time_left() < 3:
            proc.kill()
            rec.note("pytest stopped at the part's budget")
            break
        time.sleep(0.5)
    proc.wait()
    drain()
    done = {r["test"] for r in rec.rows}
    for nodeid in collected:
        if nodeid not in done:
            rec.add({"test": nodeid, "status": "not reached (budget)"})
    counts = {k: sum(r.get("outcome") == k for r in rec.rows) for k in ("passed", "failed", "error", "skipped")}
    rec.note("pytest exit {}: {passed} passed, {failed} failed, {error} errors, {skipped} skipped".format(
        proc.returncode, **counts))
    if proc.returncode not in (0, 1, 5, -9):  # 1: tests failed (recorded above); 5: none collected
        rec.note("pytest output tail: " + log.read_text()[-1500:])


def part_attention(rec: Recorder, s: dict, dry: bool, out: Path) -> None:
    import torch
    from attention_speed import measure

    dev = _device()
    rec.note("ratio: the bf16 rule of DESIGN §3, which binds flash_varlen and flex; sdpa_dense is the reference "
             "backend (no rule of its own: its ratio is for comparison). Causal FA2 computes a different mask, "
             "so it has no error columns")
    # flex last, at every size: its compilation (once per padded length) is the slow, uncertain step, so a
    # budget cut falls on it and not on the other backends' larger packs
    for group in (("sdpa_dense", "flash_varlen", "causal"), ("flex",)):
        for tokens in s["tokens"]:
            if _over(rec):
                return
            rows = []
            for r in measure(tokens, dev, torch.bfloat16, s["repeats"], s["max_targets"], s["image_tokens"],
                             s["vit_tokens"], s["text_tokens"], backends=group):
                if "errors" in r:  # the error columns arrive after the group's backends ran
                    for row in rows:
                        row.update(r["errors"].get(row["backend"], {}))
                    rec.write()
                    continue
                if "fwd_s" in r:
                    r["fwd_bwd_s"] = r.pop("fwd_s")
                if r.get("note"):
                    r["status"] = "ok (" + r.pop("note") + ")"
                rows.append(r)
                rec.add(r)


DENSE_BF16_PEAK = {"gh200": 989e12, "h200": 989e12, "h100": 989e12, "h800": 989e12, "b200": 2250e12,
                   "a100": 312e12, "a800": 312e12, "l40s": 362e12, "l4": 121e12}


def dense_peak() -> float | None:
    """Dense (no sparsity) bf16 tensor-core peak of this GPU, from its name; None if unknown."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    return next((v for k, v in sorted(DENSE_BF16_PEAK.items(), key=lambda kv: -len(kv[0])) if k in name), None)


def part_train(rec: Recorder, s: dict, dry: bool, out: Path) -> None:
    import torch
    from train_throughput import build_model, make_batches, run_one

    dev = _device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    probe = build_model("tiny", "sdpa_dense")  # patch sizes are the same for every preset
    batches = make_batches(s["tokens"], 4, probe.vit_patch, probe.vae_patch)
    peak = dense_peak()
    rec.note(f"{str(dtype).split('.')[-1]}, {s['tokens']} tokens per pack, {s['steps']} timed steps after "
             f"{s['warmup']}; MFU (Lightning peak) is callbacks.Throughput's figure; MFU (dense bf16 peak) divides "
             "by " + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "(unknown here)"))
    attention = s["attention"]
    for preset in s["presets"]:
        for ckpt in (False, True):
            if _over(rec):
                return
            for _ in range(2):  # a failing flash_varlen leaves the figure to sdpa_dense (its error is kept)
                row = {"preset": preset, "ckpt": "on" if ckpt else "off", "attention": attention}
                try:
                    r = run_one(preset, attention, ckpt, s["tokens"], s["steps"], s["warmup"], dev, dtype, batches)
                    row.update(r, mfu_dense=r["tflops"] * 1e12 / peak if peak else None,
                               peak_gib=None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rec.add(row)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                if "error" not in row or attention == "sdpa_dense":
                    break
                attention = "sdpa_dense"
                rec.note(f"{row['attention']} failed ({row['error'][:120]}); the remaining rows use sdpa_dense")


def part_ectf(rec: Recorder, s: dict, dry: bool, out: Path) -> None:
    import torch
    from ectf_scaling import measure

    dev = _device()
    cuda = dev.type == "cuda"
    attention = "flash_varlen" if cuda else "sdpa_dense"
    rec.note(f"hidden {s['hidden']}, {s['layers']} layers, {(s['image_px'] // 4) ** 2} tokens per image copy, "
             + ("bf16 autocast" if cuda else "fp32"))
    todo = list(s["targets"])
    while todo:
        try:
            for row in measure(todo, s["repeats"], s["hidden"], s["layers"], s["image_px"], dev, attention,
                               torch.bfloat16 if cuda else None):
                rec.add({**row, "attention": attention})
                todo.remove(row["targets"])
                if _over(rec):
                    return
        except Exception as e:  # flash_varlen failing leaves the comparison to sdpa_dense
            if attention == "sdpa_dense":
                raise
            rec.note(f"{attention} failed ({type(e).__name__}: {str(e)[:120]}); the remaining rows use sdpa_dense")
            attention = "sdpa_dense"


def part_generation(rec: Recorder, s: dict, dry: bool, out: Path) -> None:
    from generation import measure

    rec.note(f"random model hidden {s['hidden']}, {s['layers']} layers, fp32; image block 256 tokens")
    for r in measure(_device(), tuple(s["contexts"]), s["repeat"], s["n_new"], s["hidden"], s["layers"]):
        if r["unit"] == "s":
            r["fast"], r["slow"] = f"{r['fast'] * 1e3:.2f} ms", f"{r['slow'] * 1e3:.2f} ms"
        else:
            r["fast"], r["slow"] = f"{r['fast']:.1f} tok/s", f"{r['slow']:.1f} tok/s"
        rec.add(r)
        if _over(rec):
            return


def part_export(rec: Recorder, s: dict, dry: bool, out: Path) -> None:
    """`mogao eval --export geneval` (its `export_benchmark`) on a random model of a preset: images/s at each batch
    size, and how far batched images lie from one-at-a-time ones (the same per-image seeds)."""
    import shutil

    import torch
    from export_speed import measure
    from train_throughput import build_model

    from mogao.data import train_tokenizer
    from mogao.data.shapes_mini import caption_corpus

    dev = _device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build_model(s["preset"], "sdpa_dense", dev if dev.type == "cuda" else None)
    model = model.to(device=dev, dtype=dtype).eval()
    tok = train_tokenizer(caption_corpus(), vocab_size=300)
    tokens = (s["resolution"] // model.vae_patch) ** 2
    rec.note(f"random {s['preset']} preset, {str(dtype).split('.')[-1]}, GenEval layout, {s['prompts']} prompts x "
             f"{s['samples']} samples, {s['resolution']} px ({tokens} tokens an image), {s['steps']} Euler steps, "
             "2-branch CFG; after a one-image warm-up")
    root = Path(tempfile.mkdtemp(prefix="export_", dir=out / "parts"))
    try:
        for r in measure(model, tok, root, prompts=s["prompts"], samples=s["samples"], steps=s["steps"],
                         resolution=s["resolution"], batch_sizes=tuple(s["batch_sizes"]),
                         run_info={"device": str(dev), "dtype": str(dtype)}):
            rec.add(r)
            if _over(rec):
                return
    finally:
        shutil.rmtree(root, ignore_errors=True)


def part_lora(rec: Recorder, s: dict, dry: bool, out: Path) -> None:
    from lora_memory import measure

    rec.note("peak: torch.cuda.max_memory_allocated" if not dry else
             "dry run: modes run in this process; peak is its resident set size, not a measurement")
    for r in measure(tuple(s["modes"]), s["hidden"], s["layers"], s["tokens"], s["preset"], isolate=not dry):
        if "needs" in r:
            r["status"] = "needs CUDA"
        elif "error" in r:
            r["error"] = r["error"][-600:]
        else:
            r["peak_gib"] = r["peak_bytes"] / 2**30
        rec.add(r)
        if _over(rec):
            return


def part_bagel(rec: Recorder, s: dict, dry: bool, out: Path) -> None:
    """Each `recipes/bagel-7b` recipe that runs on one GPU, trained a few steps through `mogao fit`'s own code on
    BAGEL-7B-MoT with random weights made on the GPU (`bagel_memory.measure`): peak memory beside the computed
    figure of `bagel_memory.recipe_memory`, step time, and for QLoRA whether the peak fits a 24 GB card."""
    import shutil

    from bagel_memory import measure, recipe_names, write_model_folder

    work = Path(tempfile.mkdtemp(prefix="bagel_", dir=out / "parts"))
    names = recipe_names()
    if s.get("recipes"):
        names = [n for n in names if n in s["recipes"]]
    try:
        folder = write_model_folder(work, s["arch"])
        if dry:
            rec.note("dry run: the tiny BAGEL folder of the tests on the CPU (float32), in this process; no GPU peak "
                     "is measured and the computed figures are BAGEL-7B-MoT's")
        else:
            rec.note("BAGEL-7B-MoT (mogao.bagel.configs.bagel_7b_mot) with random weights made on the GPU (bf16, the "
                     "autoencoder fp32), run as `mogao fit --config bagel-7b/<recipe>` runs it (the recipe's module, "
                     f"LoRA spec, optimizer, strategy, precision and data settings), {s['steps']} optimizer steps; "
                     "QLoRA's NF4 base quantized on the GPU by bitsandbytes")
            rec.note("data: built-in shapes samples at the recipe's max_image_tokens (edit: edits, captions and "
                     "text-to-image; interleaved: stories, captions, text-to-image; t2i: text-to-image), packed to "
                     "its token budget by its data settings; a 300-id stand-in tokenizer with BAGEL's special tokens")
            rec.note("peak: torch.cuda.max_memory_allocated / max_memory_reserved from the start of the fit (strategy "
                     "setup included; loading a folder on the host is not part of it); computed: "
                     "benchmarks/bagel_memory.py at the same tokens per step (ratio) and at the recipe's budget "
                     "(computed GiB); fits 24 GB: peak reserved + CUDA context and memory outside torch's allocator + "
                     "bitsandbytes' paged optimizer state <= 24 GiB")
            rec.note("recipes run one after another in " + ("one process: each one's model, optimizer and trainer are "
                     "freed, the allocator's cache emptied and its peak counters reset before the next"
                     if s["one_process"] else "a process each"))
        for r in measure(names, folder, work, s["steps"], cpu=dry, args=tuple(s["args"]), isolate=not dry,
                         one_process=s["one_process"], time_left=rec.time_left, dtype=s["dtype"]):
            rec.add(_bagel_row(r))
            if dry and _over(rec):
                return
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bagel_row(r: dict) -> dict:
    """A row of the bagel table from a `bagel_memory.measure` row."""
    from bagel_memory import measured_row, recipe_memory

    name = r["recipe"]
    computed = recipe_memory(name)["total"]
    if "same_as" in r:
        return {"recipe": name, "computed_gib": computed,
                "status": f"same settings as {r['same_as']}: not run again (its row holds the measurement)"}
    if "needs" in r:
        return {"recipe": name, "computed_gib": computed, "status": r["needs"]}
    if "error" in r:
        row = {"recipe": name, "computed_gib": computed, "error": r["error"][-600:]}
        if r.get("reached") is False:
            row["status"] = "not reached (budget)"
        return row
    row = measured_row(r)
    problems = []
    if r["steps"] < r.get("wanted", r["steps"]) or not r["steps"]:
        problems.append(f"only {r['steps']} steps ran")
    if r["nonfinite"]:
        problems.append(f"{r['nonfinite']} steps with a non-finite loss made no update (their peak lacks the backward)")
    if problems:
        row["status"] = "failed: " + "; ".join(problems)
        return row
    notes = [f"{t}: {over} of {n} samples over the {r['budget']}-token budget (smallest {low} tokens)"
             + (", none in the packs" if over == n else "") for t, (over, n, low) in r["over_budget"].items()]
    if (r.get("start_allocated") or 0) > 2**26:
        notes.append(f"{r['start_allocated'] / 2**20:.0f} MiB still allocated from the recipe before it")
    if r.get("peak_allocated") is None:
        notes.append("no GPU: peak not measured")
    row["status"] = "ok" + (f" ({'; '.join(notes)})" if notes else "")
    return row


def part_fsdp2(rec: Recorder, s: dict, dry: bool, out: Path, accelerator: str = "cuda") -> None:
    """tests/dist_child.py's single-process and 2-rank FSDP2 runs, on CUDA (NCCL) instead of CPU (gloo)."""
    import socket

    from mogao.data import train_tokenizer
    from mogao.data.shapes_mini import caption_corpus
    from mogao.model.tiny import save_tiny_llm, save_tiny_vae, save_tiny_vit

    root = Path(tempfile.mkdtemp(prefix="fsdp2_", dir=out / "parts"))
    tok = train_tokenizer(caption_corpus(), vocab_size=300)
    tok.save_pretrained(root / "tokenizer")
    base = {"tokenizer": str(root / "tokenizer"), "steps": s["steps"], "save_at": -1, "unfreeze_at": 2,
            "resume": None, "llm": str(save_tiny_llm(root / "llm", vocab_size=len(tok), hidden_size=64, layers=2)),
            "vit": str(save_tiny_vit(root / "vit", hidden_size=32, patch_size=4)), "vae": str(save_tiny_vae(root / "vae"))}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for name, n in (("single", 1), ("fsdp2", 2)):
        spec = {**base, "out": str(root / name), "strategy": "fsdp2" if n == 2 else "single", "devices": n,
                "broadcast_from_rank0": True}
        (root / f"{name}.json").write_text(json.dumps(spec))
        for rank in range(n):
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            if n > 1:
                env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n), NODE_RANK="0",
                           LOCAL_RANK=str(rank))
            log = open(root / f"{name}.rank{rank}.log", "w")
            procs.append((name, rank, subprocess.Popen(
                [sys.executable, str(BENCH / "gpu_check.py"), "--fsdp-child", str(root / f"{name}.json"), "--accelerator", accelerator],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)))
    for name, rank, p in procs:
        try:
            code = p.wait(timeout=max(1.0, rec.time_left()))
        except subprocess.TimeoutExpired:
            for *_, q in procs:
                q.kill()
            code = "timeout"
        if code != 0:
            log = (root / f"{name}.rank{rank}.log").read_text()[-1500:]
            raise RuntimeError(f"{name} rank {rank} exited with {code}: {log}")

    def losses(name: str, world: int) -> dict[int, float]:
        per = [json.loads((root / name / f"losses.rank{r}.json").read_text()) for r in range(world)]
        return {int(k): sum(d[k] for d in per) / world for k in per[0]}

    single, sharded = losses("single", 1), losses("fsdp2", 2)
    for step in sorted(single):
        diff = abs(sharded[step] - single[step])
        rec.add({"step": step, "single": single[step], "sharded": sharded[step], "diff": diff,
                 "within": "yes" if diff <= 1e-5 else "NO", "status": "ok" if diff <= 1e-5 else "failed: differs"})


def fsdp_child(spec: str, accelerator: str) -> None:
    """One process of tests/dist_child.py with the Trainer on `accelerator` (the test itself runs on CPU)."""
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lightning.pytorch as pl
    import torch

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    import dist_child

    class Trainer(pl.Trainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "accelerator": accelerator})

    pl.Trainer = Trainer
    dist_child.main(spec)


# pytest plugin (`-p gpu_check_parts`): one JSON line per test as it finishes, so a part killed at its budget keeps
# every result it had; active only when GPU_CHECK_EVENTS names the file.
def _event(obj: dict) -> None:
    path = os.environ.get("GPU_CHECK_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")


def pytest_collection_finish(session) -> None:
    _event({"collected": [item.nodeid for item in session.items]})


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or (report.outcome != "passed" and report.when in ("setup", "teardown")):
        if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
            message = report.longrepr[2]
        else:  # a failure: the first "E ..." line (the assertion or exception) and where it was raised
            lines = report.longreprtext.strip().splitlines()
            errors = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
            message = " / ".join(errors[:2] + lines[-1:]) if lines else ""
        outcome = "error" if report.failed and report.when != "call" else report.outcome  # pytest's naming
        _event({"nodeid": report.nodeid, "outcome": outcome, "duration": report.duration,
                "message": message[:400]})
