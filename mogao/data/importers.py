"""Convert other data set layouts to the JSONL sample format (DESIGN §3).

    llava_to_samples(FILE.json)   LLaVA / ShareGPT-style chat with `<image>` placeholders, both conventions:
        [{"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", ...}],
          "images": ["a.png"]}, ...]
        [{"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}],
          "image": "a.png"}, ...]
      user (human) and system turns become text without loss, assistant (gpt) turns text with loss; each
      `<image>` becomes a condition image, the sample's images taken in order (with no placeholder, the images
      go before the first turn).
    captions_to_samples(DIR)      a folder of image + caption pairs (cat.png + cat.txt): text-to-image samples,
      the caption then the image as a generation target.

Image paths in the output are relative to the output file. Problems raise `DataError` naming the file, the
record (as `line`, 1-based) and the field - the same errors the JSONL loader gives, whatever the input holds
(bytes that are not UTF-8, JSON nested too deeply, integers too long to convert). A chat file larger than
`max_file_bytes` (default `MAX_IMPORT_BYTES`) or a caption larger than `max_caption_bytes` is refused, naming
the limit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mogao.data.samples import _check_unicode, _parse_line
from mogao.errors import DataError

IMAGE_TOKEN = "<image>"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_USER_ROLES = {"user", "human", "system"}
_ASSISTANT_ROLES = {"assistant", "gpt", "model"}
MAX_IMPORT_BYTES = 4 * 2**30  # a chat JSON list is parsed in memory as a whole
MAX_CAPTION_BYTES = 2**20


def _check_size(path: Path, limit: int, what: str, flag: str) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}", file=str(path)) from e
    if size > limit:
        raise DataError(f"{what} ({size} bytes) is larger than the limit of {limit} bytes; if it really is "
                        f"that large, raise the limit ({flag})", file=str(path))


def _rel(image: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(image.resolve(), out_dir.resolve())).as_posix()


def _turns(record: dict[str, Any], where: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """(field name, [(role, text), ...]) of a chat record in either convention."""
    if "messages" in record:
        key, role_key, text_key = "messages", "role", "content"
    elif "conversations" in record:
        key, role_key, text_key = "conversations", "from", "value"
    else:
        raise DataError("a record needs 'messages' (role/content) or 'conversations' (from/value)", **where)
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"'{key}' must be a non-empty list of turns", field=key, **where)
    out = []
    for i, t in enumerate(turns):
        field = f"{key}[{i}]"
        if not isinstance(t, dict) or role_key not in t or text_key not in t:
            raise DataError(f"a turn must be an object with '{role_key}' and '{text_key}'", field=field, **where)
        role, text = t[role_key], t[text_key]
        if role not in _USER_ROLES | _ASSISTANT_ROLES:
            raise DataError(f"unknown role {role!r}; expected one of {sorted(_USER_ROLES | _ASSISTANT_ROLES)}",
                            field=f"{field}.{role_key}", **where)
        if not isinstance(text, str):
            raise DataError(f"'{text_key}' must be a string, got {type(text).__name__}", field=f"{field}.{text_key}",
                            **where)
        _check_unicode(text, f"'{text_key}'", where, f"{field}.{text_key}")
        out.append((role, text))
    return key, out


def _images(record: dict[str, Any], where: dict[str, Any]) -> list[str]:
    raw = record.get("images", record.get("image", []))
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise DataError("'images' must be a list of image paths (or 'image' one path)", field="images", **where)
    for i, x in enumerate(raw):
        _check_unicode(x, "the image path", where, f"images[{i}]")
        if "\0" in x:
            raise DataError("the image path contains a NUL character", field=f"images[{i}]", **where)
    return raw


def llava_record_to_sample(record: Any, *, image_root: Path, out_dir: Path, file: str, index: int) -> dict[str, Any]:
    """One chat record -> one sample dict (image paths relative to `out_dir`)."""
    where: dict[str, Any] = {"file": file, "line": index}
    if not isinstance(record, dict):
        raise DataError(f"a record must be an object, got {type(record).__name__}", **where)
    key, turns = _turns(record, where)
    images = _images(record, where)
    paths = [_rel(image_root / p, out_dir) for p in images]
    placeholders = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if placeholders and placeholders != len(paths):
        raise DataError(f"{placeholders} '{IMAGE_TOKEN}' placeholder(s) but {len(paths)} image(s); give one image "
                        "per placeholder", field=key, **where)
    segments: list[dict[str, Any]] = []
    if not placeholders:
        segments += [{"image": p} for p in paths]
    queue = list(paths)
    for role, text in turns:
        loss = role in _ASSISTANT_ROLES
        for j, piece in enumerate(text.split(IMAGE_TOKEN)):
            if j > 0:
                segments.append({"image": queue.pop(0)})
            piece = piece.strip()
            if piece:
                segments.append({"text": piece, "loss": loss})
    if not any(s.get("loss") for s in segments):
        raise DataError("no assistant turn: nothing to learn from this record", field=key, **where)
    sid = record.get("id")
    if sid is not None and (isinstance(sid, bool) or not isinstance(sid, (str, int))):
        raise DataError(f"'id' must be a string or an integer, got {type(sid).__name__}", field="id", **where)
    if isinstance(sid, str):
        _check_unicode(sid, "'id'", where, "id")
    return {"id": str(sid) if sid not in (None, "") else f"{Path(file).stem}-{index}", "segments": segments}


def llava_to_samples(path: str | Path, out: str | Path,
                     max_file_bytes: int = MAX_IMPORT_BYTES) -> list[dict[str, Any]]:
    """Read a LLaVA/ShareGPT-style JSON list (or JSONL) of chat records; image paths are taken relative to the
    input file's folder and written relative to `out`'s folder."""
    path, out_dir = Path(path), Path(out).parent
    _check_size(path, max_file_bytes, "the chat file", "--max-file-bytes")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}", file=str(path)) from e
    try:
        records = _parse_line(data, 1, str(path))  # the whole file as one JSON value
    except DataError as whole:
        if "invalid JSON" not in whole.message or "nested too deeply" in whole.message:
            raise
        records = []  # maybe JSONL: one record a line, each with the loader's errors
        for n, line in enumerate(data.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(_parse_line(line, n, str(path)))
                except DataError as e:
                    raise DataError(f"{e.message} (neither a JSON list nor JSONL)", file=str(path),
                                    line=n) from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise DataError("expected a JSON list of chat records", file=str(path))
    return [llava_record_to_sample(r, image_root=path.parent, out_dir=out_dir, file=str(path), index=i + 1)
            for i, r in enumerate(records)]


def captions_to_samples(directory: str | Path, out: str | Path,
                        max_caption_bytes: int = MAX_CAPTION_BYTES) -> list[dict[str, Any]]:
    """Every image in `directory` (recursively, sorted) with a caption file of the same stem (`.txt`) -> a
    text-to-image sample. An image without a caption, or an empty caption, is a `DataError`; so is an image or
    caption that is a link to a file outside the folder (a folder from elsewhere cannot make us read, or copy
    into the samples, a file it does not hold)."""
    d, out_dir = Path(directory), Path(out).parent
    if not d.is_dir():
        raise DataError(f"caption folder not found: {d}", file=str(d))
    root = d.resolve()

    def inside(p: Path) -> None:
        if not p.resolve().is_relative_to(root):
            raise DataError(f"{p.name} is a link to {p.resolve()}, outside the caption folder; copy the file into "
                            "the folder if you mean to use it", file=str(p))
    samples = []
    images = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {d}", file=str(d))
    for img in images:
        cap = img.with_suffix(".txt")
        if not cap.is_file():
            raise DataError(f"image {img.name} has no caption file {cap.name}; add one or remove the image",
                            file=str(img))
        inside(img)
        inside(cap)
        _check_size(cap, max_caption_bytes, "the caption", "--max-caption-bytes")
        try:
            text = cap.read_bytes().decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8 text: {e.reason} at byte {e.start + 1}; save the caption as UTF-8",
                            file=str(cap)) from None
        except OSError as e:
            raise DataError(f"cannot read {cap}: {e.strerror or e}", file=str(cap)) from e
        if not text:
            raise DataError("empty caption", file=str(cap))
        sid = img.relative_to(d).with_suffix("").as_posix()
        samples.append({"id": sid, "segments": [{"text": text, "loss": False},
                                                {"image": _rel(img, out_dir), "generate": True}]})
    return samples


def write_jsonl(samples: list[dict[str, Any]], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return out
