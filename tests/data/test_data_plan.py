"""Lowering a sample to a sequence plan: token order, CE labels, IL-RoPE positions, dropout, seeds, length policy."""

from __future__ import annotations

import pytest
import torch
from conftest_data import make_image, small_config, tiny_tokenizer, write_jsonl

from mogao.data import IGNORE_INDEX, SpecialTokens, load_samples, lower_sample, samples_from_dicts
from mogao.errors import ConfigError, DataError
from mogao.sequence.modality import Modality

TXT, VIT, CLEAN, NOISY = Modality.TEXT, Modality.VIT, Modality.VAE_CLEAN, Modality.VAE_NOISY


def _ids(text: str) -> list[int]:
    return tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def _lower(segments, epoch=0, **cfg):
    (sample,) = samples_from_dicts([{"id": "s", "segments": segments}])
    return lower_sample(sample, tiny_tokenizer(), small_config(**cfg), epoch=epoch)


SQUARE, WIDE = make_image(size=(8, 8)), make_image(size=(16, 8), color=(0, 90, 0))
INTERLEAVED = [
    {"text": "draw a cat"},
    {"image": SQUARE, "generate": True},
    {"text": "now make it sleep", "loss": False},
    {"image": WIDE},
    {"text": "the dog"},
]


def test_labels_and_order_token_by_token():
    sp = SpecialTokens.from_tokenizer(tiny_tokenizer())
    plan = _lower(INTERLEAVED, max_image_tokens=4)
    (gh_a, gw_a), (gh_b, gw_b) = plan.images[0].grid, plan.images[1].grid
    a, b = gh_a * gw_a, gh_b * gw_b
    assert (a, b) == (4, 3)  # 2x2 and 1x3
    t1, t2, t3 = _ids("draw a cat"), _ids("now make it sleep"), _ids("the dog")
    # (token id, modality, loss-bearing) in logical order
    seq = (
        [(i, TXT, True) for i in t1]
        + [(sp.vision_start_id, TXT, True)]
        + [(0, NOISY, False)] * a
        + [(0, VIT, False)] * a
        + [(0, CLEAN, False)] * a
        + [(sp.vision_end_id, TXT, False)]
        + [(i, TXT, False) for i in t2]
        + [(sp.vision_start_id, TXT, False)]
        + [(0, VIT, False)] * b
        + [(0, CLEAN, False)] * b
        + [(sp.vision_end_id, TXT, False)]
        + [(i, TXT, True) for i in t3]
        + [(sp.eos_id, TXT, True)]
    )
    assert plan.input_ids.tolist() == [s[0] for s in seq]
    assert plan.modality.tolist() == [int(s[1]) for s in seq]
    expected = [
        nxt[0] if cur[1] == TXT and nxt[1] == TXT and nxt[2] else IGNORE_INDEX
        for cur, nxt in zip(seq, seq[1:])
    ] + [IGNORE_INDEX]
    assert plan.labels.tolist() == expected
    labels = plan.labels.tolist()
    # spelled out: the last prompt token predicts <|vision_start|> of the target, the condition's marker is not
    # predicted, <|vision_end|> predicts the next loss-bearing text, the last text predicts <|endoftext|>
    assert labels[len(t1) - 1] == sp.vision_start_id
    assert labels[len(t1) + 3 * a + 1 + len(t2) - 1] == IGNORE_INDEX
    vision_end_b = len(t1) + 3 * a + 2 + len(t2) + 2 * b + 1
    assert labels[vision_end_b] == t3[0] and labels[-2] == sp.eos_id and labels[-1] == IGNORE_INDEX
    assert all(lab == IGNORE_INDEX for lab, s in zip(labels, seq) if s[1] != TXT)
    assert [img.is_target for img in plan.images] == [True, False]
    assert [img.loss_weight for img in plan.images] == [1.0, 0.0]
    assert [s.kind for s in plan.spans] == [TXT, NOISY, VIT, CLEAN, TXT, VIT, CLEAN, TXT]
    assert sum(s.length for s in plan.spans) == plan.num_tokens
    assert plan.copy_start[0] == {NOISY: len(t1) + 1, VIT: len(t1) + 1 + a, CLEAN: len(t1) + 1 + 2 * a}


def test_text_only_positions_are_1d():
    plan = _lower([{"text": "a red cat"}, {"text": "and the dog", "loss": False}])
    n = plan.num_tokens
    assert plan.position_ids.tolist() == [list(range(n))] * 3
    assert (plan.modality == TXT).all() and plan.images == []


def test_il_rope_positions():
    plan = _lower(INTERLEAVED, max_image_tokens=6)
    pos, mod = plan.position_ids, plan.modality
    for k, img in enumerate(plan.images):
        gh, gw = img.grid
        rows = torch.arange(gh).repeat_interleave(gw)
        cols = torch.arange(gw).repeat(gh)
        starts = plan.copy_start[k]
        copies = [pos[:, s : s + gh * gw] for s in starts.values()]
        t_img = copies[0][0, 0].item()
        for c in copies:  # one T for every copy; the same cell has the same (H, W) in every copy
            assert (c[0] == t_img).all() and torch.equal(c[1], rows) and torch.equal(c[2], cols)
        first = min(starts.values())
        last = max(starts.values()) + gh * gw - 1
        assert pos[:, first - 1].tolist() == [t_img - 1] * 3  # <|vision_start|> right before
        assert pos[:, last + 1].tolist() == [t_img + 1] * 3  # text continues at T + 1
    text_t = pos[0, mod == TXT]
    assert (text_t.diff() >= 1).all() and torch.equal(pos[0, mod == TXT], pos[1, mod == TXT])


@pytest.mark.parametrize(
    "last, eos_loss",
    [
        ({"text": "a cat"}, True),
        ({"text": "a cat", "loss": False}, False),
        ({"image": SQUARE, "generate": True}, True),
        ({"image": SQUARE}, False),
    ],
)
def test_end_of_text_loss(last, eos_loss):
    plan = _lower([{"text": "draw"}, last])
    sp = SpecialTokens.from_tokenizer(tiny_tokenizer())
    assert plan.input_ids[-1] == sp.eos_id
    assert (plan.labels[-2] == sp.eos_id) == eos_loss


def test_condition_dropout():
    gen = [
        {"text": "draw a cat"},
        {"image": WIDE},
        {"text": "make it big"},
        {"image": SQUARE, "generate": True},
    ]
    sp = SpecialTokens.from_tokenizer(tiny_tokenizer())
    plan = _lower(gen, p_drop_text=1.0)
    assert plan.dropped == ("text",) and len(plan.images) == 2
    text_ids = plan.input_ids[plan.modality == TXT].tolist()  # only markers and eos stay
    assert text_ids == [sp.vision_start_id, sp.vision_end_id] * 2 + [sp.eos_id]
    plan = _lower(gen, p_drop_images=1.0)
    assert plan.dropped == ("images",) and [i.is_target for i in plan.images] == [True]
    assert (
        plan.images[0].source_index == 1 and (plan.modality == VIT).sum() == plan.images[0].tensors.num_tokens
    )
    both = _lower(gen, p_drop_text=1.0, p_drop_images=1.0)
    assert both.dropped == ("text", "images") and both.num_tokens == 2 + 3 * 16 + 1
    # only samples with a generation target are dropped
    und = [{"image": SQUARE}, {"text": "a cat"}]
    assert _lower(und, p_drop_text=1.0, p_drop_images=1.0).dropped == ()
    # deterministic in (seed, sample id, epoch), and it varies over them
    draws = [_lower(gen, epoch=e, p_drop_text=0.5).dropped for e in range(40)]
    assert draws == [_lower(gen, epoch=e, p_drop_text=0.5).dropped for e in range(40)]
    assert 5 < draws.count(("text",)) < 35
    assert draws != [_lower(gen, epoch=e, p_drop_text=0.5, seed=1).dropped for e in range(40)]


def test_image_seeds_are_reproducible_and_distinct():
    segs = [{"image": WIDE}, {"text": "draw"}, {"image": SQUARE, "generate": True}]
    a, b = _lower(segs), _lower(segs)
    seeds = [i.seed for i in a.images]
    assert seeds == [i.seed for i in b.images] and len(set(seeds)) == 2
    assert all(0 <= s < 2**63 for s in seeds)
    assert [i.seed for i in _lower(segs, epoch=1).images] != seeds
    assert [i.seed for i in _lower(segs, seed=5).images] != seeds
    # dropping the condition image does not change the target's seed
    assert _lower(segs, p_drop_images=1.0).images[0].seed == seeds[1]


def test_too_long_policies(tmp_path):
    make_image(tmp_path / "a.png", size=(8, 8))
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "segments": [
                    {"text": "draw a cat"},
                    {"image": "a.png", "generate": True},
                    {"text": "the dog is big"},
                ]
            }
        ],
    )
    (sample,) = load_samples(path)
    n_text = len(_ids("draw a cat"))
    total = n_text + 2 + 3 * 16 + len(_ids("the dog is big")) + 1
    with pytest.raises(DataError) as info:
        lower_sample(sample, tiny_tokenizer(), small_config(token_budget=40))
    msg = str(info.value)
    assert msg.startswith(f"{path}:1: field 'segments'") and f"has {total} tokens (50 in images)" in msg
    assert "token budget of 40" in msg and "data.too_long" in msg and "data.token_budget" in msg
    assert lower_sample(sample, tiny_tokenizer(), small_config(token_budget=40, too_long="skip")) is None
    cut = lower_sample(sample, tiny_tokenizer(), small_config(token_budget=total - 1, too_long="truncate"))
    assert cut.truncated and cut.num_tokens == n_text + 2 + 48 + 1 and cut.images[0].is_target
    assert (
        cut.labels[-2] == SpecialTokens.from_tokenizer(tiny_tokenizer()).eos_id
    )  # ends in a generated image
    assert lower_sample(sample, tiny_tokenizer(), small_config(token_budget=3, too_long="truncate")) is None
    assert not lower_sample(sample, tiny_tokenizer(), small_config(token_budget=total)).truncated


def test_lowering_errors(tmp_path):
    with pytest.raises(DataError, match=r"segments\[0\].text.*image marker"):
        _lower([{"text": "a <|vision_start|> cat"}])
    path = write_jsonl(tmp_path / "d.jsonl", [{"segments": [{"text": "a"}, {"image": "gone.png"}]}])
    (sample,) = load_samples(path, check_images=False)  # the file vanished after validation
    with pytest.raises(DataError, match=rf"{path}:1: field 'segments\[1\].image': image file not found"):
        lower_sample(sample, tiny_tokenizer(), small_config())
    with pytest.raises(ConfigError, match="too_long"):
        small_config(too_long="cut")
    with pytest.raises(ConfigError, match="p_drop_text"):
        small_config(p_drop_text=1.5)
