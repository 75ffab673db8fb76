"""Fuzzing every way data enters: arbitrary bytes and JSON values as JSONL lines, arbitrary dicts as samples,
arbitrary image bytes, sizes and modes, and whatever validates through lowering. Nothing may fail with
anything but the project's own errors (`MogaoError`), and nothing may hang (every example has a deadline)."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from conftest_data import small_config, tiny_tokenizer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mogao.data import (
    Sample,
    SequencePlan,
    check_samples,
    iter_samples,
    load_samples,
    lower_sample,
    open_image,
    prepare_image,
    sample_from_dict,
    to_rgb,
)
from mogao.errors import DataError, MogaoError

FUZZ = settings(max_examples=300, deadline=timedelta(seconds=10),
                suppress_health_check=[HealthCheck.too_slow])

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa",
         "La", "I;16", "I;16L", "I;16B", "I;16N"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA"]

# ---- a directory of images the fuzzed samples may point at ---------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    Image.new("RGB", (12, 8), (200, 40, 40)).save(d / "ok.png")
    Image.new("RGBA", (5, 30), (0, 90, 200, 100)).save(d / "alpha.png")
    Image.new("I;16", (7, 7), 40000).save(d / "deep.png")
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes((d / "ok.png").read_bytes()[:40])
    (d / "dir.png").mkdir()
    return d


IMAGE_REFS = st.sampled_from(["ok.png", "alpha.png", "deep.png", "garbage.png", "empty.png", "truncated.png",
                              "dir.png", "missing.png", "", ".", "../ok.png", "/", "a\x00b.png", "\ud800.png",
                              "x" * 300, "ok.png/"])

# JSON values: everything json.loads can return, plus strings with unpaired surrogates (JSON "\ud800" escapes)
LEAF = (st.none() | st.booleans() | st.integers() | st.integers(-10**400, 10**400) | st.floats()
        | st.text(max_size=20) | st.sampled_from(["\ud800", "a\udfffb", "<|vision_start|>", "<|endoftext|>"]))
JSON = st.recursive(
    LEAF, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)
TEXT = st.text(min_size=0, max_size=40) | st.sampled_from(["\ud800", "red <|vision_start|> cat", "a" * 2000])
SEGMENT = st.one_of(
    st.fixed_dictionaries({"text": TEXT | JSON}, optional={"loss": JSON | st.booleans()}),
    st.fixed_dictionaries({"image": IMAGE_REFS | JSON}, optional={
        "generate": st.booleans() | JSON,
        "loss_weight": st.floats() | st.integers(-2, 2) | st.just(10**400) | JSON}),
    st.dictionaries(st.sampled_from(["text", "image", "loss", "loss_weight", "generate", "extra"]), JSON, max_size=4),
    JSON,
)
SAMPLE = st.fixed_dictionaries(
    {"segments": st.lists(SEGMENT, max_size=4) | JSON},
    optional={"id": st.text(max_size=10) | JSON, "extra": JSON},
)
# mostly valid samples (so that fuzzing reaches image loading and lowering), sometimes with one bad part
GOOD_SEGMENT = st.one_of(
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40) | TEXT},
                          optional={"loss": st.booleans()}),
    st.fixed_dictionaries({"image": IMAGE_REFS}, optional={"generate": st.booleans(),
                                                           "loss_weight": st.floats(0, 4) | st.just(0)}),
)
NEAR_SAMPLE = st.fixed_dictionaries(
    {"segments": st.lists(st.one_of(GOOD_SEGMENT, GOOD_SEGMENT, GOOD_SEGMENT, SEGMENT),
                          min_size=1, max_size=5)},
    optional={"id": st.text(min_size=1, max_size=10)},
)


def only_mogao_errors(fn, *args, **kwargs):
    """Call `fn`; a `MogaoError` is an allowed outcome (returned), anything else propagates (test fails)."""
    try:
        out = fn(*args, **kwargs)
    except MogaoError as e:
        assert str(e), "errors must say what is wrong"
        out = e
    event(f"{getattr(fn, '__name__', 'call')} -> {type(out).__name__}")  # (--hypothesis-show-statistics)
    return out


# ---- JSONL files -----------------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    items = only_mogao_errors(lambda: list(iter_samples(path)))
    if isinstance(items, list):
        assert all(isinstance(x, (Sample, DataError)) for x in items)
        assert all(x.line is not None for x in items if isinstance(x, DataError))  # every problem is located
    problems = only_mogao_errors(check_samples, path)
    loaded = only_mogao_errors(load_samples, path, strict=False)
    if isinstance(items, list):
        assert problems == [x for x in items if isinstance(x, DataError)] or [str(p) for p in problems] == [
            str(x) for x in items if isinstance(x, DataError)]
        assert [s.id for s in loaded] == [x.id for x in items if isinstance(x, Sample)]
    only_mogao_errors(load_samples, path, strict=True)


@FUZZ
@given(lines=st.lists(st.binary(max_size=120), max_size=6), newline=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_jsonl_of_arbitrary_bytes_fails_only_with_data_errors(root, lines, newline):
    path = root / "bytes.jsonl"
    path.write_bytes(newline.join(lines))
    _check_file(path)


@FUZZ
@given(values=st.lists(NEAR_SAMPLE | SAMPLE | JSON, max_size=5), bom=st.booleans())
def test_jsonl_of_arbitrary_json_fails_only_with_data_errors(root, values, bom):
    path = root / "json.jsonl"
    text = "\n".join(json.dumps(v) for v in values)  # (json.dumps escapes unpaired surrogates as \udxxx)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    _check_file(path)


@pytest.mark.parametrize("text", [
    "[" * 100_000,  # nested deeper than the parser's recursion limit
    '{"segments": [{"text": "a", "loss": ' + "9" * 5000 + "}]}",  # more digits than Python converts
    '{"segments": [{"image": "ok.png", "generate": true, "loss_weight": 1e999}]}',  # an infinite weight
    '{"segments": [{"text": "\\ud800"}]}',  # an unpaired surrogate
])
def test_jsonl_edge_cases_are_data_errors_at_their_line(root, text):
    path = root / "edge.jsonl"
    path.write_text('{"segments": [{"text": "fine"}]}\n' + text + "\n")
    (problem,) = check_samples(path)
    assert problem.line == 2, problem


def test_missing_or_unreadable_sample_files_are_data_errors(root):
    for path in (root / "nowhere.jsonl", root / "dir.png", root / ("x" * 5000)):
        with pytest.raises(DataError):
            load_samples(path)


# ---- dicts -----------------------------------------------------------------------------------------------


@FUZZ
@given(raw=NEAR_SAMPLE | SAMPLE | JSON, check_images=st.booleans())
def test_sample_from_dict_fails_only_with_data_errors(root, raw, check_images):
    out = only_mogao_errors(sample_from_dict, raw, root=root, file="f.jsonl", line=3,
                            check_images=check_images)
    if isinstance(out, DataError):
        assert out.file == "f.jsonl" and out.line == 3
    else:
        assert isinstance(out, Sample) and out.segments


@FUZZ
@given(raw=NEAR_SAMPLE, budget=st.integers(1, 300), max_tokens=st.integers(1, 24),
       too_long=st.sampled_from(["error", "skip", "truncate"]), drop=st.floats(0, 1), epoch=st.integers(0, 3))
def test_lowering_whatever_validates_fails_only_with_data_errors(root, raw, budget, max_tokens, too_long,
                                                                   drop, epoch):
    sample = only_mogao_errors(sample_from_dict, raw, root=root, file="f.jsonl", line=1, check_images=False)
    if isinstance(sample, MogaoError):
        return
    config = small_config(token_budget=budget, max_image_tokens=max_tokens, too_long=too_long,
                          p_drop_text=drop, p_drop_images=drop)
    plan = only_mogao_errors(lower_sample, sample, tiny_tokenizer(), config, epoch=epoch)
    assert plan is None or isinstance(plan, (SequencePlan, DataError))
    if isinstance(plan, SequencePlan):
        assert plan.num_tokens <= budget


# ---- images ----------------------------------------------------------------------------------------------


def _prepare(img: Image.Image, max_tokens: int, vit_patch: int, vae_patch: int) -> None:
    out = only_mogao_errors(prepare_image, img, max_tokens=max_tokens, vit_patch=vit_patch,
                            vae_patch=vae_patch)
    if not isinstance(out, MogaoError):
        gh, gw = out.grid
        assert gh * gw <= max_tokens and out.vit.shape == (3, gh * vit_patch, gw * vit_patch)
        assert out.vae.shape == (3, gh * vae_patch, gw * vae_patch) and 0 <= float(out.vae.min()) <= 1


def _encoded(mode: str, size: tuple[int, int], fmt: str, noise: bytes) -> bytes:
    """A real image file of `mode` in `fmt` (whatever PIL can write; PNG of the RGB image otherwise)."""
    base = Image.new("RGB", size, tuple(noise[:3].ljust(3, b"\0")))
    buf = io.BytesIO()
    try:
        base.convert(mode).save(buf, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        buf = io.BytesIO()
        base.save(buf, format="PNG")
    return buf.getvalue()


@FUZZ
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(FORMATS), w=st.integers(1, 40), h=st.integers(1, 40),
       noise=st.binary(min_size=3, max_size=3),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       cut=st.none() | st.integers(0, 10**6), max_tokens=st.integers(1, 64),
       patches=st.tuples(st.integers(1, 16), st.integers(1, 16)))
def test_damaged_image_files_fail_only_with_data_errors(root, mode, fmt, w, h, noise, flips, cut, max_tokens,
                                                        patches):
    data = bytearray(_encoded(mode, (w, h), fmt, noise))
    for pos, byte in flips:
        data[pos % len(data)] = byte
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = root / f"damaged.{fmt.lower()}"
    path.write_bytes(bytes(data))
    img = only_mogao_errors(open_image, path, file="f.jsonl", line=2, field="segments[0].image")
    if isinstance(img, DataError):
        assert img.file == "f.jsonl" and img.line == 2 and img.field == "segments[0].image"
        return
    rgb = only_mogao_errors(to_rgb, img)
    assert isinstance(rgb, MogaoError) or rgb.mode == "RGB"
    _prepare(img, max_tokens, *patches)


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_as_an_image_file_fail_only_with_data_errors(root, data):
    path = root / "bytes.img"
    path.write_bytes(data)
    img = only_mogao_errors(open_image, path)
    if not isinstance(img, MogaoError):
        _prepare(img, 16, 4, 8)


@FUZZ
@given(mode=st.sampled_from(MODES), w=st.integers(0, 300), h=st.integers(0, 300), seed=st.binary(max_size=8),
       max_tokens=st.integers(1, 64), patches=st.tuples(st.integers(1, 16), st.integers(1, 16)),
       info=st.sampled_from([{}, {"transparency": 0}, {"transparency": (1, 2, 3)},
                             {"transparency": b"\0\1"}]))
def test_in_memory_images_of_any_size_and_mode_fail_only_with_data_errors(mode, w, h, seed, max_tokens,
                                                                          patches, info):
    img = Image.new(mode, (w, h))
    if w and h and seed:
        raw = (seed * (len(img.tobytes()) // len(seed) + 1))[: len(img.tobytes())]
        img.frombytes(raw)
    img.info.update(info)
    rgb = only_mogao_errors(to_rgb, img)
    assert isinstance(rgb, MogaoError) or (rgb.mode == "RGB" and rgb.size == (w, h))
    _prepare(img, max_tokens, *patches)


def test_image_over_the_pixel_limit_is_refused_before_decoding(root, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(DataError, match=r"12x8 pixels, more than the limit of 50"):
        open_image(root / "ok.png")
