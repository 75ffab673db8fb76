"""The sample format, its validating loader, image conversion/grids and the tokenizer."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest_data import make_image, tiny_tokenizer, write_jsonl
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mogao.data import (
    ImageSegment,
    SpecialTokens,
    TextSegment,
    check_samples,
    choose_grid,
    ensure_special_tokens,
    load_samples,
    open_image,
    prepare_image,
    samples_from_dicts,
    to_rgb,
)
from mogao.errors import ConfigError, DataError

GOOD = {"id": "ok", "segments": [{"text": "a cat"}, {"image": "img/a.png", "generate": True}]}


@pytest.fixture
def data_dir(tmp_path):
    make_image(tmp_path / "img" / "a.png")
    return tmp_path


def test_valid_file_and_defaults(data_dir):
    path = write_jsonl(
        data_dir / "d.jsonl",
        [
            GOOD,
            "",
            {
                "segments": [
                    {"image": "img/a.png", "generate": True, "loss_weight": 0.5},
                    {"text": "the cat", "loss": False},
                    {"image": str(data_dir / "img" / "a.png")},
                ]
            },
        ],
    )
    a, b = load_samples(path)
    assert a.id == "ok" and a.segments[0] == TextSegment("a cat", True)
    assert isinstance(a.segments[1], ImageSegment) and a.segments[1].generate and a.segments[1].loss_weight == 1.0
    assert b.id == f"{path}:3" and b.line == 3  # default id is FILE:LINE; blank lines are skipped
    gen, text, cond = b.segments  # a generation target with nothing before it is allowed
    assert (
        gen.flow_weight == 0.5 and text.loss is False and cond.generate is False and cond.flow_weight == 0.0
    )
    assert check_samples(path) == []


BAD_LINES = [  # (line 2 of the file, field named, words in the message)
    ('{"segments": [', None, "invalid JSON"),
    ("[1, 2]", None, "must be a JSON object"),
    ({"segments": [{"text": "a"}], "caption": "x"}, "caption", "allowed keys: id, segments"),
    ({"segments": [{"text": "a", "weight": 1}]}, "segments[0].weight", "allowed keys: text, loss"),
    (
        {"segments": [{"image": "img/a.png", "gen": True}]},
        "segments[0].gen",
        "allowed keys: image, generate, loss",
    ),
    ({"id": 7, "segments": [{"text": "a"}]}, "id", "must be a non-empty string"),
    ({"id": "x"}, "segments", "missing 'segments'"),
    ({"segments": {"text": "a"}}, "segments", "must be a list, got dict"),
    ({"segments": []}, "segments", "'segments' is empty"),
    ({"segments": ["a cat"]}, "segments[0]", "must be an object, got str"),
    ({"segments": [{"text": "a", "image": "img/a.png"}]}, "segments[0]", "both 'text' and 'image'"),
    ({"segments": [{"loss": True}]}, "segments[0]", "neither 'text' nor 'image'"),
    ({"segments": [{"text": 3}]}, "segments[0].text", "must be a string, got int"),
    ({"segments": [{"text": ""}]}, "segments[0].text", "empty text"),
    ({"segments": [{"text": "a", "loss": 1}]}, "segments[0].loss", "true or false"),
    ({"segments": [{"image": "img/a.png", "generate": "yes"}]}, "segments[0].generate", "true or false"),
    ({"segments": [{"image": "img/a.png", "generate": True, "loss_weight": -1}]}, "segments[0].loss_weight", "number >= 0"),
    (
        {"segments": [{"image": "img/a.png", "loss_weight": 0.5}]},
        "segments[0].loss_weight",
        "condition image has no flow loss",
    ),
    ({"segments": [{"image": ["img/a.png"]}]}, "segments[0].image", "must be a path string, got list"),
    ({"segments": [{"text": "a"}, {"image": "img/nope.png"}]}, "segments[1].image", "image file not found"),
    ({"segments": [{"image": "img/corrupt.png"}]}, "segments[0].image", "cannot read image"),
    ({"segments": [{"image": "img/truncated.png"}]}, "segments[0].image", "cannot read image"),
    ({"id": "ok", "segments": [{"text": "b"}]}, "id", "duplicate id 'ok' (first used on line 1)"),
]


@pytest.mark.parametrize("line, field, words", BAD_LINES, ids=[w for _, _, w in BAD_LINES])
def test_each_error_names_file_line_and_field(data_dir, line, field, words):
    (data_dir / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).effect_spread(5).save(buf, format="PNG")
    (data_dir / "img" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    path = write_jsonl(data_dir / "bad.jsonl", [GOOD, line])
    with pytest.raises(DataError) as info:
        load_samples(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), 2, field)
    msg = str(err)
    assert msg.startswith(f"{path}:2: ") and words in msg
    if field:
        assert f"field '{field}'" in msg


def test_lenient_loading_collects_every_problem(data_dir):
    path = write_jsonl(data_dir / "d.jsonl", [GOOD, "{oops", {"segments": []}, {"segments": [{"text": "b"}]}])
    assert [s.line for s in load_samples(path, strict=False)] == [1, 4]
    problems = check_samples(path)
    assert [(p.line, p.field) for p in problems] == [(2, None), (3, "segments")]
    with pytest.raises(DataError, match="sample file not found"):
        load_samples(data_dir / "missing.jsonl")


def test_in_memory_samples_with_pil_images_and_root(data_dir):
    img = make_image(size=(5, 7))
    samples = samples_from_dicts(
        [
            {"segments": [{"text": "draw"}, {"image": img, "generate": True}]},
            {"segments": [{"image": "img/a.png"}, {"text": "a cat"}]},
        ],
        root=data_dir,
        name="shapes",
    )
    assert [s.id for s in samples] == ["shapes:1", "shapes:2"]
    assert samples[0].segments[1].image is img and samples[0].has_target and not samples[1].has_target
    with pytest.raises(DataError, match=r"shapes:1: field 'segments\[0\].image': image file not found"):
        samples_from_dicts([{"segments": [{"image": "nope.png"}]}], root=data_dir, name="shapes")
    with pytest.raises(DataError, match=r"shapes:2: field 'id': duplicate id 'x' \(first used by item 1\)"):
        samples_from_dicts([{"id": "x", "segments": [{"text": "a"}]}] * 2, name="shapes")


# --- images -----------------------------------------------------------------------------------------------


def _modes() -> dict[str, Image.Image]:
    p = Image.new("P", (6, 4))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 3, 4))
    p_transparent = p.copy()
    p_transparent.info["transparency"] = 0  # palette entry 0 (black) is transparent -> white
    rgba = Image.new("RGBA", (6, 4), (255, 0, 0, 0))
    return {
        "RGB": Image.new("RGB", (6, 4), (10, 20, 30)),
        "RGBA": rgba,
        "LA": Image.new("LA", (6, 4), (0, 0)),
        "PA": p.convert("PA"),
        "L": Image.new("L", (6, 4), 128),
        "P": p,
        "P+transparency": p_transparent,
        "CMYK": Image.new("CMYK", (6, 4), (0, 255, 255, 0)),
        "I;16": Image.new("I;16", (6, 4), 65535),
        "I": Image.new("I", (6, 4), 30000),
        "F": Image.new("F", (6, 4), 0.5),
        "1": Image.new("1", (6, 4), 1),
        "YCbCr": Image.new("YCbCr", (6, 4), (128, 128, 128)),
    }


@pytest.mark.parametrize("name", list(_modes()))
def test_every_pil_mode_becomes_rgb(name):
    img = _modes()[name]
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (6, 4)
    px = rgb.getpixel((5, 0))
    expected = {
        "RGBA": (255, 255, 255),
        "LA": (255, 255, 255),
        "P+transparency": (255, 255, 255),
        "I;16": (255, 255, 255),
        "1": (255, 255, 255),
        "CMYK": (255, 0, 0),
        "L": (128, 128, 128),
    }
    if name in expected:
        assert px == expected[name]
    if name.startswith("P"):
        assert rgb.getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (8, 4), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 2, 4))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    shown = to_rgb(open_image(tmp_path / "r.jpg"))
    assert shown.size == (4, 8)
    r, g, b = shown.getpixel((1, 0))  # the left stripe is now on top
    assert r > 200 and b < 60


@pytest.mark.parametrize("h, w", [(1, 300), (300, 1), (8, 8), (24, 40), (1000, 3), (7, 5), (1, 1)])
@pytest.mark.parametrize("max_tokens, max_grid", [(16, None), (256, None), (64, 12), (1, None)])
def test_grid_within_budget_and_close_in_aspect(h, w, max_tokens, max_grid):
    gh, gw = choose_grid(h, w, max_tokens, 1, max_grid)
    hi = max_grid or max_tokens
    assert 1 <= gh <= hi and 1 <= gw <= hi and gh * gw <= max_tokens
    ideal_h, ideal_w = math.sqrt(max_tokens * h / w), math.sqrt(max_tokens * w / h)
    if 1 <= ideal_h <= hi and 1 <= ideal_w <= hi:  # no side clamped: rounding is the only distortion
        err = abs(math.log((gw / gh) / (w / h)))
        assert err <= math.log((gh + 1) / gh) + math.log((gw + 1) / gw) + 1e-9
        assert gh * gw >= max_tokens / 4
    if h == w:
        assert gh == gw == math.isqrt(min(max_tokens, hi * hi))


def test_grid_uses_the_budget():
    assert choose_grid(480, 640, 256) == (14, 18)  # 252 tokens, 4:3 within 3%
    assert choose_grid(8, 8, 256) == (16, 16)
    assert choose_grid(1, 300, 256) == (1, 256)
    assert choose_grid(1, 300, 256, max_grid=64) == (1, 64)
    with pytest.raises(ConfigError, match="min_grid"):
        choose_grid(8, 8, 3, min_grid=2)


@pytest.mark.parametrize("size", [(1, 300), (300, 1), (40, 24), (8, 8)])
def test_both_copies_cover_the_same_cells(size):
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, max(1, size[0] // 2), size[1]))  # left half red
    t = prepare_image(img, max_tokens=16, vit_patch=3, vae_patch=5)
    gh, gw = t.grid
    assert t.vit.shape == (3, gh * 3, gw * 3) and t.vae.shape == (3, gh * 5, gw * 5)
    assert t.vit.dtype == torch.float32 and 0.0 <= t.vit.min() and t.vit.max() <= 1.0 and t.vae.max() <= 1.0
    cells_vit = t.vit.reshape(3, gh, 3, gw, 3).mean(dim=(2, 4))
    cells_vae = t.vae.reshape(3, gh, 5, gw, 5).mean(dim=(2, 4))
    assert torch.allclose(cells_vit, cells_vae, atol=0.15)


# --- tokenizer ----------------------------------------------------------------------------------------------


def test_trained_tokenizer_round_trip(tmp_path):
    tok = tiny_tokenizer()
    special = SpecialTokens.from_tokenizer(tok)
    assert (special.eos_id, special.vision_start_id, special.vision_end_id) == (0, 1, 2)
    assert tok.eos_token_id == tok.pad_token_id == 0
    ids = tok("a red cat ünïcode", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "a red cat ünïcode"
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("a red cat ünïcode", add_special_tokens=False)["input_ids"] == ids
    assert SpecialTokens.from_tokenizer(again) == special and ensure_special_tokens(again) == 0


def test_ensure_special_tokens_adds_missing_markers():
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(
        ["a red cat"],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    with pytest.raises(ConfigError, match="ensure_special_tokens"):
        SpecialTokens.from_tokenizer(tok)
    n = len(tok)
    assert ensure_special_tokens(tok) == 2 and len(tok) == n + 2
    assert ensure_special_tokens(tok) == 0
    special = SpecialTokens.from_tokenizer(tok)
    assert special.eos_id == tok.convert_tokens_to_ids("</s>") and tok.pad_token == "</s>"
    assert tok("x<|vision_start|>", add_special_tokens=False)["input_ids"][-1] == special.vision_start_id


@pytest.mark.parametrize("mode, key", [("L", 7), ("RGB", (7, 7, 7))])
def test_colour_key_transparency_becomes_white(mode, key):
    img = Image.new(mode, (4, 2), key)
    img.info["transparency"] = key
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)
