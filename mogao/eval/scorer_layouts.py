"""The official scorers' file layouts: how `mogao eval --export` reads a benchmark's own input file, and where
each output goes so that the benchmark's scorer finds it. The facts, from each scorer's code:

- geneval (djghosh13/geneval): input `evaluation_metadata.jsonl`, one JSON object a line (`tag`, `include`,
  `prompt`, ...). `evaluation/evaluate_images.py` lists the image folder, keeps the sub-folders whose name is
  all digits, `json.load`s their `metadata.jsonl` (so: exactly one object) and scores every file of `samples/`
  whose name matches `\\d+\\.png`. Written: `00000/metadata.jsonl` (the prompt's object as `json.dump` writes
  it, as the repository's `generation/diffusers_generate.py` does) and `00000/samples/0000.png`, ... (the
  README's layout; 4 samples by default).
- dpg (TencentQQGYLab/ELLA, `dpg_bench/`): input the folder of `<id>.txt` prompts. `compute_dpg_bench.py`
  scores every file of the image folder, takes the prompt id as the file name up to its first '.', and crops
  the cells (0,0,R,R), (R,0,2R,R), (0,R,R,2R), (R,R,2R,2R) of a 2R x 2R grid (`--resolution R --pic-num 4`).
  Written: `<id>.png`, samples 0-3 in that order.
- imgedit (PKU-YuanGroup/ImgEdit, `Benchmark/Basic/`): input `basic_edit.json` (`{key: {id, prompt,
  edit_type}}`) and the root of the source images; `basic_bench.py` reads `<result folder>/<key>.png` and
  `<origin_img_root>/<id>`. Written: `<key>.png`.
- gedit (stepfun-ai/Step1X-Edit, `GEdit-Bench/`): input a local copy of the data set's rows (JSONL, or a JSON
  list) with `task_type`, `key`, `instruction`, `instruction_language` and `input_image`, a path relative to
  the file (the data set is published on the Hugging Face hub; save its rows and images locally).
  `test_gedit_score.py` reads `<save_path>/<model_name>/fullset/<task_type>/<language>/<key>.png` and
  `<key>_SRCIMG.png` and resizes the edit to the source's size. Written: both, in the export folder
  (= `<save_path>/<model_name>`).
- isg (Dongping-Chen/ISG): input `ISG-Bench.jsonl` (`id`, `Category`, `Query`, `Golden`, ...), query images
  relative to its folder. `ISG-eval.py` json-loads every line of its `--input_file`, reads `id`, `Query`,
  `Golden` and `output` of each line (so the input row's fields must be kept) and joins relative image paths
  to its `--root`; it judges lines [--start:--end], and its default end, -1, leaves out the last line.
  Written: `answers.jsonl` (its judged copy is named by replacing ".jsonl", so the name must end so), each
  input row with `output` = [{"type": "text" | "image", "content": text or absolute image path}] added; the
  images in `images/`.

Keys that become file names must be plain names (no path separator, not '.'-led, no control characters):
an input file can never make the export write outside its folder.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mogao.errors import ConfigError, DataError
from mogao.inference.inputs import check_prompt

BENCHMARKS: tuple[str, ...] = ("geneval", "dpg", "imgedit", "gedit", "isg")
DEFAULT_SAMPLES: dict[str, int] = {"geneval": 4, "dpg": 4, "imgedit": 1, "gedit": 1, "isg": 1}
ISG_ANSWERS = "answers.jsonl"
_MAX_NAME = 200


@dataclass(frozen=True)
class ImageFile:
    """One image file of the layout: `path` (relative to the export folder, '/'-separated) is made of the
    item's `samples` - one sample, or DPG-Bench's 2 x 2 grid of four in reading order."""

    path: str
    samples: tuple[int, ...]

    @property
    def grid(self) -> bool:
        return len(self.samples) > 1


@dataclass
class Item:
    """One prompt of a benchmark and what the export writes for it.

    key: the benchmark's id of the item; per-sample seeds derive from it.
    turn: the user turn given to the model (`{"text": ...}` / `{"image": path}` segments).
    samples: images to generate (interleaved items: 1 answer).
    files: the image files made of those samples (none for interleaved items, whose images the model decides).
    texts: files written as they are (GenEval's `metadata.jsonl`).
    copies: files that are a PNG copy of an input image (GEdit-Bench's source image).
    source: the condition image of an edit (the output keeps its aspect ratio).
    row: an interleaved item's input row, copied into its answer line.
    """

    key: str
    turn: list[dict[str, Any]]
    samples: int = 1
    files: list[ImageFile] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    copies: dict[str, Path] = field(default_factory=dict)
    source: Path | None = None
    row: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------- input checks


def _text(value: Any, file: Path, line: int | None, name: str) -> str:
    try:
        return check_prompt(value, f"'{name}'")
    except ConfigError as e:
        raise DataError(str(e), file=str(file), line=line, field=name) from None


def _name(value: Any, file: Path, line: int | None, name: str) -> str:
    """`value` as a plain file name: what a key becomes in the output layout."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {type(value).__name__}", file=str(file), line=line, field=name)
    bad = (not value or value in (".", "..") or value.startswith(".") or len(value) > _MAX_NAME
           or any(c in value for c in "/\\\0") or any(unicodedata.category(c)[0] == "C" for c in value))
    if bad:
        raise DataError(f"{value!r:.80} cannot be a file name (it names an output file): give a non-empty name "
                        f"of at most {_MAX_NAME} characters without '/', '\\', control characters or a leading '.'",
                        file=str(file), line=line, field=name)
    return value


def _image_path(value: Any, base: Path, file: Path, line: int | None, name: str) -> Path:
    """An input image named in the file: relative to `base`, or absolute; it must exist."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"must be an image path (a non-empty string), got {value!r:.80}", file=str(file), line=line,
                        field=name)
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise DataError(f"image file not found: {path}", file=str(file), line=line, field=name)
    return path


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' is not a file; give the benchmark's own input file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=str(path)) from None


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every line; a blank line may only end the file."""
    lines = _read_text(path, "--prompts").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            raise DataError("blank line (the scorer reads one JSON object a line; remove it)", file=str(path), line=n)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"not JSON: {e.msg} at column {e.colno}", file=str(path), line=n) from None
        except RecursionError:
            raise DataError("JSON nested too deeply", file=str(path), line=n) from None
        if not isinstance(obj, dict):
            raise DataError(f"must be a JSON object, got {type(obj).__name__}", file=str(path), line=n)
        rows.append((n, obj))
    if not rows:
        raise DataError("holds no rows", file=str(path))
    return rows


def _json(path: Path) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise DataError(f"key {k!r:.80} appears twice (only the last would count)", file=str(path))
            seen[k] = v
        return seen

    try:
        return json.loads(_read_text(path, "--prompts"), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise DataError(f"not JSON: {e.msg} at column {e.colno}", file=str(path), line=e.lineno) from None
    except RecursionError:
        raise DataError("JSON nested too deeply", file=str(path)) from None


def _no_repeats(keys: list[tuple[Any, int | None]], path: Path, what: str) -> None:
    first: dict[Any, int | None] = {}
    for k, line in keys:
        if k in first:
            at = f" (first at line {first[k]})" if first[k] is not None else ""
            raise DataError(f"{what} {k!r:.120} appears twice{at}; each output file can hold one answer",
                            file=str(path), line=line)
        first[k] = line


# ------------------------------------------------------------------------------------------- the benchmarks


def read_geneval(path: Path, samples: int) -> list[Item]:
    items = []
    for index, (line, row) in enumerate(_jsonl(path)):
        _text(row.get("prompt"), path, line, "prompt")
        for name, kind in (("tag", str), ("include", list)):
            if not isinstance(row.get(name), kind):
                raise DataError(f"must be a {'string' if kind is str else 'list'} (GenEval's scorer reads it), got "
                                f"{row.get(name)!r:.80}", file=str(path), line=line, field=name)
        key = f"{index:05d}"
        items.append(Item(key, [{"text": row["prompt"]}], samples,
                          [ImageFile(f"{key}/samples/{s:04d}.png", (s,)) for s in range(samples)],
                          texts={f"{key}/metadata.jsonl": json.dumps(row)}))
    return items


def read_dpg(folder: Path, samples: int) -> list[Item]:
    if not folder.is_dir():
        raise ConfigError(f"--prompts '{folder}' is not a folder; DPG-Bench's input is its folder of <id>.txt "
                          "prompts (dpg_bench/prompts)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
    if not files:
        raise ConfigError(f"--prompts '{folder}' holds no .txt prompt files")
    _no_repeats([(p.stem, None) for p in files], folder, "prompt id")
    items = []
    for p in files:
        key = _name(p.stem, p, None, "file name")
        if "." in key:
            raise DataError("DPG-Bench's scorer takes the prompt id as the file name up to its first '.'; rename "
                            "the file without dots", file=str(p))
        text = _text(_read_text(p, "prompt file").strip(), p, None, "prompt")
        items.append(Item(key, [{"text": text}], samples, [ImageFile(f"{key}.png", tuple(range(samples)))]))
    return items


def read_imgedit(path: Path, images: Path | None) -> list[Item]:
    if images is None:
        raise ConfigError("--export imgedit needs --images DIR: the root of ImgEdit's source images (the "
                          "scorer's --origin_img_root), where each entry's 'id' is found")
    data = _json(path)
    if not isinstance(data, dict) or not data:
        raise DataError("must be a JSON object {key: {id, prompt, edit_type}} (ImgEdit's basic_edit.json)",
                        file=str(path))
    items = []
    for key, entry in data.items():
        where = f"[{key!r:.80}]"
        key = _name(key, path, None, "key")
        if not isinstance(entry, dict):
            raise DataError(f"{where} must be an object with id, prompt, edit_type", file=str(path))
        for name in ("id", "edit_type"):
            if not isinstance(entry.get(name), str) or not entry[name]:
                raise DataError(f"{where} must have a non-empty string '{name}'", file=str(path), field=name)
        prompt = _text(entry.get("prompt"), path, None, f"{key}.prompt")
        source = _image_path(entry["id"], images, path, None, f"{key}.id")
        items.append(Item(key, [{"image": source}, {"text": prompt}], 1, [ImageFile(f"{key}.png", (0,))],
                          source=source))
    return items


def read_gedit(path: Path, images: Path | None) -> list[Item]:
    if path.suffix.lower() == ".json":
        data = _json(path)
        if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
            raise DataError("must be a JSON list of row objects (or give a JSONL file, one row a line)",
                            file=str(path))
        rows: list[tuple[int | None, dict[str, Any]]] = [(None, r) for r in data]
    else:
        rows = list(_jsonl(path))
    base = images if images is not None else path.parent
    items, keys = [], []
    for i, (line, row) in enumerate(rows):
        pre = "" if line is not None else f"[{i}]."  # (rows of a JSON list are named by their index)
        task, lang, key = (_name(row.get(f), path, line, pre + f) for f in ("task_type", "instruction_language", "key"))
        instruction = _text(row.get("instruction"), path, line, pre + "instruction")
        source = _image_path(row.get("input_image"), base, path, line, pre + "input_image")
        keys.append(((task, lang, key), line))
        stem = f"fullset/{task}/{lang}/{key}"
        items.append(Item(f"{task}/{lang}/{key}", [{"image": source}, {"text": instruction}], 1,
                          [ImageFile(f"{stem}.png", (0,))], copies={f"{stem}_SRCIMG.png": source}, source=source))
    _no_repeats(keys, path, "(task_type, instruction_language, key)")
    return items


def read_isg(path: Path, images: Path | None) -> list[Item]:
    base = images if images is not None else path.parent
    items, keys = [], []
    for line, row in _jsonl(path):
        key = _name(row.get("id"), path, line, "id")
        if not isinstance(row.get("Category"), str):
            raise DataError("must be a string (ISG's summary groups by it)", file=str(path), line=line,
                            field="Category")
        query = row.get("Query")
        if not isinstance(query, list) or not query:
            raise DataError("must be a non-empty list of {type, content} blocks", file=str(path), line=line,
                            field="Query")
        turn: list[dict[str, Any]] = []
        for j, block in enumerate(query):
            name = f"Query[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                turn.append({"text": _text(block.get("content"), path, line, f"{name}.content")})
            elif kind == "image":
                turn.append({"image": _image_path(block.get("content"), base, path, line, f"{name}.content")})
            else:
                raise DataError(f"must be {{'type': 'text' | 'image', 'content': ...}}, got {block!r:.80}",
                                file=str(path), line=line, field=name)
        keys.append((key, line))
        items.append(Item(key, turn, 1, row=row))
    _no_repeats(keys, path, "id")
    return items


def read_benchmark(benchmark: str, prompts: str | Path, images: str | Path | None = None,
                   samples: int | None = None) -> list[Item]:
    """The items of a benchmark's input (`prompts`: its file, or DPG-Bench's folder), checked: bad input raises
    DataError naming the file, line (key for JSON objects) and field; `images`: the root of input images
    (ImgEdit: required; GEdit-Bench, ISG-Bench: default the input file's folder)."""
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"--export {benchmark!r} is unknown; valid benchmarks: {', '.join(BENCHMARKS)}")
    n = DEFAULT_SAMPLES[benchmark] if samples is None else samples
    if benchmark == "dpg" and n != 4:
        raise ConfigError(f"--samples {n}: DPG-Bench's layout is a 2 x 2 grid of 4 samples per prompt")
    if benchmark in ("imgedit", "gedit", "isg") and n != 1:
        raise ConfigError(f"--samples {n}: {benchmark}'s scorer reads one answer per item; leave --samples out")
    if n < 1:
        raise ConfigError(f"--samples {n} is invalid; give a number >= 1")
    path = Path(prompts).expanduser()
    root = None if images is None else Path(images).expanduser()
    if root is not None and not root.is_dir():
        raise ConfigError(f"--images '{root}' is not a folder")
    if not path.exists():
        raise ConfigError(f"--prompts '{path}' does not exist; give the benchmark's own input file")
    if benchmark == "geneval":
        return read_geneval(path, n)
    if benchmark == "dpg":
        return read_dpg(path, n)
    if benchmark == "imgedit":
        return read_imgedit(path, root)
    if benchmark == "gedit":
        return read_gedit(path, root)
    return read_isg(path, root)


def input_digest(prompts: str | Path) -> str:
    """sha256 of the input file (of a folder: of its .txt files' names and contents), to tell a changed input."""
    path = Path(prompts).expanduser()
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.iterdir() if q.suffix.lower() == ".txt" and q.is_file()):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def scorer_commands(benchmark: str, out: Path, *, prompts: Path, images: Path | None, resolution: int,
                    items: int) -> list[str]:
    """The commands that score an export of `items` items, run in a checkout of the benchmark's repository (its
    environment, models and keys set up as its README says)."""
    q = shlex.quote
    o = q(str(out))
    if benchmark == "geneval":
        res = q(str(out.parent / f"{out.name}_geneval_results.jsonl"))
        return [f"python evaluation/evaluate_images.py {o} --outfile {res} --model-path <OBJECT_DETECTOR_FOLDER>",
                f"python evaluation/summary_scores.py {res}"]
    if benchmark == "dpg":
        return [f"bash dpg_bench/dist_eval.sh {o} {resolution}    # = accelerate launch dpg_bench/compute_dpg_bench.py "
                f"--image-root-path {o} --resolution {resolution} --pic-num 4 --vqa-model mplug"]
    if benchmark == "imgedit":
        return [f"python Benchmark/Basic/basic_bench.py --result_img_folder {o} --edit_json {q(str(prompts))} "
                f"--origin_img_root {q(str(images))} --num_processes 4 --prompts_json <JUDGE_PROMPTS_JSON>",
                f"python Benchmark/Basic/step1_get_avgscore.py --result_json {q(str(out / 'result.json'))} "
                "--average_score_json average_score.json",
                f"python Benchmark/Basic/step2_typescore.py --average_score_json average_score.json "
                f"--typescore_json typescore.json --basic_edit {q(str(prompts))}"]
    if benchmark == "gedit":
        parent, name = q(str(out.parent)), q(out.name)
        return [f"cd GEdit-Bench && python test_gedit_score.py --save_path {parent} --model_name {name} "
                "--backbone gpt4o",
                f"python calculate_statistics.py --save_path {parent} --model_name {name} --backbone gpt4o "
                "--language en"]
    root = q(str(images if images is not None else prompts.parent))
    # (ISG-eval.py judges input lines [start:end], and its default end, -1, leaves out the last line)
    judged = out / ISG_ANSWERS.replace(".jsonl", f"_0_{items}_judge.jsonl")
    return [f"python ISG-eval.py --input_file {q(str(out / ISG_ANSWERS))} --GT_file {q(str(prompts))} --root {root} "
            f"--start 0 --end {items}",
            f"python calculate_performance.py --input_file {q(str(judged))} --GT_file {q(str(prompts))}"]
