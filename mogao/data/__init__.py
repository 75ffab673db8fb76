"""Data: the sample format, images, tokenizer, lowering to sequence plans and packing into `PackedBatch`."""

from mogao.data.images import ImageTensors, choose_grid, open_image, prepare_image, resize_to_grid, to_rgb
from mogao.data.packer import GreedyPacker, PackedDataset, PackingStats, collate_plans, pack_plans
from mogao.data.plan import (
    IGNORE_INDEX,
    DataConfig,
    PlanImage,
    PlanSpan,
    SequencePlan,
    chat_marker_ids,
    lower_sample,
    stable_seed,
)
from mogao.data.samples import (
    ImageSegment,
    Sample,
    TextSegment,
    check_samples,
    iter_samples,
    load_samples,
    sample_from_dict,
    samples_from_dicts,
)
from mogao.data.tokenizer import SpecialTokens, ensure_special_tokens, train_tokenizer

__all__ = [
    "IGNORE_INDEX", "DataConfig", "GreedyPacker", "ImageSegment", "ImageTensors", "PackedDataset",
    "PackingStats", "PlanImage", "PlanSpan", "Sample", "SequencePlan", "SpecialTokens", "TextSegment",
    "chat_marker_ids", "check_samples", "choose_grid", "collate_plans", "ensure_special_tokens", "iter_samples", "load_samples",
    "lower_sample", "open_image", "pack_plans", "prepare_image", "resize_to_grid", "sample_from_dict",
    "samples_from_dicts", "stable_seed", "to_rgb", "train_tokenizer",
]
