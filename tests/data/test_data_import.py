"""Importers: LLaVA/ShareGPT chat JSON and image+caption folders become valid JSONL samples (round trip through
the loader), through the Python API and `mogao data import`; malformed inputs name file, record and field."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mogao.cli import main
from mogao.data import load_samples
from mogao.data.importers import captions_to_samples, llava_to_samples
from mogao.data.samples import ImageSegment, TextSegment
from mogao.errors import DataError


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "src" / "img"
    d.mkdir(parents=True)
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (16, 12), colour).save(d / f"{name}.png")
    return d


def test_llava_messages_round_trip(images, tmp_path):
    src = images.parent / "chat.json"
    src.write_text(json.dumps([
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "<image>What colour is this?"},
                      {"role": "assistant", "content": "Red."},
                      {"role": "user", "content": "And this one? <image>"},
                      {"role": "assistant", "content": "Blue."}],
         "images": ["img/a.png", "img/b.png"]},
        {"id": "x7", "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                       {"from": "gpt", "value": "A blue rectangle."}],
         "image": "img/b.png"},
    ]))
    out = tmp_path / "out" / "chat.jsonl"
    assert main(["data", "import", "llava", str(src), "--out", str(out)]) == 0
    samples = load_samples(out)  # valid, images found relative to the output file
    assert [s.id for s in samples] == ["chat-1", "x7"]
    segs = samples[0].segments
    kinds = [("img", g.loss_weight) if isinstance(g, ImageSegment) else (g.text, g.loss) for g in segs]
    assert kinds == [("Be brief.", False), ("img", 0.0), ("What colour is this?", False), ("Red.", True),
                     ("And this one?", False), ("img", 0.0), ("Blue.", True)]
    assert [g.image.name for g in segs if isinstance(g, ImageSegment)] == ["a.png", "b.png"]
    assert not any(g.generate for g in segs if isinstance(g, ImageSegment))  # condition images
    assert [(type(g).__name__, g.loss_weight if isinstance(g, ImageSegment) else g.loss) for g in samples[1].segments] == [
        ("ImageSegment", 0.0), ("TextSegment", False), ("TextSegment", True)]


def test_llava_without_placeholder_puts_images_first(images, tmp_path):
    src = images.parent / "c.json"
    src.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}], "images": ["img/a.png"]}]))
    (sample,) = llava_to_samples(src, tmp_path / "o.jsonl")
    assert "image" in sample["segments"][0] and sample["segments"][1] == {"text": "Hi", "loss": False}


@pytest.mark.parametrize("record, field, message", [
    ({"messages": [{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "y"}],
      "images": ["img/a.png"]}, "messages", "2 '<image>' placeholder(s) but 1 image"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "unknown role 'robot'"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "conversations", "no assistant turn"),
    ({"text": "x"}, None, "needs 'messages'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be a string"),
])
def test_llava_errors_name_file_record_and_field(images, tmp_path, record, field, message):
    src = images.parent / "bad.json"
    src.write_text(json.dumps([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                               record]))
    with pytest.raises(DataError) as e:
        llava_to_samples(src, tmp_path / "o.jsonl")
    assert e.value.line == 2 and e.value.field == field and message in str(e.value)
    assert f"{src}:2" in str(e.value)


def test_captions_folder_round_trip(images, tmp_path):
    (images / "a.txt").write_text("A red rectangle.\n")
    (images / "b.txt").write_text("A blue rectangle.")
    out = tmp_path / "t2i.jsonl"
    assert main(["data", "import", "captions", str(images), "--out", str(out)]) == 0
    samples = load_samples(out)
    assert [s.id for s in samples] == ["a", "b"]
    text, image = samples[0].segments
    assert isinstance(text, TextSegment) and text.text == "A red rectangle." and not text.loss
    assert isinstance(image, ImageSegment) and image.generate and image.image.resolve() == (images / "a.png").resolve()


def test_captions_missing_caption_is_named(images, tmp_path, capsys):
    (images / "a.txt").write_text("A red rectangle.")
    with pytest.raises(DataError, match="b.png has no caption file b.txt"):
        captions_to_samples(images, tmp_path / "o.jsonl")
    assert main(["data", "import", "captions", str(images), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "b.txt" in capsys.readouterr().err
