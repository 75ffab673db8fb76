"""`mogao eval --export`: for each benchmark, an input file in the benchmark's own format, a tiny saved model
exporting it, and a re-implementation of what the benchmark's scorer does with the files (what it lists,
parses, opens and requires - the scorers themselves need detectors or judge models) accepting the output; an
export interrupted in the middle of writing and run again equals an uninterrupted one, file for file; seeds,
not batches, decide the images; bad input is reported by file and line; a failed item is recorded."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mogao.eval.export as export_module
from mogao.cli import main as mogao_main
from mogao.errors import ConfigError, DataError
from mogao.eval.export import ExportOptions, export_benchmark
from mogao.eval.models import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

R = 16  # pixels: a 4 x 4 token grid of the tiny model (pixel autoencoder, latent patch 4)
FAST = ["--steps", "2", "--resolution", str(R), "--cfg", "2.0", "--batch-size", "3"]
GEDIT_GROUPS = ("background_change", "color_alter")  # two of test_gedit_score.py's GROUPS


@pytest.fixture(scope="module")
def model_dir(tiny_parts, tmp_path_factory):
    """A saved model directory as a fit writes it: config, weights and tokenizer."""
    from mogao.model.config import ModelConfig
    from mogao.model.io import load_model

    torch.manual_seed(0)
    m = load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder="pixel", latent_patch=4))
    d = tmp_path_factory.mktemp("export_model") / "model"
    m.save_pretrained(d)
    tiny_parts["tokenizer"].save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    """The saved model loaded as `mogao eval` loads it, with a hook that makes the random model begin an image
    wherever its favourite token id is even (a pure function of the logits: the same in every batch and run),
    so that free-running answers hold both text and images."""
    model, tok = load_checkpoint(model_dir)
    vision_start = tok.convert_tokens_to_ids("<|vision_start|>")

    def draw_sometimes(module, args, logits):
        out = logits.clone()
        out[..., vision_start] = torch.where(logits.argmax(-1) % 2 == 0, logits.max(-1).values + 1.0,
                                             logits[..., vision_start])
        return out

    return model, tok, draw_sometimes


# ------------------------------------------------------------------------------------------- inputs


def _picture(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[...] = colour
    a[: size[1] // 2, : size[0] // 3] = 255 - np.array(colour, np.uint8)
    Image.fromarray(a).save(path)
    return path


def make_input(bench: str, root: Path) -> dict:
    """The benchmark's input in its own format: {"prompts", "images" (or None), "expect"}."""
    root.mkdir(parents=True, exist_ok=True)
    if bench == "geneval":
        rows = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
                {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}],
                 "prompt": "a photo of a red cat"},
                {"tag": "counting", "include": [{"class": "car", "count": 3}],
                 "exclude": [{"class": "car", "count": 4}], "prompt": "a photo of three cars"}]
        p = root / "evaluation_metadata.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"prompts": p, "images": None, "expect": rows}
    if bench == "dpg":
        d = root / "prompts"
        d.mkdir()
        prompts = {"partiprompts12": "A red circle above a blue square.", "7": "Two green triangles."}
        for k, v in prompts.items():
            (d / f"{k}.txt").write_text(v)
        return {"prompts": d, "images": None, "expect": prompts}
    if bench == "imgedit":
        src = root / "origin"
        _picture(src / "animal" / "000342021.jpg", (24, 16), (200, 30, 30))
        _picture(src / "style" / "000278574.jpg", (16, 16), (30, 30, 200))
        edits = {"1082": {"id": "animal/000342021.jpg", "prompt": "Make the shape blue.", "edit_type": "adjust"},
                 "673": {"id": "style/000278574.jpg", "prompt": "Turn it into a drawing.", "edit_type": "style"},
                 "5": {"id": "animal/000342021.jpg", "prompt": "Remove the square.", "edit_type": "remove"}}
        p = root / "basic_edit.json"
        p.write_text(json.dumps(edits, indent=4))
        return {"prompts": p, "images": src, "expect": edits}
    if bench == "gedit":
        rows = []
        for n, (task, lang, size) in enumerate([(GEDIT_GROUPS[0], "en", (40, 24)), (GEDIT_GROUPS[1], "en", (16, 16)),
                                                (GEDIT_GROUPS[1], "cn", (20, 28))]):
            img = _picture(root / "images" / f"{n}.png", size, (40 * n, 120, 90))
            rows.append({"task_type": task, "key": f"k{n}abc", "instruction": f"Change the colour, step {n}.",
                         "instruction_language": lang, "input_image": str(img.relative_to(root)),
                         "Intersection_exist": n % 2 == 0})
        p = root / "gedit.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"prompts": p, "images": None, "expect": rows}
    assert bench == "isg"
    _picture(root / "images" / "0000_q1.png", (16, 16), (10, 200, 10))
    rows = [{"id": "0000", "Category": "Prediction",
             "Query": [{"type": "text", "content": "Show what happens next."},
                       {"type": "image", "content": "images/0000_q1.png"}],
             "Golden": [{"type": "text", "content": "It grows."}, {"type": "image", "content": "images/0000_g1.png"}],
             "predict": {"structural": {"Answer": ["<gen_text1>", "<gen_img1>"]}}},
            {"id": "0001", "Category": "Style", "Query": [{"type": "text", "content": "Draw a red circle."}],
             "Golden": [{"type": "image", "content": "images/0001_g1.png"}]},
            {"id": "0002", "Category": "Style", "Query": [{"type": "text", "content": "Draw two blue squares."}],
             "Golden": [{"type": "image", "content": "images/0002_g1.png"}]}]
    p = root / "ISG-Bench.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"prompts": p, "images": None, "expect": rows}


# ------------------------------------------------------------------------------------------- the scorers' reading


def geneval_reads(imagedir: Path, rows: list[dict]) -> None:
    """evaluation/evaluate_images.py main(): digit-named folders, json.load of metadata.jsonl, samples/\\d+.png."""
    found = {}
    for subfolder in os.listdir(imagedir):
        folderpath = os.path.join(imagedir, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if not os.path.isfile(imagepath) or not re.match(r"\d+\.png", imagename):
                continue
            image = Image.open(imagepath)
            assert image.size == (R, R) and metadata["tag"] and metadata["prompt"]
            found.setdefault(subfolder, (metadata, []))[1].append(imagename)
    assert sorted(found) == [f"{i:05d}" for i in range(len(rows))]  # the N-th line in folder N
    for i, row in enumerate(rows):
        metadata, samples = found[f"{i:05d}"]
        assert metadata == row and sorted(samples) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    first = (imagedir / "00000" / "metadata.jsonl").read_text()
    assert first == json.dumps(rows[0])  # exactly one object, as diffusers_generate.py's json.dump writes it


def dpg_reads(root: Path, prompts: dict) -> None:
    """compute_dpg_bench.py: every file of the folder; id = name up to the first '.'; 4 crops of a 2R grid."""
    scored, failed = {}, []
    for fn in os.listdir(root):
        image_path = os.path.join(root, fn)
        try:
            generated_image = Image.open(image_path)
            key = os.path.basename(image_path).split(".")[0]
            assert key in prompts
            crops = [generated_image.crop(t) for t in [(0, 0, R, R), (R, 0, R * 2, R), (0, R, R, R * 2),
                                                       (R, R, R * 2, R * 2)]]
            scored[key] = (generated_image.size, [np.asarray(c.convert("RGB")) for c in crops])
        except Exception:  # the scorer prints "Failed filename" and goes on
            failed.append(fn)
    assert sorted(scored) == sorted(prompts) and failed == ["manifest.json"]
    for size, crops in scored.values():
        assert size == (2 * R, 2 * R)
        assert len({c.tobytes() for c in crops}) == 4  # four samples (four noises), not one repeated


def imgedit_reads(folder: Path, edits: dict, origin_root: Path) -> None:
    """basic_bench.py process_single_item: <folder>/<key>.png and <origin_img_root>/<id>."""
    for key, item in edits.items():
        result = Image.open(os.path.join(folder, f"{key}.png"))
        origin = Image.open(os.path.join(origin_root, item["id"]))
        ow, oh = origin.size
        w, h = result.size
        assert abs(w / h - ow / oh) < 0.34 and w * h <= R * R  # the source's aspect, the token budget's area


def gedit_reads(save_path_dir: Path, model_name: str, rows: list[dict], input_root: Path) -> None:
    """test_gedit_score.py: save_path = <save_path>/<model_name>; per GROUP, both files must exist; the edit is
    resized to the source's size."""
    save_path = os.path.join(save_path_dir, model_name)
    seen = 0
    for group_name in GEDIT_GROUPS:
        for item in (r for r in rows if r["task_type"] == group_name):
            key, lang = item["key"], item["instruction_language"]
            src = f"{save_path}/fullset/{group_name}/{lang}/{key}_SRCIMG.png"
            res = f"{save_path}/fullset/{group_name}/{lang}/{key}.png"
            assert os.path.exists(src) and os.path.exists(res), f"the scorer would skip {key}"
            pil_image_raw = Image.open(src)
            pil_image_edited = Image.open(res).convert("RGB").resize((pil_image_raw.size[0], pil_image_raw.size[1]))
            original = Image.open(input_root / item["input_image"]).convert("RGB")
            assert np.array_equal(np.asarray(pil_image_raw.convert("RGB")), np.asarray(original))
            assert pil_image_edited.size == original.size
            seen += 1
    assert seen == len(rows)


def isg_reads(answers: Path, rows: list[dict]) -> int:
    """ISG-eval.py load_data + process_item: json.loads of every line; id, Query, Golden, output; relative image
    paths joined to --root (so generated images must be absolute). Returns the images found."""
    with open(answers) as file:
        input_data = [json.loads(line) for line in file.readlines()]
    assert [d["id"] for d in input_data] == [r["id"] for r in rows]
    images = 0
    for item, row in zip(input_data, rows):
        assert item["Query"] == row["Query"] and item["Golden"] == row["Golden"] and item["Category"] == row["Category"]
        assert item["output"] is not None
        for block in item["output"]:
            assert block["type"] in ("text", "image") and isinstance(block["content"], str) and block["content"]
            if block["type"] == "image":
                assert os.path.isabs(block["content"]) and Image.open(block["content"]).size == (R, R)
                images += 1
        ["<text>" if i["type"] == "text" else "<image>" for i in item["output"]]  # evaluate_structure
    return images


def scorer_reads(bench: str, out: Path, inp: dict) -> None:
    if bench == "geneval":
        geneval_reads(out, inp["expect"])
    elif bench == "dpg":
        dpg_reads(out, inp["expect"])
    elif bench == "imgedit":
        imgedit_reads(out, inp["expect"], inp["images"])
    elif bench == "gedit":
        gedit_reads(out.parent, out.name, inp["expect"], inp["prompts"].parent)
    else:
        assert isg_reads(out / "answers.jsonl", inp["expect"]) > 0  # the hooked model drew some images


# ------------------------------------------------------------------------------------------- helpers


def _argv(bench: str, model_dir: Path, inp: dict, out: Path, *extra: str) -> list[str]:
    argv = ["eval", "--ckpt", str(model_dir), "--export", bench, "--prompts", str(inp["prompts"]), "--out", str(out),
            *FAST, *extra]
    if inp["images"] is not None:
        argv += ["--images", str(inp["images"])]
    if bench == "isg":
        argv += ["--max-images", "2", "--max-new-tokens", "5"]
    return argv


def _files(out: Path) -> dict[str, bytes]:
    """Every file of an export but the manifest, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _manifest(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return {k: v for k, v in m.items() if k != "runs"}


def _options(bench: str, model_dir: Path, inp: dict, out: Path, **kw) -> ExportOptions:
    """The ExportOptions `mogao eval` builds from `_argv`."""
    extra = {"max_images": 2, "max_new_tokens": 5} if bench == "isg" else {}
    return ExportOptions(benchmark=bench, prompts=str(inp["prompts"]), out=str(out),
                         images=None if inp["images"] is None else str(inp["images"]),
                         **{"steps": 2, "resolution": R, "cfg": 2.0, "batch_size": 3, **extra, **kw})


@pytest.fixture
def isg_hook(loaded, monkeypatch):
    """For ISG: `mogao eval` gets the hooked model (see `loaded`)."""
    model, tok, hook = loaded
    handle = model.backbone.lm_head.register_forward_hook(hook)
    monkeypatch.setattr("mogao.eval.models.load_checkpoint", lambda *a, **k: (model, tok))
    yield model, tok
    handle.remove()


# ------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("bench", ["geneval", "dpg", "imgedit", "gedit", "isg"])
def test_export_is_read_by_the_scorer_and_an_interrupted_export_resumes_to_the_same_files(
        bench, model_dir, loaded, tmp_path, monkeypatch, capsys, request):
    inp = make_input(bench, tmp_path / "input")
    if bench == "isg":
        model, tok = request.getfixturevalue("isg_hook")
    else:
        model, tok = loaded[:2]
    whole = tmp_path / "whole" / "mymodel"
    assert mogao_main(_argv(bench, model_dir, inp, whole)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    scorer_reads(bench, whole, inp)
    assert "score it with" in printed and str(whole) in printed

    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["options"]["seed"] == 0 and manifest["options"]["model"] == str(model_dir.resolve())
    assert manifest["mogao_version"] and manifest["complete"] and manifest["failures"] == []
    assert [len(it["seeds"]) for it in manifest["items"]] == [
        {"geneval": 4, "dpg": 4, "isg": 2}.get(bench, 1)] * len(inp["expect"])
    assert manifest["runs"][0]["images_per_s"] > 0 and manifest["runs"][0]["device"] == "cpu"

    # interrupted while writing its 2nd generated file (a half-written temporary left behind), then run again
    part = tmp_path / "part" / "mymodel"
    calls = {"n": 0}
    real_write = export_module.write_atomic

    def dies_on_the_second_output(path: Path, data: bytes) -> None:
        if not path.name.endswith(("manifest.json", "_SRCIMG.png", "metadata.jsonl")):
            calls["n"] += 1
            if calls["n"] == 2:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_name(f".{path.name}.tmp").write_bytes(data[: len(data) // 2])
                raise KeyboardInterrupt
        real_write(path, data)

    with monkeypatch.context() as m:
        m.setattr(export_module, "write_atomic", dies_on_the_second_output)
        with pytest.raises(KeyboardInterrupt):
            export_benchmark(model, tok, _options(bench, model_dir, inp, part), model_name=str(model_dir.resolve()))
    left = _files(part)
    assert any(k.endswith(".tmp") for k in left)
    assert len([k for k in left if not k.endswith(".tmp")]) < len(_files(whole))
    assert mogao_main(_argv(bench, model_dir, inp, part)) == 0, capsys.readouterr().err
    capsys.readouterr()
    if bench == "isg":  # the answers name their images by absolute path: the same files, in another folder
        text = (part / "answers.jsonl").read_text().replace(str(part.resolve()), str(whole.resolve()))
        (part / "answers.jsonl").write_text(text)
        for rec in (part / "items").iterdir():
            rec.write_text(rec.read_text().replace(str(part.resolve()), str(whole.resolve())))
    assert _files(part) == _files(whole)
    assert not any(p.name.endswith(".tmp") for p in part.rglob("*"))
    assert _manifest(part) == _manifest(whole)
    assert len(json.loads((part / "manifest.json").read_text())["runs"]) == 1  # (the interrupted run wrote none)


def test_seeds_not_batches_decide_the_images(model_dir, loaded, tmp_path):
    """Per-sample seeds: a batch of one gives the images of a batch of three (up to float rounding of the
    batched matmuls); another --seed gives other images; the same seed in a new folder the same bytes."""
    model, tok = loaded[:2]
    inp = make_input("geneval", tmp_path / "input")

    def run(name: str, **kw) -> dict[str, np.ndarray]:
        out = tmp_path / name
        export_benchmark(model, tok, _options("geneval", model_dir, inp, out, **kw), model_name="m")
        return {k: np.asarray(Image.open(out / k), np.int16) for k in _files(out) if k.endswith(".png")}

    three, one, again, other = run("b3"), run("b1", batch_size=1), run("again"), run("s1", seed=1)
    assert sorted(three) == sorted(one) == sorted(other) and len(three) == 12
    assert all(np.abs(three[k] - one[k]).max() <= 1 for k in three)
    assert all(np.array_equal(three[k], again[k]) for k in three)
    assert all(not np.array_equal(three[k], other[k]) for k in three)
    assert len({three[k].tobytes() for k in three}) == 12  # every sample its own noise


def test_a_failed_item_is_recorded_not_skipped(model_dir, tmp_path, capsys):
    inp = make_input("geneval", tmp_path / "input")
    rows = inp["expect"]
    rows[1] = {**rows[1], "prompt": "red circle " * 2500}  # past the tiny model's 4096 positions
    inp["prompts"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert mogao_main(_argv("geneval", model_dir, inp, out)) == 1
    err = capsys.readouterr().err
    assert "FAILED 00001" in err and "context" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and {f["key"] for f in manifest["failures"]} == {"00001"}
    assert sorted(f["sample"] for f in manifest["failures"]) == [0, 1, 2, 3]
    assert all(f["files"] and "context" in f["error"] for f in manifest["failures"])
    assert not (out / "00001" / "samples").exists() and len(list((out / "00000" / "samples").iterdir())) == 4
    assert len(list((out / "00002" / "samples").iterdir())) == 4  # (its batch-mates made it, alone)


@pytest.mark.parametrize("bench, content, named", [
    ("geneval", '{"tag": "a", "include": [], "prompt": "ok"}\n{"tag": "a", "prompt": \n', ":2: not JSON"),
    ("geneval", '{"tag": "a", "include": [], "prompt": "ok"}\n\n{"tag": "a", "include": [], "prompt": "x"}\n',
     ":2: blank line"),
    ("geneval", '{"tag": "a", "include": []}\n', "field 'prompt'"),
    ("imgedit", '{"1": {"id": "missing.jpg", "prompt": "p", "edit_type": "add"}}',
     "field '1.id': image file not found"),
    ("imgedit", '{"../x": {"id": "a.png", "prompt": "p", "edit_type": "add"}}', "cannot be a file name"),
    ("gedit", '{"task_type": "color_alter", "key": "a/b", "instruction": "x", "instruction_language": "en", '
              '"input_image": "a.png"}\n', ":1: field 'key'"),
    ("gedit", '[{"task_type": "color_alter", "key": "k", "instruction": "  ", "instruction_language": "en", '
              '"input_image": "a.png"}]', "field '[0].instruction'"),
    ("isg", '{"id": "0", "Category": "c", "Query": [{"type": "video", "content": "x"}]}\n', ":1: field 'Query[0]'"),
    ("isg", '{"id": "0", "Category": "c", "Query": [{"type": "text", "content": "a"}]}\n'
            '{"id": "0", "Category": "c", "Query": [{"type": "text", "content": "b"}]}\n', "appears twice"),
])
def test_bad_input_is_named_by_file_line_and_field(bench, content, named, model_dir, tmp_path, capsys):
    _picture(tmp_path / "a.png", (8, 8), (1, 2, 3))
    name = {"geneval": "evaluation_metadata.jsonl", "imgedit": "basic_edit.json", "isg": "ISG-Bench.jsonl",
            "gedit": "rows.json" if content.startswith("[") else "rows.jsonl"}[bench]
    path = tmp_path / name
    path.write_text(content)
    inp = {"prompts": path, "images": tmp_path if bench == "imgedit" else None}
    assert mogao_main(_argv(bench, model_dir, inp, tmp_path / "out")) != 0
    err = capsys.readouterr().err
    assert "mogao: error:" in err and named in err and str(path) in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_bad_arguments_and_a_foreign_folder_are_refused(model_dir, tmp_path, capsys):
    inp = make_input("geneval", tmp_path / "input")
    dpg = make_input("dpg", tmp_path / "dpg")
    cases = [
        (["--export", "parti"], "--export 'parti' is unknown"),
        (["--export", "dpg", "--prompts", str(dpg["prompts"]), "--samples", "2"], "2 x 2 grid"),
        (["--export", "dpg", "--prompts", str(inp["prompts"])], "not a folder"),
        (["--export", "imgedit", "--prompts", str(inp["prompts"])], "needs --images"),
        (["--resolution", "18"], "multiple of the model's VAE patch (4 pixels)"),
        (["--suite", "shapes"], "--suite"),
    ]
    for extra, named in cases:
        argv = ["eval", "--ckpt", str(model_dir), "--export", "geneval", "--prompts", str(inp["prompts"]),
                "--out", str(tmp_path / "o"), *FAST[:2], *extra]
        assert mogao_main(argv) == 2
        assert named in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert mogao_main(_argv("geneval", model_dir, inp, foreign)) == 2
    assert "holds no export manifest" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    assert mogao_main(_argv("geneval", model_dir, inp, out, "--limit", "1")) == 0
    assert "incomplete" in capsys.readouterr().err and sorted(os.listdir(out)) == ["00000", "manifest.json"]
    assert mogao_main(_argv("geneval", model_dir, inp, out, "--seed", "4")) == 2  # another export's folder
    assert "seed: 0 then, 4 now" in capsys.readouterr().err
    assert mogao_main(["eval", "--ckpt", str(model_dir), "--prompts", "x"]) == 2  # a suite flag only for --export
    assert "--prompts belongs to --export" in capsys.readouterr().err


def test_reading_the_inputs_raises_the_project_errors(tmp_path):
    from mogao.eval.scorer_layouts import read_benchmark

    with pytest.raises(ConfigError, match="does not exist"):
        read_benchmark("geneval", tmp_path / "nope.jsonl")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.b.txt").write_text("two dots")
    with pytest.raises(DataError, match="first '.'"):
        read_benchmark("dpg", tmp_path / "d")
    (tmp_path / "d" / "a.b.txt").unlink()
    (tmp_path / "d" / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty.txt"):
        read_benchmark("dpg", tmp_path / "d")


def test_bagels_guidance_is_an_export_option_and_is_recorded(model_dir, tmp_path):
    """`--cfg-mode bagel` (what a BAGEL model's published scores use) exports with BAGEL's guidance, which draws
    other images than mogao's from the same seeds, and the manifest says which guidance made them."""
    import shutil

    from mogao.model.io import load_model

    model = load_model(model_dir)  # (a fresh velocity head is zero: every guidance would draw the same)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.latent_proj.proj_out.weight, std=0.5)
    moving = tmp_path / "model"
    model.save_pretrained(moving)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, moving / f.name)
    inp = make_input("geneval", tmp_path / "input")
    outs = {}
    for mode in ("mogao", "bagel"):
        out = outs[mode] = tmp_path / mode
        assert mogao_main(_argv("geneval", moving, inp, out, "--limit", "1", "--samples", "1",
                                "--cfg-mode", mode, "--cfg-renorm-type", "channel")) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert json.dumps(manifest).count(mode) >= 1 and "channel" in json.dumps(manifest)
    a, b = ((outs[m] / "00000" / "samples" / "0000.png").read_bytes() for m in ("mogao", "bagel"))
    assert a != b
