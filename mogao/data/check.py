"""Validate a JSONL data set or a prepared folder, summarise it, and write a cleaned copy without the bad samples.

    summary = summarise(path, tokenizer=None)   # counts, histograms and every problem (file, line, field)
    fix(path, out=None)                          # the good lines -> a new file; a report of what was dropped

`summarise` takes a JSONL file or a folder made by `mogao data prepare` (every stored image decoded again; the
lines left out when it was prepared are listed from its manifest). `fix` works on JSONL files.

The original file is never modified, and `fix` reads it one line at a time (never every line at once).
`printable` escapes what came from a data file (paths, text) before it reaches a terminal.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mogao.data.images import MAX_IMAGE_BYTES, open_image_file
from mogao.data.samples import (
    MAX_FILE_BYTES,
    MAX_LINE_BYTES,
    ImageSegment,
    Sample,
    TextSegment,
    iter_lines,
    iter_samples,
)
from mogao.errors import DataError
from mogao.errors import printable as printable  # (importable from here too)


@dataclass
class Summary:
    """What `mogao data check` prints: counts over the valid samples and every problem found."""

    path: str
    samples: int = 0
    images: int = 0
    targets: int = 0
    text_tokens: int | None = None
    images_per_sample: Counter = field(default_factory=Counter)
    resolutions: Counter = field(default_factory=Counter)
    problems: list[DataError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.samples} samples, {self.images} images ({self.targets} generation targets), "
               + (f"{len(self.problems)} problem(s)" if self.problems else "no problems")]
        if self.text_tokens is not None:
            out.append(f"  text tokens: {self.text_tokens}")
        if self.images_per_sample:
            out.append("  images per sample: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.images_per_sample.items())))
        if self.resolutions:
            top = self.resolutions.most_common(8)
            rest = sum(self.resolutions.values()) - sum(v for _, v in top)
            out.append("  resolutions (WxH): " + ", ".join(f"{k}: {v}" for k, v in top)
                       + (f", other: {rest}" if rest else ""))
        return out + [f"  {n}" for n in self.notes]


def _image_size(seg: ImageSegment, max_image_bytes: int = MAX_IMAGE_BYTES) -> str:
    if isinstance(seg.image, Image.Image):
        w, h = seg.image.size
    elif isinstance(seg.image, (str, Path)):  # (a regular file within the limit only: never a FIFO or device)
        with open_image_file(seg.image, max_bytes=max_image_bytes) as f, Image.open(f) as img:
            w, h = img.size
    else:
        with Image.open(seg.image) as img:
            w, h = img.size
    return f"{w}x{h}"


def summarise(path: str | Path, tokenizer: Any | None = None, check_images: bool = True,
              max_line_bytes: int = MAX_LINE_BYTES, max_file_bytes: int = MAX_FILE_BYTES,
              max_image_bytes: int = MAX_IMAGE_BYTES) -> Summary:
    """Read every line of `path`; count the valid samples' images, targets, (with a tokenizer) text tokens, and
    histogram images per sample and image resolutions; collect every problem. A prepared folder is read row by
    row (see `summarise_prepared`)."""
    if Path(path).expanduser().is_dir():
        return summarise_prepared(path, tokenizer, check_images)
    s = Summary(str(path))
    for item in iter_samples(path, check_images=check_images, max_line_bytes=max_line_bytes,
                             max_file_bytes=max_file_bytes, max_image_bytes=max_image_bytes):
        if isinstance(item, DataError):
            s.problems.append(item)
            continue
        _count(s, item, tokenizer, max_image_bytes)
    return s


def summarise_prepared(path: str | Path, tokenizer: Any | None = None, check_images: bool = True) -> Summary:
    """`summarise` for a folder made by `mogao data prepare`: every row read and (with `check_images`) every
    stored image decoded again; the lines left out when it was prepared are reported from its manifest."""
    from mogao.data.images import open_image, to_rgb
    from mogao.data.prepared import PreparedSamples

    data = PreparedSamples(path)
    s = Summary(str(path))
    man = data.manifest
    s.notes.append(f"prepared from {man['source']}: {man['bad']} bad line(s) left out then, "
                   f"{len(man['shards'])} shard(s)")
    s.notes += [f"  left out: {p}" for p in man["problems"][:20]]
    for sample in data.checked():
        if isinstance(sample, DataError):  # a malformed row (it names its shard and row)
            s.problems.append(sample)
            continue
        if check_images:
            bad = None
            for i, seg in enumerate(sample.segments):
                if isinstance(seg, ImageSegment):
                    try:
                        to_rgb(open_image(seg.image, file=sample.file, line=sample.line,
                                          field=f"segments[{i}].image"))
                    except DataError as e:
                        bad = e
                        break
            if bad is not None:
                s.problems.append(bad)
                continue
        _count(s, sample, tokenizer)
    return s


def _count(s: Summary, sample: Sample, tokenizer: Any | None, max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
    s.samples += 1
    imgs = [g for g in sample.segments if isinstance(g, ImageSegment)]
    s.images += len(imgs)
    s.targets += sum(g.generate for g in imgs)
    s.images_per_sample[len(imgs)] += 1
    for g in imgs:
        try:
            s.resolutions[_image_size(g, max_image_bytes)] += 1
        except (OSError, DataError):  # unchecked images (check_images=False) may be missing or not files
            s.resolutions["unreadable"] += 1
    if tokenizer is not None:
        texts = [g.text for g in sample.segments if isinstance(g, TextSegment)]
        s.text_tokens = (s.text_tokens or 0) + sum(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                                                   for t in texts)


def _rebase(raw: dict[str, Any], src_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Image paths of a sample relative to `out_dir` instead of `src_dir` (absolute paths are kept)."""
    segs = []
    for seg in raw["segments"]:
        if "image" in seg and not Path(seg["image"]).is_absolute():
            seg = {**seg, "image": Path(os.path.relpath((src_dir / seg["image"]).resolve(), out_dir.resolve()))
                   .as_posix()}
        segs.append(seg)
    return {**raw, "segments": segs}


def fix(path: str | Path, out: str | Path | None = None, check_images: bool = True,
        max_line_bytes: int = MAX_LINE_BYTES, max_file_bytes: int = MAX_FILE_BYTES,
        max_image_bytes: int = MAX_IMAGE_BYTES) -> tuple[Path, Path, int, int]:
    """Write the valid lines of `path` to `out` (default: `<name>.clean.jsonl` next to it), image paths rebased
    onto the new folder, and `<out>.dropped.json` listing each dropped line with its id, field and reason.

    Returns (cleaned file, report file, kept, dropped). Refuses to overwrite the original. The file is read
    and written one line at a time; the cleaned copy appears under its name only once complete.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError("--fix writes a cleaned JSONL file; for a prepared folder, prepare it again from its "
                        "JSONL file (`mogao data prepare` leaves bad lines out)", file=str(path))
    out = Path(out) if out is not None else path.with_name(path.stem + ".clean.jsonl")
    if out.resolve() == path.resolve():
        raise DataError("--out is the original file; the cleaned copy must go to another file", file=str(path))
    counts, dropped = {"kept": 0}, []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            _write_kept(path, out, f, counts, dropped, check_images, max_line_bytes, max_file_bytes,
                        max_image_bytes)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    report = out.with_name(out.name.removesuffix(".jsonl") + ".dropped.json")
    report.write_text(json.dumps({"source": str(path), "cleaned": str(out), "kept": counts["kept"],
                                  "dropped": len(dropped), "problems": dropped}, indent=2))
    return out, report, counts["kept"], len(dropped)


def _write_kept(path: Path, out: Path, f: Any, counts: dict[str, int], dropped: list[dict[str, Any]],
                check_images: bool, max_line_bytes: int, max_file_bytes: int,
                max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
    """Write each valid line of `path` to the open file `f` as it is read; record the dropped ones."""
    rebase = out.parent.resolve() != path.parent.resolve()
    for n, data, item in iter_lines(path, check_images=check_images, max_line_bytes=max_line_bytes,
                                    max_file_bytes=max_file_bytes, max_image_bytes=max_image_bytes):
        if isinstance(item, DataError):
            dropped.append({"line": item.line, "field": item.field, "reason": item.message})
            continue
        raw = json.loads(data.decode("utf-8-sig" if n == 1 else "utf-8"))
        raw = _rebase(raw, path.parent, out.parent) if rebase else raw
        f.write((json.dumps(raw, ensure_ascii=False) + "\n").encode("utf-8"))
        counts["kept"] += 1
