"""`MogaoDataModule`: named data sources (built-in generators or JSONL files), mixed by weight into one
endless stream of packed batches, with an exact, checkpointed position.

The training stream picks the source of batch b from (seed, b) and the mixture weights in force at b, then takes
that source's next packed batch (each source is a `PackedDataset`: shuffled per epoch, sharded by rank and
worker, cycling epochs forever). Every batch carries the stream position right after it (`data_state`); the
training module hands the position of each batch it trained on back to the data module, and that is what a
checkpoint stores - not the position of a batch the loader already prefetched. Resuming therefore continues
with the exact next batch: no sample skipped or repeated.

Bad samples met while iterating are skipped and counted by each source's `PackedDataset`; the counts travel
with the position inside `data_state` (also from DataLoader workers to the training process), are
checkpointed with it and continue on resume. `MogaoDataModule.fault_report()` sums them per source, and
`data_faults.json` in the run directory is written at the end of fit and when a run stops with an error.
"""

from __future__ import annotations

import bisect
import copy
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mogao.data import DataConfig, PackedDataset, load_samples, samples_from_dicts, stable_seed
from mogao.data.packer import MAX_LISTED_FAULTS
from mogao.data.prepared import PreparedSamples, decoded, is_prepared, read_manifest
from mogao.data.samples import Sample
from mogao.errors import ConfigError, DataError
from mogao.sequence import PackedBatch
from mogao.training.faults import rank_report_path, write_rank_report

log = logging.getLogger(__name__)


@dataclass
class Source:
    """One named data source of a mixture."""

    name: str
    """Name used in logs (`val/<name>/...`) and in mixture schedules."""
    builtin: str | None = None
    """A built-in generated task (see `mogao.data.builtin.TASKS`), or None for a JSONL file or prepared folder."""
    path: str | None = None
    """JSONL file of samples (image paths relative to the file), or a folder made by `mogao data prepare`
    (read lazily from memory-mapped shards: for large data sets), or None for a built-in task."""
    weight: float = 1.0
    """Share of training batches drawn from this source (weights are normalised over sources)."""
    n: int = 1000
    """Built-in: number of training samples generated."""
    val_n: int = 0
    """Built-in: number of validation samples (held-out split); 0 = no validation for this source."""
    val_path: str | None = None
    """JSONL file or prepared folder of validation samples for this source."""
    seed: int = 0
    """Built-in: generator seed."""
    options: dict[str, Any] = field(default_factory=dict)
    """Built-in: generator options (e.g. max_objects, image_size)."""

    def __post_init__(self) -> None:
        if (self.builtin is None) == (self.path is None):
            raise ConfigError(f"data source '{self.name}': give exactly one of 'builtin' (a task) or 'path' (a JSONL "
                              "file or a prepared folder)")
        if self.weight < 0:
            raise ConfigError(f"data source '{self.name}': weight must be >= 0, got {self.weight}")

    def check_files(self) -> None:
        """Raise `ConfigError` naming a file of this source that does not exist. Called when the data module is
        set up, not when the recipe is parsed: a recipe's placeholder paths may be replaced on the command line
        (`--data.path`, `--data.sources`) after its list was instantiated."""
        for p in (self.path, self.val_path):
            if p is None:
                continue
            where = Path(p).expanduser()
            if where.is_dir():
                if not is_prepared(where):
                    try:
                        read_manifest(where)
                    except DataError as e:
                        raise ConfigError(f"data source '{self.name}': '{p}' is a folder but {e.message}") from None
            elif not where.is_file():
                raise ConfigError(f"data source '{self.name}': file not found: '{p}'")

    def load(self, split: str) -> Sequence[Sample]:
        """The split's samples. A prepared folder gives a lazy sequence (rows read when indexed; its images were
        fully checked by `mogao data prepare`); a JSONL file is read whole and validated line by line, its
        images only when lowered (a bad one is then skipped and counted), so start-up does not open them."""
        if self.builtin is not None:
            from mogao.data.builtin import make_builtin

            n = self.n if split == "train" else self.val_n
            if n <= 0:
                return []
            made = make_builtin(self.builtin, split=split, n=n, seed=self.seed, **self.options)
            return samples_from_dicts(made.samples, name=f"builtin:{self.builtin}:{split}")
        path = self.path if split == "train" else self.val_path
        if path is None:
            return []
        where = Path(path).expanduser()
        if where.is_dir():
            return PreparedSamples(where)
        return load_samples(where, check_images=False)


def _at(schedule: list[tuple[int, Any]], step: int, default: Any) -> Any:
    """Value of a piecewise-constant schedule [(start_step, value), ...] (sorted) at `step`."""
    i = bisect.bisect_right([s for s, _ in schedule], step) - 1
    return default if i < 0 else schedule[i][1]


class MixtureStream(IterableDataset):
    """Endless packed batches from several `PackedDataset`s; see the module docstring.

    With DataLoader workers, worker w of W produces batches b = w, w + W, ... (the loader returns them in that
    order), so the source of each batch stays a function of b alone.
    """

    def __init__(self, datasets: dict[str, PackedDataset], weights: dict[str, float], seed: int = 0,
                 mixture_schedule: list[tuple[int, dict[str, float]]] | None = None,
                 resolution_schedule: list[tuple[int, int]] | None = None) -> None:
        self.datasets, self.weights, self.seed = datasets, weights, seed
        self.mixture_schedule = mixture_schedule or []
        self.resolution_schedule = resolution_schedule or []
        self.base_configs = {k: ds.config for k, ds in datasets.items()}
        self.names = list(datasets)
        self._resume: dict[int, dict[str, Any]] = {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """`state`: {"workers": {worker id: {"batch": b, "sources": {name: PackedDataset state},
        "faults": {name: PackingStats.fault_state()}}}}."""
        workers = state.get("workers", {})
        self._resume = {int(k): copy.deepcopy(v) for k, v in workers.items()}

    def weights_at(self, batch: int) -> list[float]:
        w = _at(self.mixture_schedule, batch, self.weights)
        unknown = set(w) - set(self.names)
        if unknown:
            raise ConfigError(f"mixture schedule names unknown source(s) {sorted(unknown)}; sources: {self.names}")
        out = [float(w.get(n, 0.0)) for n in self.names]
        if sum(out) <= 0:
            raise ConfigError(f"mixture weights at batch {batch} are all zero: {w}")
        return out

    def source_of(self, batch: int) -> str:
        return random.Random(stable_seed("mixture", self.seed, batch)).choices(self.names, self.weights_at(batch))[0]

    def _apply_resolution(self, batch: int) -> None:
        tokens = _at(self.resolution_schedule, batch, None)
        for k, ds in self.datasets.items():
            want = self.base_configs[k] if tokens is None else replace(self.base_configs[k], max_image_tokens=tokens)
            if ds.config != want:
                ds.config = want

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        # Batch b is always made by "role" b % workers (its shard and position). After a resume the next batch
        # may belong to any role, while the loader always asks worker 0 first: worker w takes the role of
        # batch g + w, where g is the first batch not yet trained on.
        g = min((int(self._resume[r]["batch"]) if r in self._resume else r for r in range(workers)), default=0)
        g = g if self._resume else 0
        if self._resume and any(int(s["batch"]) % workers != r for r, s in self._resume.items()):
            raise ConfigError("cannot resume: the saved data position was taken with another number of "
                              "DataLoader workers; resume with the same data.num_workers")
        b = g + worker
        role = b % workers
        resume = self._resume.get(role)
        for ds in self.datasets.values():
            ds.worker_role = role
        if resume is not None:
            if int(resume["batch"]) != b:
                raise ConfigError(f"cannot resume: inconsistent saved data position for worker {role}")
            for k, st in resume["sources"].items():
                if k not in self.datasets:
                    raise ConfigError(f"cannot resume: the saved data position has source '{k}', not configured now")
                self.datasets[k].load_state_dict(st)
            for k, faults in resume.get("faults", {}).items():
                if k in self.datasets:
                    self.datasets[k].stats.load_fault_state(faults)
        iters: dict[str, Iterator[PackedBatch]] = {}
        while True:
            self._apply_resolution(b)
            name = self.source_of(b)
            ds = self.datasets[name]
            batch = None
            for _ in range(2):  # an exhausted epoch starts the next one
                it = iters.get(name)
                if it is None:
                    it = iters[name] = iter(ds)
                batch = next(it, None)
                if batch is not None:
                    break
                iters.pop(name)
                ds.set_epoch(ds.epoch + 1)
            if batch is None:
                raise ConfigError(f"data source '{name}' yields no batches for this process (too few samples for "
                                  "the number of ranks and workers?)")
            b += workers
            batch.data_state = {"worker": role, "batch": b, "source": name,
                                "sources": {k: d.state_dict() for k, d in self.datasets.items()},
                                "faults": {k: d.stats.fault_state() for k, d in self.datasets.items()}}
            yield batch


class MogaoDataModule(pl.LightningDataModule):
    """Training and validation data of a stage.

    Args:
        tokenizer: directory of the (fast) tokenizer; the same one the model was built with.
        sources: the named sources of the mixture.
        path: a user's own JSONL file or prepared folder (`mogao data prepare`): shorthand for one source
            `{name: <file stem>, path: PATH}` that replaces `sources` (so `--data.path=mine.data` works on any
            recipe).
        val_path: with `path`, the JSONL file or prepared folder of its validation samples.
        data: packing and lowering (token budget, image sizes, condition dropout, seed). The ViT/VAE patch sizes
            are taken from the model when one is attached.
        num_workers: DataLoader worker processes (0 = in the training process).
        val_budget: token budget of validation packs (default: data.token_budget).
        worker_timeout: with workers, seconds to wait for one batch before the run stops with an error (a hung
            worker - e.g. reading from a stalled network file system - must not hang the run; 0: no limit).
            A worker that dies is detected by the DataLoader within seconds either way.
    """

    def __init__(self, tokenizer: str, sources: list[Source] | None = None, data: DataConfig | None = None,
                 num_workers: int = 0, val_budget: int | None = None, worker_timeout: float = 600.0,
                 path: str | None = None, val_path: str | None = None) -> None:
        super().__init__()
        self.single_path = path is not None
        if path is not None:
            sources = [Source(name=Path(path).stem or "data", path=path, val_path=val_path)]
        elif val_path is not None:
            raise ConfigError("data.val_path needs data.path (or give val_path inside a data.sources entry)")
        if not sources:
            raise ConfigError("data.sources is empty: give at least one built-in task or JSONL file "
                              "(or --data.path=FILE.jsonl)")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: duplicate names {names}")
        for s in sources:  # the sources that will be read, after any command-line override
            s.check_files()
        self.tokenizer_path = tokenizer
        self.sources = sources
        self.data = data or DataConfig()
        if num_workers < 0 or worker_timeout < 0:
            raise ConfigError(f"data.num_workers and data.worker_timeout must be >= 0, got {num_workers} and "
                              f"{worker_timeout}")
        self.num_workers = num_workers
        self.val_budget = val_budget
        self.worker_timeout = worker_timeout
        self.mixture_schedule: list[tuple[int, dict[str, float]]] = []
        self.resolution_schedule: list[tuple[int, int]] = []
        self.tokenizer = None
        self._train: MixtureStream | None = None
        self._val: list[tuple[str, list[PackedBatch]]] | None = None
        self._consumed: dict[int, dict[str, Any]] = {}
        self._loaded: dict[str, Any] | None = None
        self._val_faults: dict[str, dict[str, Any]] = {}

    # ---- schedules (set by the curriculum-schedule callback before the loaders are built) ----------------
    def set_schedules(self, mixture: list[tuple[int, dict[str, float]]] | None = None,
                      resolution: list[tuple[int, int]] | None = None, accumulate: int = 1) -> None:
        """Piecewise-constant schedules keyed by optimizer step (converted to batch index here). With
        `data.path` (one file in place of the recipe's sources) a mixture schedule has nothing to mix."""
        if mixture and self.single_path:
            log.info("data.path replaces the recipe's sources: its mixture schedule is not used")
            mixture = None
        self.mixture_schedule = sorted((s * accumulate, w) for s, w in (mixture or []))
        self.resolution_schedule = sorted((s * accumulate, t) for s, t in (resolution or []))

    # ---- setup ----------------------------------------------------------------------------------------
    def connect(self, model: Any) -> None:
        """Lower the data on the token geometry and sequence options of `model` (a `MogaoModel`: its ViT and
        latent patch sizes, whether text reads clean VAE copies, its position scheme and sequence format;
        `DataConfig.for_model`). The CLI calls it before setup; without it `data` is used as given."""
        self.data = self.data.for_model(model)

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def setup(self, stage: str) -> None:
        from transformers import AutoTokenizer

        if self.tokenizer is None:
            from mogao.model.mogao import resolve_checkpoint

            self.tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(self.tokenizer_path, "tokenizer"),
                                                           trust_remote_code=False)
        cfg = self.data
        rank, world = self._rank()
        if stage == "fit" and self._train is None:
            datasets = {s.name: PackedDataset(s.load("train"), self.tokenizer, cfg, rank=rank,
                                              world_size=world, name=s.name)
                        for s in self.sources}
            weights = {s.name: s.weight for s in self.sources}
            self._train = MixtureStream(datasets, weights, seed=cfg.seed, mixture_schedule=self.mixture_schedule,
                                        resolution_schedule=self.resolution_schedule)
            if self._loaded is not None:
                self._train.load_state_dict(self._loaded)
        if stage in ("fit", "validate") and self._val is None:
            vcfg = replace(cfg, p_drop_text=0.0, p_drop_images=0.0, token_budget=self.val_budget or cfg.token_budget)
            self._val = []
            for s in self.sources:
                samples = s.load("validation")
                if samples:
                    ds = PackedDataset(samples, self.tokenizer, vcfg, rank=rank, world_size=world,
                                       shuffle=False, name=f"{s.name} (validation)")
                    self._val.append((s.name, list(ds)))
                    self._val_faults[s.name] = ds.stats.fault_state()

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None, "setup('fit') first"
        self._train.mixture_schedule = self.mixture_schedule
        self._train.resolution_schedule = self.resolution_schedule
        workers = self.num_workers > 0
        return DataLoader(self._train, batch_size=None, collate_fn=_identity, num_workers=self.num_workers,
                          persistent_workers=workers, timeout=self.worker_timeout if workers else 0)

    @property
    def val_names(self) -> list[str]:
        return [name for name, _ in (self._val or [])]

    def val_samples(self, name: str) -> list[Sample]:
        src = next(s for s in self.sources if s.name == name)
        # (the images of a prepared set as PIL images; one that cannot be decoded leaves its sample out)
        return [d for d in map(decoded, src.load("validation")) if d is not None]

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(batches, batch_size=None, collate_fn=_identity) for _, batches in (self._val or [])]

    # ---- position ------------------------------------------------------------------------------------
    def consumed(self, batch: PackedBatch) -> None:
        """Record that `batch` is trained on (`DataPosition`, as its step starts)."""
        if batch.data_state is not None:
            self._consumed[int(batch.data_state["worker"])] = batch.data_state

    def state_dict(self) -> dict[str, Any]:
        """This rank's data position; with several ranks also every rank's ("ranks"), gathered here: a
        whole-file checkpoint is written by the first rank alone, and each rank resumes from its own position -
        or, on another number of ranks, from all of them re-split (`resplit_position`). (Lightning builds the
        checkpoint on every rank, so the gather is reached by all.)"""
        state: dict[str, Any] = {"workers": copy.deepcopy(self._consumed)}
        rank, world = self._rank()
        if world > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, state["workers"])
                state["ranks"] = {str(r): {"workers": w} for r, w in enumerate(gathered)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = self._rank()
        ranks = state.get("ranks") or {"0": {"workers": state.get("workers", {})}}
        if len(ranks) == world and str(rank) in ranks:
            state = ranks[str(rank)]
        else:  # saved by another number of ranks: what they had left is dealt out to this run's ranks
            state = resplit_position(ranks, rank, world, max(1, self.num_workers))
        self._consumed = {int(k): v for k, v in state.get("workers", {}).items()}
        self._loaded = state
        if self._train is not None:
            self._train.load_state_dict(state)

    # ---- bad data -------------------------------------------------------------------------------------
    def _train_fault_states(self, live: bool) -> list[dict[str, dict[str, Any]]]:
        """Per worker: {source: fault counters}. As of the last batch trained on; with `live` and no workers,
        as of the last sample read (which includes a batch that failed before it could be trained on)."""
        if live and self.num_workers == 0 and self._train is not None:
            return [{k: ds.stats.fault_state() for k, ds in self._train.datasets.items()}]
        return [dict(state.get("faults", {})) for _, state in sorted(self._consumed.items())]

    def bad_sample_count(self) -> int:
        """Bad training samples skipped so far (all sources and workers, as of the last batch trained on)."""
        workers = self._train_fault_states(live=False)
        return sum(int(f.get("bad", 0)) for worker in workers for f in worker.values())

    def fault_report(self, live: bool = False) -> dict[str, Any]:
        """Bad and skipped samples of this process, per source:

            {"train": {"read", "bad", "skipped", "sources": {name: {"read", "bad", "skipped",
                       "bad_samples": [{"id", "file", "line", "reason", "epoch"}, ...]}}},
             "validation": {name: {...}}}

        Training counts are as of the last batch trained on (with `live`, see `write_fault_report`) and sum
        over DataLoader workers; `bad_samples` lists the first few different bad samples per source (counts
        are complete).
        """

        def merge(states: list[dict[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {"read": 0, "bad": 0, "skipped": 0, "bad_samples": []}
            for f in states:
                for key in ("read", "bad", "skipped"):
                    out[key] += int(f.get(key, 0))
                out["bad_samples"] += [r for r in f.get("bad_reasons", [])
                                       if all(r["id"] != seen["id"] for seen in out["bad_samples"])]
            out["bad_samples"] = copy.deepcopy(out["bad_samples"][:MAX_LISTED_FAULTS])
            return out

        workers = self._train_fault_states(live)
        names = [s.name for s in self.sources]
        train = {n: merge([w[n] for w in workers if n in w]) for n in names}
        totals = {key: sum(src[key] for src in train.values()) for key in ("read", "bad", "skipped")}
        return {"train": {**totals, "sources": train},
                "validation": {n: merge([f]) for n, f in self._val_faults.items()}}

    def write_fault_report(self, path: str | Path, error: BaseException | None = None) -> Path:
        """Write `fault_report()` as JSON; after an `error` (recorded as "stopped_by") the counts include what
        was read after the last batch trained on, where that is known (no workers)."""
        report = self.fault_report(live=error is not None)
        if error is not None:
            report["stopped_by"] = f"{type(error).__name__}: {error}"
        return write_rank_report(Path(path), report)

    def _fault_report_path(self) -> Path | None:
        return None if self.trainer is None else rank_report_path(self.trainer, "data_faults")

    def teardown(self, stage: str) -> None:
        if stage != "fit" or self._train is None or (path := self._fault_report_path()) is None:
            return
        try:
            self.write_fault_report(path)
        except OSError as e:  # a report that cannot be written must not fail a finished run
            log.warning("could not write %s: %s", path, e)
        report = self.fault_report()["train"]
        if report["bad"]:
            log.warning("%d of %d training samples read were bad and skipped; see %s", report["bad"],
                        report["read"], path)

    def on_exception(self, exception: BaseException) -> None:
        if self._train is None or (path := self._fault_report_path()) is None:
            return
        try:
            self.write_fault_report(path, error=exception)
        except OSError as e:  # the run is already failing: report, do not mask its error
            log.warning("could not write %s: %s", path, e)


def _get(mapping: dict[Any, Any], key: int) -> Any:
    return mapping.get(key, mapping.get(str(key)))


def resplit_position(ranks: dict[str, Any], rank: int, world: int, workers: int) -> dict[str, Any]:
    """The data position of `rank` of `world` resuming a run saved with `len(ranks)` ranks.

    Every source's saved shards (one per old rank and worker) had a position in their reading order; what
    each had still to read - its read-but-unpacked samples, the rest of its epoch, and its share of any later
    epoch another shard had already reached - is concatenated in old-shard order and dealt out to the new
    shards (`PackedDataset`'s re-split pass, which keeps each sample's epoch); the next epoch then starts with
    the new sharding. So no sample is skipped or read twice. The mixture continues at the same batch index
    (the source of batch b depends on b alone); the fault counts move to the first rank.
    """
    old = len(ranks)
    states = {r: {int(k): v for k, v in (_get(ranks, r) or {}).get("workers", {}).items()} for r in range(old)}
    shard_counts = {int(ds["shard"][1]) for st in states.values() for ws in st.values()
                    for ds in ws.get("sources", {}).values() if "shard" in ds}
    if not shard_counts:
        return {"workers": {}}  # nothing was trained on yet
    if shard_counts != {old * workers}:
        raise ConfigError(f"cannot resume: the saved data position was taken with {sorted(shard_counts)[0] // old} "
                          f"DataLoader worker(s) per rank, this run has {workers}; resume with the same "
                          "data.num_workers (the number of ranks may change)")
    names = sorted({n for st in states.values() for ws in st.values() for n in ws.get("sources", {})})
    fresh = {"epoch": 0, "read": 0, "buffer": []}

    def position(s: int, name: str) -> dict[str, Any]:
        """Old shard s (= old rank * workers + worker role): its saved position in source `name`."""
        st = states[s // workers].get(s % workers) or {}
        return copy.deepcopy(st.get("sources", {}).get(name) or fresh)

    result: dict[int, dict[str, Any]] = {}
    for role in range(workers):
        saved = [states[r].get(role) for r in range(old)]
        sources = {}
        for name in names:
            every = [position(s, name) for s in range(old * workers)]
            sources[name] = {"epoch": max(int(p["epoch"]) for p in every), "read": 0, "buffer": [],
                             "shard": [rank * workers + role, world * workers],
                             "carry": {"shards": old * workers, "positions": every}}
            num = next((p["num_samples"] for p in every if "num_samples" in p), None)
            if num is not None:
                sources[name]["num_samples"] = num
        # (batch b + workers after batch b: a role that never made a batch is at its first, b = role)
        entry: dict[str, Any] = {"worker": role, "sources": sources,
                                 "batch": next((int(st["batch"]) for st in saved if st is not None), role)}
        if rank == 0:
            entry["faults"] = {name: _merge_faults([(st or {}).get("faults", {}).get(name, {}) for st in saved])
                               for name in names}
        result[role] = entry
    return {"workers": result}


def _merge_faults(states: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"read": 0, "bad": 0, "skipped": 0, "bad_reasons": []}
    for f in states:
        for key in ("read", "bad", "skipped"):
            out[key] += int(f.get(key, 0))
        out["bad_reasons"] += [dict(r) for r in f.get("bad_reasons", [])
                               if all(r["id"] != seen["id"] for seen in out["bad_reasons"])]
    out["bad_reasons"] = out["bad_reasons"][:MAX_LISTED_FAULTS]
    return out


def _identity(x):
    return x


class DataPosition(pl.Callback):
    """Records each training batch in the data module's position as its step starts (a checkpoint written at the
    end of the step then resumes after it). Added by the stage module (`configure_callbacks`), so it runs after
    the run's other callbacks: a step that one of them stops before it starts is not counted as trained."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        dm = getattr(trainer, "datamodule", None)
        if hasattr(dm, "consumed"):
            dm.consumed(batch)
