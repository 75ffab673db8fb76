"""`mogao generate` and `mogao chat` in-process on a tiny saved model, and fuzzed inputs at the boundary."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mogao.errors import ConfigError, DataError, MogaoError
from mogao.inference import GenerationConfig, GenerationSession, Guidance
from mogao.inference.cli import chat_main, generate_main
from mogao.model.config import ModelConfig
from mogao.model.io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--steps", "2", "--image-size", "32", "--max-new-tokens", "3", "--cfg-text", "2.0"]


@pytest.fixture(scope="module")
def model_dir(tiny_parts, tmp_path_factory):
    """A saved model directory as a fit writes it: config, weights and tokenizer."""
    torch.manual_seed(0)
    m = load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder="pixel",
                               latent_patch=4))
    d = tmp_path_factory.mktemp("saved") / "model"
    m.save_pretrained(d)
    tiny_parts["tokenizer"].save_pretrained(d)
    return d


def test_generate_writes_pngs_html_and_json(model_dir, tmp_path, capsys):
    cond = tmp_path / "in.png"
    Image.new("RGBA", (40, 24), (255, 0, 0, 128)).save(cond)
    out = tmp_path / "out"
    rc = generate_main(["--ckpt", str(model_dir), "--prompt", "Make it blue.", "--image", str(cond), "--draw",
                        "--max-images", "1", "--seed", "3", *FAST, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "conversation.json").read_text())
    roles = [(s["role"], "image" in s) for s in record["conversation"]]
    assert roles == [("user", True), ("user", False), ("model", True)]
    model_png = out / record["conversation"][-1]["image"]
    assert Image.open(model_png).size == (32, 32)
    page = (out / "conversation.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Make it blue." in page
    assert str(model_png) in capsys.readouterr().out
    # the same seed gives the same image
    rc = generate_main(["--ckpt", str(model_dir), "--prompt", "Make it blue.", "--image", str(cond), "--draw",
                        "--max-images", "1", "--seed", "3", *FAST, "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "conversation.json").read_text())["conversation"][-1]["image"]
    assert rc == 0 and np.array_equal(np.asarray(Image.open(model_png)),
                                      np.asarray(Image.open(tmp_path / "again" / again)))


def test_generate_reports_bad_arguments_by_name(model_dir, tmp_path, capsys):
    cases = [
        (["--ckpt", str(tmp_path / "nope"), "--prompt", "hi"], "--ckpt"),
        (["--ckpt", str(model_dir), "--prompt", "   "], "--prompt"),
        (["--ckpt", str(model_dir), "--prompt", "hi", "--image", str(tmp_path / "missing.png")], "missing.png"),
        (["--ckpt", str(model_dir), "--prompt", "hi", "--image-size", "30", "--draw"], "30x30"),
        (["--ckpt", str(model_dir), "--prompt", "hi", "--steps", "0"], "steps"),
    ]
    for argv, named in cases:
        assert generate_main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "error" in err and named in err, err


def test_chat_with_piped_stdin_saves_images(model_dir, tmp_path, monkeypatch, capsys):
    cond = tmp_path / "in.png"
    Image.new("L", (20, 20), 128).save(cond)
    lines = ["/draw Draw a red circle.", "", f"/image {cond}", "/draw Now make it blue.", "What is it?", "/quit",
             "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    out = tmp_path / "chat"
    rc = chat_main(["--ckpt", str(model_dir), "--out", str(out), "--max-images", "1", *FAST])
    printed = capsys.readouterr().out
    assert rc == 0
    saved = [line.split("image saved: ")[1].rstrip("]") for line in printed.splitlines() if "image saved" in line]
    assert len(saved) == 2 and all(Image.open(p).size == (32, 32) for p in saved)
    record = json.loads((out / "conversation.json").read_text())["conversation"]
    assert [s["role"] for s in record][:3] == ["user", "model", "user"]
    assert sum("image" in s for s in record) == 3  # two drawn, one attached
    assert (out / "conversation.html").is_file()


# ---- fuzzed inputs: nothing but the project's errors escape ---------------------------------------------------

MODES = ["RGB", "RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "I", "F"]


def _image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode in ("I;16", "I", "F"):
        arr = rng.integers(0, 65535, (h, w)).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
        return Image.fromarray(arr, mode=mode) if mode != "I;16" else Image.fromarray(arr).convert("I;16")
    return rgb.convert(mode)


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoTokenizer

    return load_model(model_dir).eval(), AutoTokenizer.from_pretrained(str(model_dir))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40), mode=st.sampled_from(MODES), w=st.integers(1, 300), h=st.integers(1, 300),
       with_image=st.booleans())
def test_python_api_fuzz(loaded, text, mode, w, h, with_image):
    model, tok = loaded
    s = GenerationSession(model, tok, 1, GenerationConfig(image_size=16, steps=1, max_new_tokens=2, max_images=1),
                          Guidance(text_scale=2.0))
    turn = ([{"image": _image(mode, w, h, w * h)}] if with_image else []) + [{"text": text}]
    try:
        s.add_user_turn([turn])
        r = s.respond(draw=True)[0]
    except (ConfigError, DataError) as e:
        assert str(e)
        return
    assert r.images and r.images[0].size == (16, 16)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=20), mode=st.sampled_from(MODES + ["corrupt", "missing"]), side=st.integers(1, 80))
def test_generate_main_fuzz(model_dir, tmp_path_factory, text, mode, side):
    d = tmp_path_factory.mktemp("fuzz")
    path = d / "in.png"
    if mode == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(40)))
    elif mode != "missing":
        img = _image(mode, side, max(1, side // 2), side)
        img.save(path if mode not in ("CMYK", "F", "I") else d / "in.tiff")
        path = path if mode not in ("CMYK", "F", "I") else d / "in.tiff"
    if "\x00" in text:  # an OS argument cannot hold NUL; the API fuzz covers it
        text = text.replace("\x00", "")
    # (`--prompt=TEXT`: a prompt may start with "-", which argparse reads as an option after a separate `--prompt`)
    rc = generate_main(["--ckpt", str(model_dir), f"--prompt={text}", "--image", str(path), "--draw",
                        "--steps", "1", "--image-size", "16", "--max-new-tokens", "1", "--out", str(d / "o")])
    assert rc in (0, 2)


def test_too_long_prompt_is_a_config_error(loaded, monkeypatch):
    model, tok = loaded
    s = GenerationSession(model, tok, 1, GenerationConfig(image_size=16))
    monkeypatch.setattr(s, "context_limit", 10)
    with pytest.raises(ConfigError, match="context"):
        s.add_user_turn([[{"text": "a b c d e f g h i j k l m n o p q r s t u v"}]])
    with pytest.raises(MogaoError, match="empty"):
        s.respond()
