"""Packing: whole samples into a fixed token budget -> `PackedBatch`, and the resumable `PackedDataset`.

Samples are never split and images never padded: a pack holds as many whole lowered samples as fit in the
budget, so the only waste is the unused tail of the budget (`PackedBatch.padding_fraction`, no padding tokens
are materialised). The greedy packer looks a few samples ahead to fill each pack.

Bad data found while iterating (an image that no longer decodes, a file deleted after validation, a sample
over the budget with `too_long='error'`) is skipped, logged and counted in `PackingStats`. Lowering is
deterministic, so a resumed iteration skips the same samples; saving `stats.fault_state()` with the position
continues the counts too. Past `DataConfig.max_bad_fraction` (after `bad_sample_grace` bad samples) the
iteration stops with a `DataError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from mogao.data.plan import DataConfig, SequencePlan, lower_sample, stable_seed
from mogao.data.samples import Sample
from mogao.data.tokenizer import SpecialTokens
from mogao.errors import ConfigError, DataError, printable
from mogao.sequence.batch import PackedBatch
from mogao.sequence.layout import TokenLayout
from mogao.sequence.modality import Modality

log = logging.getLogger(__name__)


def collate_plans(plans: Sequence[SequencePlan], budget: int) -> PackedBatch:
    """Lay out lowered samples (in pack order) as one `PackedBatch`, every field in physical order."""
    if not plans:
        raise ValueError("cannot pack zero samples")
    total = sum(p.num_tokens for p in plans)
    if total > budget:
        raise ValueError(f"{total} tokens do not fit the token budget {budget}")
    layout = TokenLayout.from_spans([p.layout_spans() for p in plans])
    phys = layout.physical_of_logical  # logical-concatenated position -> physical position
    n = layout.num_tokens
    input_ids = torch.empty(n, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    position_ids = torch.empty(3, n, dtype=torch.long)
    input_ids[phys] = torch.cat([p.input_ids for p in plans])
    labels[phys] = torch.cat([p.labels for p in plans])
    position_ids[:, phys] = torch.cat([p.position_ids for p in plans], dim=1)

    index: dict[Modality, list[torch.Tensor]] = {Modality.VIT: [], Modality.VAE_CLEAN: [], Modality.VAE_NOISY: []}
    vit_pixels, vae_pixels, grids, is_target, has_clean, has_vit, seeds, weights = [], [], [], [], [], [], [], []
    offset = 0
    for p in plans:
        for img, starts in zip(p.images, p.copy_start):
            gh, gw = img.grid
            for kind, start in starts.items():
                index[kind].append(phys[offset + start: offset + start + gh * gw])
            if Modality.VIT in starts:  # (only images with a ViT copy: `PackedBatch.vit_pixels`)
                vit_pixels.append(img.tensors.vit)
            vae_pixels.append(img.tensors.vae)
            grids.append((gh, gw))
            is_target.append(img.is_target)
            has_clean.append(Modality.VAE_CLEAN in starts)
            has_vit.append(Modality.VIT in starts)
            seeds.append(img.seed)
            weights.append(img.loss_weight)
        offset += p.num_tokens

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    return PackedBatch(
        input_ids=input_ids, labels=labels, position_ids=position_ids, layout=layout,
        vit_pixels=vit_pixels, vae_pixels=vae_pixels,
        image_grid=torch.tensor(grids, dtype=torch.long).reshape(-1, 2),
        image_is_target=torch.tensor(is_target, dtype=torch.bool),
        image_has_clean=torch.tensor(has_clean, dtype=torch.bool),
        image_has_vit=torch.tensor(has_vit, dtype=torch.bool),
        image_seed=torch.tensor(seeds, dtype=torch.long),
        image_loss_weight=torch.tensor(weights, dtype=torch.float32),
        vit_index=cat(index[Modality.VIT]), vae_clean_index=cat(index[Modality.VAE_CLEAN]),
        noisy_index=cat(index[Modality.VAE_NOISY]),
        sample_ids=[p.sample_id for p in plans], budget=budget,
    )


class GreedyPacker:
    """Deterministic greedy packing with a lookahead buffer.

    The buffer holds up to `lookahead` lowered samples in arrival order. The open pack takes the first buffered
    sample that still fits (the buffer is refilled after each take); when none fits, the pack is closed.
    At every closed pack the packer's whole state is the buffer, which is what makes exact resume cheap.
    """

    def __init__(self, budget: int, lookahead: int = 8):
        self.budget, self.lookahead = budget, lookahead
        self.buffer: list[SequencePlan] = []

    def packs(self, plans: Iterator[SequencePlan]) -> Iterator[list[SequencePlan]]:
        current: list[SequencePlan] = []
        used = 0
        exhausted = False
        while True:
            while not exhausted and len(self.buffer) < self.lookahead:
                nxt = next(plans, None)
                if nxt is None:
                    exhausted = True
                else:
                    if nxt.num_tokens > self.budget:
                        raise ValueError(f"sample {nxt.sample_id!r} has {nxt.num_tokens} tokens, over the budget "
                                         f"{self.budget}; lower it with data.too_long")
                    self.buffer.append(nxt)
            if not self.buffer:
                break
            pick = next((i for i, p in enumerate(self.buffer) if used + p.num_tokens <= self.budget), None)
            if pick is None:
                yield current
                current, used = [], 0
                continue
            plan = self.buffer.pop(pick)
            current.append(plan)
            used += plan.num_tokens
        if current:
            yield current


def pack_plans(plans: Sequence[SequencePlan], budget: int, lookahead: int = 8) -> list[PackedBatch]:
    """Pack a finite list of lowered samples (convenience for tests, evaluation and tools)."""
    return [collate_plans(group, budget) for group in GreedyPacker(budget, lookahead).packs(iter(plans))]


#: What lowering one sample may raise because of the sample's data (PIL's UnidentifiedImageError is an
#: OSError; `open_image` turns every decoding error into a DataError, in-memory images may still raise these).
SAMPLE_FAULTS: tuple[type[BaseException], ...] = (DataError, OSError, Image.DecompressionBombError)

#: Bad samples listed (id, location, reason) per dataset; the counts are always complete.
MAX_LISTED_FAULTS = 20


@dataclass
class PackingStats:
    """Running totals of the packs produced by this process (per worker under a DataLoader).

    `read`, `bad`, `skipped` and `bad_reasons` count over all epochs; `fault_state()` / `load_fault_state()`
    carry them across a resume (the mixture stream saves them with each batch's position). The pack totals
    (`batches`, `samples`, `tokens`, `budget_tokens`) are per process.
    """

    batches: int = 0
    samples: int = 0
    tokens: int = 0
    budget_tokens: int = 0
    skipped: int = 0
    """Samples dropped on purpose (too_long='skip', or 'truncate' that kept nothing)."""
    read: int = 0
    """Samples read (lowering attempted), bad ones included."""
    bad: int = 0
    """Samples that failed to load or lower and were skipped."""
    bad_reasons: list[dict[str, Any]] = field(default_factory=list)
    """The first MAX_LISTED_FAULTS bad samples, each once: {"id", "file", "line", "reason", "epoch"}."""

    @property
    def padding_fraction(self) -> float:
        """Share of all budgeted tokens left unused so far."""
        return 0.0 if self.budget_tokens == 0 else 1.0 - self.tokens / self.budget_tokens

    def update(self, batch: PackedBatch) -> None:
        self.batches += 1
        self.samples += len(batch.sample_ids)
        self.tokens += batch.num_tokens
        self.budget_tokens += batch.budget

    def record_bad(self, sample: Sample, error: BaseException, epoch: int) -> dict[str, Any]:
        """Count a bad sample; the first MAX_LISTED_FAULTS different ones are listed. Returns its record."""
        if isinstance(error, DataError):
            reason = error.message if error.field is None else f"field '{error.field}': {error.message}"
        else:
            reason = f"{type(error).__name__}: {error}"
        record = {"id": sample.id, "file": sample.file, "line": sample.line, "reason": reason, "epoch": epoch}
        self.bad += 1
        listed = any(r["id"] == sample.id for r in self.bad_reasons)  # (met again in a later epoch)
        if not listed and len(self.bad_reasons) < MAX_LISTED_FAULTS:
            self.bad_reasons.append(record)
        return record

    def fault_state(self) -> dict[str, Any]:
        """The fault counters as plain data (for checkpoints and for `data_state`)."""
        return {"read": self.read, "bad": self.bad, "skipped": self.skipped,
                "bad_reasons": [dict(r) for r in self.bad_reasons]}

    def load_fault_state(self, state: dict[str, Any]) -> None:
        self.read, self.bad = int(state.get("read", 0)), int(state.get("bad", 0))
        self.skipped = int(state.get("skipped", 0))
        self.bad_reasons = [dict(r) for r in state.get("bad_reasons", [])]


def _where(record: dict[str, Any]) -> str:
    return ":".join(str(p) for p in (record.get("file"), record.get("line")) if p is not None) or "<memory>"


def too_many_bad_message(stats: PackingStats, config: DataConfig, name: str | None = None,
                         shown: int = 5) -> str:
    """The error text when bad samples pass the limit: counts, the first reasons, and how to find the rest."""
    share = stats.bad / max(stats.read, 1)
    lines = [f"too many bad samples{f' in data source {name!r}' if name else ''}: {stats.bad} of the "
             f"{stats.read} samples read were bad ({share:.1%}), more than data.max_bad_fraction="
             f"{config.max_bad_fraction} allows after the data.bad_sample_grace={config.bad_sample_grace} "
             "always tolerated. First problems:"]
    lines += [f"  - {r['id']!r} at {_where(r)}: {r['reason']}" for r in stats.bad_reasons[:shown]]
    files = sorted({str(r["file"]) for r in stats.bad_reasons
                    if r.get("file") and Path(str(r["file"])).is_file()})
    check = "; ".join(f"`mogao data check {f}`" for f in files) or "`mogao data check FILE.jsonl`"
    lines.append(f"List every problem with {check}, fix or remove the bad samples (or raise "
                 "data.max_bad_fraction) and run again; a resumed run continues from its last checkpoint.")
    return "\n".join(lines)


class _Indices(Sequence[int]):
    """A read-only view of an index array that gives Python ints (they end up in checkpointed states)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):  # type: ignore[override]
        return self.array[i].tolist()


class PackedDataset(IterableDataset):
    """Packed batches over a sample source; use with `DataLoader(dataset, batch_size=None)`.

    Each epoch the source order is shuffled from (seed, epoch) - call `set_epoch` - and split into shards,
    one per (rank, DataLoader worker): shard = rank * num_workers + worker. `state_dict()` records the exact
    position after the last yielded batch (epoch, samples read, samples read but not yet packed);
    `load_state_dict()` makes the next iteration continue from there and yield exactly the remaining batches.
    The state is per process: with `num_workers > 0` use a loader that snapshots each worker's dataset state
    (torchdata's `StatefulDataLoader` calls these two methods in every worker). A state with a "carry" entry
    (made by `mogao.training.datamodule.resplit_position` when a run resumes on another number of ranks)
    starts with a re-split pass: this shard's share of what every shard of the saved run had still to read,
    each sample lowered with its own epoch; the next epoch is sharded anew.

    A sample that fails to load or lower is skipped: logged as a warning (id, file:line, reason) and counted
    in `stats`. Lowering is deterministic, so a resumed iteration skips the same samples. When more than
    `config.bad_sample_grace` samples are bad and more than `config.max_bad_fraction` of those read, the
    iteration raises `DataError`. `name` names the data source in logs and errors.
    """

    def __init__(self, source: Sequence[Sample], tokenizer: PreTrainedTokenizerBase, config: DataConfig, *,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, name: str | None = None):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        self.name = name
        self.source, self.tokenizer, self.config = source, tokenizer, config
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.epoch = 0
        self.worker_role: int | None = None  # shard as this worker id instead of the real one (see _shard)
        self.stats = PackingStats()
        self._state: dict[str, Any] | None = None  # live position of the current/last iteration
        self._resume: dict[str, Any] | None = None  # loaded position, consumed by the next iteration

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration runs (its order, dropout draws and noise seeds)."""
        if epoch != self.epoch:
            self._resume = None
        self.epoch = epoch

    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if self.worker_role is not None:  # a wrapping stream decides which worker reads which shard
            worker = self.worker_role
        return self.rank * workers + worker, self.world_size * workers

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every source index in the reading order of `epoch` (before sharding): a numpy permutation (8 bytes an
        index, made in milliseconds for millions), not a list of Python ints."""
        n = len(self.source)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng(stable_seed("shuffle", self.config.seed, epoch)).permutation(n)

    def shard_indices(self, epoch: int) -> Sequence[int]:
        """This process's source indices for `epoch`, in reading order: every `shards`-th entry of the epoch's
        order, so start-up time and memory stay small for large prepared sources."""
        shard, shards = self._shard()
        return _Indices(self.epoch_order(epoch)[shard::shards])

    def _remaining(self, position: dict[str, Any], shard: int, shards: int, last_epoch: int,
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, indices) that shard `shard` of `shards` had still to read, from its saved `position`
        through the end of `last_epoch`: its read-but-unpacked samples, the rest of its current pass, then its
        share of each later epoch up to `last_epoch`."""
        epoch, read = int(position["epoch"]), int(position.get("read", 0))
        if "carry" in position:  # (it was itself finishing a re-split pass)
            ep, ix = self._carry_slice(position["carry"], shard, shards, epoch)
            buffer = [(int(ep[k]), int(ix[k])) for k in (position.get("buffer") or [])]  # (positions in it)
        else:
            ix = self.epoch_order(epoch)[shard::shards]
            ep = np.full(len(ix), epoch, dtype=np.int64)
            buffer = [(epoch, int(i)) for i in (position.get("buffer") or [])]
        parts_e = [np.array([e for e, _ in buffer], dtype=np.int64), ep[read:]]
        parts_i = [np.array([i for _, i in buffer], dtype=np.int64), ix[read:]]
        for later in range(epoch + 1, last_epoch + 1):
            more = self.epoch_order(later)[shard::shards]
            parts_e.append(np.full(len(more), later, dtype=np.int64))
            parts_i.append(more)
        return np.concatenate(parts_e), np.concatenate(parts_i)

    def _carry_slice(self, carry: dict[str, Any], shard: int, shards: int, epoch: int,
                     ) -> tuple[np.ndarray, np.ndarray]:
        """This shard's part of a re-split pass: what the `carry["shards"]` shards of the saved run had still
        to read (`carry["positions"]`, one per old shard) through `epoch`, concatenated in old-shard order and
        dealt out to the `shards` new shards."""
        old = int(carry["shards"])
        parts = [self._remaining(pos, s, old, epoch) for s, pos in enumerate(carry["positions"])]
        epochs = np.concatenate([e for e, _ in parts]) if parts else np.zeros(0, dtype=np.int64)
        indices = np.concatenate([i for _, i in parts]) if parts else np.zeros(0, dtype=np.int64)
        return epochs[shard::shards], indices[shard::shards]

    def _lower_or_skip(self, index: int, epoch: int | None = None, position: int | None = None,
                       ) -> SequencePlan | None:
        """Lower sample `index`; None when it is dropped on purpose (too_long) or bad (then counted, logged
        and checked against the limit - which raises `DataError` when passed)."""
        try:
            sample = self.source[index]
        except DataError as e:  # a row of a prepared set that cannot be read (it names its shard and row)
            sample, fault = Sample(f"<unreadable sample {index}>", (), e.file), e
        else:
            try:
                return lower_sample(sample, self.tokenizer, self.config,
                                    epoch=self.epoch if epoch is None else epoch, special=self.special,
                                    index=index if position is None else position)
            except SAMPLE_FAULTS as e:
                fault = e
        record = self.stats.record_bad(sample, fault, self.epoch if epoch is None else epoch)
        # (ids, paths and reasons come from the data: escaped before they reach a terminal)
        log.warning("skipping bad sample %r at %s%s: %s", record["id"], printable(_where(record)),
                    f" (data source {self.name!r})" if self.name else "", printable(record["reason"]))
        stats, cfg = self.stats, self.config
        if stats.bad > cfg.bad_sample_grace and stats.bad > cfg.max_bad_fraction * stats.read:
            raise DataError(too_many_bad_message(stats, cfg, self.name))
        return None

    def __iter__(self) -> Iterator[PackedBatch]:
        shard = self._shard()
        resume, self._resume = self._resume, None
        state: dict[str, Any] = {"epoch": self.epoch, "read": 0, "buffer": [], "shard": list(shard),
                                 "num_samples": len(self.source)}
        carry = resume.get("carry") if resume is not None and resume["epoch"] == self.epoch else None
        if carry is not None:
            # a re-split pass (a resume with another number of ranks): read what the saved run had left, then
            # go on with the next epochs; the buffer holds positions in this pass (they give index and epoch)
            state["carry"] = carry
            epochs, order = self._carry_slice(carry, shard[0], shard[1], self.epoch)
            indices: Sequence[int] = _Indices(order)
        else:
            epochs, indices = None, self.shard_indices(self.epoch)
        packer = GreedyPacker(self.config.token_budget, self.config.lookahead)

        def lower_at(pos: int) -> SequencePlan | None:
            if epochs is None:
                return self._lower_or_skip(indices[pos])
            return self._lower_or_skip(indices[pos], int(epochs[pos]), pos)

        if resume is not None and resume["epoch"] == self.epoch:
            saved = (list(resume.get("shard", shard)), resume.get("num_samples", len(self.source)))
            if saved != (list(shard), len(self.source)):
                raise ConfigError(f"cannot resume: the saved data state is for shard {resume.get('shard')} of "
                                  f"{resume.get('num_samples')} samples, this process reads shard {list(shard)} of "
                                  f"{len(self.source)}; resume with the same world size, workers and data")
            state["read"] = resume["read"]
            # (already counted as read; a sample that went bad since is counted as bad once more)
            if epochs is None:
                buffered = map(self._lower_or_skip, resume["buffer"])
            else:
                buffered = map(lower_at, resume["buffer"])
            packer.buffer = [p for p in buffered if p is not None]
        self._state = state

        def read() -> Iterator[SequencePlan]:
            while state["read"] < len(indices):
                pos = state["read"]
                state["read"] += 1
                self.stats.read += 1
                bad = self.stats.bad
                plan = lower_at(pos)
                if plan is not None:
                    yield plan
                elif self.stats.bad == bad:
                    self.stats.skipped += 1

        for group in packer.packs(read()):
            batch = collate_plans(group, self.config.token_budget)
            self.stats.update(batch)
            # read-but-unpacked samples are re-lowered on resume (lowering is deterministic)
            state["buffer"] = [p.index for p in packer.buffer]
            yield batch
        state["buffer"] = []

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch yielded (a plain dict of ints and lists: checkpoint-friendly). The
        fault counters as of then are `stats.fault_state()`: save them alongside to continue them."""
        state = self._resume or self._state
        if state is None or state["epoch"] != self.epoch:
            return {"epoch": self.epoch, "read": 0, "buffer": []}
        return {k: list(v) if isinstance(v, list) else v for k, v in state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state`: sets the epoch; the next iteration continues where the state was taken."""
        self.epoch = int(state["epoch"])
        self._resume = {k: list(v) if isinstance(v, list) else v for k, v in state.items()}
