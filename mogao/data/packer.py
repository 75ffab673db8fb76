"""Packing: whole samples into a fixed token budget -> `PackedBatch`, and the resumable `PackedDataset`.

Samples are never split and images never padded: a pack holds as many whole lowered samples as fit in the
budget, so the only waste is the unused tail of the budget (`PackedBatch.padding_fraction`, no padding tokens
are materialised). The greedy packer looks a few samples ahead to fill each pack.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from mogao.attention.layout import TokenLayout
from mogao.data.batch import PackedBatch
from mogao.data.plan import DataConfig, SequencePlan, lower_sample, stable_seed
from mogao.data.samples import Sample
from mogao.data.tokenizer import SpecialTokens
from mogao.errors import ConfigError
from mogao.modality import Modality

log = logging.getLogger(__name__)


def collate_plans(plans: Sequence[SequencePlan], budget: int) -> PackedBatch:
    """Lay out lowered samples (in pack order) as one `PackedBatch`, every field in physical order."""
    if not plans:
        raise ValueError("cannot pack zero samples")
    total = sum(p.num_tokens for p in plans)
    if total > budget:
        raise ValueError(f"{total} tokens do not fit the token budget {budget}")
    layout = TokenLayout.from_spans([p.layout_spans() for p in plans])
    phys = layout.logical_index  # logical-concatenated position -> physical position
    n = layout.num_tokens
    input_ids = torch.empty(n, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    position_ids = torch.empty(3, n, dtype=torch.long)
    input_ids[phys] = torch.cat([p.input_ids for p in plans])
    labels[phys] = torch.cat([p.labels for p in plans])
    position_ids[:, phys] = torch.cat([p.position_ids for p in plans], dim=1)

    index: dict[Modality, list[torch.Tensor]] = {Modality.VIT: [], Modality.VAE_CLEAN: [], Modality.VAE_NOISY: []}
    vit_pixels, vae_pixels, grids, is_target, seeds, weights = [], [], [], [], [], []
    offset = 0
    for p in plans:
        for img, starts in zip(p.images, p.copy_start):
            gh, gw = img.grid
            for kind, start in starts.items():
                index[kind].append(phys[offset + start: offset + start + gh * gw])
            vit_pixels.append(img.tensors.vit)
            vae_pixels.append(img.tensors.vae)
            grids.append((gh, gw))
            is_target.append(img.is_target)
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


@dataclass
class PackingStats:
    """Running totals of the packs produced by this process (per worker under a DataLoader)."""

    batches: int = 0
    samples: int = 0
    tokens: int = 0
    budget_tokens: int = 0
    skipped: int = 0

    @property
    def padding_fraction(self) -> float:
        """Share of all budgeted tokens left unused so far."""
        return 0.0 if self.budget_tokens == 0 else 1.0 - self.tokens / self.budget_tokens

    def update(self, batch: PackedBatch) -> None:
        self.batches += 1
        self.samples += len(batch.sample_ids)
        self.tokens += batch.num_tokens
        self.budget_tokens += batch.budget


class PackedDataset(IterableDataset):
    """Packed batches over a sample source; use with `DataLoader(dataset, batch_size=None)`.

    Each epoch the source order is shuffled from (seed, epoch) - call `set_epoch` - and split into shards,
    one per (rank, DataLoader worker): shard = rank * num_workers + worker. `state_dict()` records the exact
    position after the last yielded batch (epoch, samples read, samples read but not yet packed);
    `load_state_dict()` makes the next iteration continue from there and yield exactly the remaining batches.
    The state is per process: with `num_workers > 0` use a loader that snapshots each worker's dataset state
    (torchdata's `StatefulDataLoader` calls these two methods in every worker).
    """

    def __init__(self, source: Sequence[Sample], tokenizer: PreTrainedTokenizerBase, config: DataConfig, *,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
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

    def shard_indices(self, epoch: int) -> list[int]:
        """This process's source indices for `epoch`, in reading order."""
        order = list(range(len(self.source)))
        if self.shuffle:
            random.Random(stable_seed("shuffle", self.config.seed, epoch)).shuffle(order)
        shard, shards = self._shard()
        return order[shard::shards]

    def _lower(self, index: int) -> SequencePlan | None:
        return lower_sample(self.source[index], self.tokenizer, self.config, epoch=self.epoch,
                            special=self.special, index=index)

    def __iter__(self) -> Iterator[PackedBatch]:
        indices = self.shard_indices(self.epoch)
        shard = self._shard()
        resume, self._resume = self._resume, None
        state = {"epoch": self.epoch, "read": 0, "buffer": [], "shard": list(shard), "num_samples": len(self.source)}
        packer = GreedyPacker(self.config.token_budget, self.config.lookahead)
        if resume is not None and resume["epoch"] == self.epoch:
            saved = (list(resume.get("shard", shard)), resume.get("num_samples", len(self.source)))
            if saved != (list(shard), len(self.source)):
                raise ConfigError(f"cannot resume: the saved data state is for shard {resume.get('shard')} of "
                                  f"{resume.get('num_samples')} samples, this process reads shard {list(shard)} of "
                                  f"{len(self.source)}; resume with the same world size, workers and data")
            state["read"] = resume["read"]
            packer.buffer = [p for p in map(self._lower, resume["buffer"]) if p is not None]
        self._state = state

        def read() -> Iterator[SequencePlan]:
            while state["read"] < len(indices):
                index = indices[state["read"]]
                state["read"] += 1
                plan = self._lower(index)
                if plan is None:
                    self.stats.skipped += 1
                else:
                    yield plan

        for group in packer.packs(read()):
            batch = collate_plans(group, self.config.token_budget)
            self.stats.update(batch)
            # read-but-unpacked samples are re-lowered on resume (lowering is deterministic)
            state["buffer"] = [p.index for p in packer.buffer]
            yield batch
        state["buffer"] = []

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch yielded (a plain dict of ints and lists: checkpoint-friendly)."""
        state = self._resume or self._state
        if state is None or state["epoch"] != self.epoch:
            return {"epoch": self.epoch, "read": 0, "buffer": []}
        return {k: list(v) if isinstance(v, list) else v for k, v in state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state`: sets the epoch; the next iteration continues where the state was taken."""
        self.epoch = int(state["epoch"])
        self._resume = {k: list(v) if isinstance(v, list) else v for k, v in state.items()}
