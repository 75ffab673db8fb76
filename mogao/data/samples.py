"""The sample format users write (JSONL, one sample a line) and its validating loader.

    {"id": "s1", "segments": [
      {"text": "Draw a cat."},
      {"image": "img/cat.png", "generate": true},
      {"text": "Now make it sleep.", "loss": false},
      {"image": "img/cat_sleep.png", "generate": true, "loss_weight": 0.5}]}

Keys
  sample:   `id` (str, optional; default "FILE:LINE"), `segments` (non-empty list)
  text:     `text` (non-empty str), `loss` (bool, default true: the text carries next-token loss)
  image:    `image` (path relative to the JSONL file, or absolute), `generate` (bool, default false: a condition
            image; true: a diffusion target that also gets a noisy copy), `loss_weight` (number >= 0, default
            1.0: the weight of the image's flow loss; only meaningful for generation targets, so a condition image
            may only give 0)

Every problem raises `DataError` naming file, line and field, so a bad line in a million-line file is found
without a debugger - whatever the file holds (bytes that are not UTF-8, JSON nested too deeply, numbers too
large for a float, text with unpaired surrogates). `check_samples` collects all problems of a file instead of
stopping at the first. A line longer than `max_line_bytes` (default `MAX_LINE_BYTES`) is a problem of its own,
found without reading it whole, and a file larger than `max_file_bytes` (default `MAX_FILE_BYTES`) is refused;
`mogao data check --max-line-bytes / --max-file-bytes` raise them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mogao.data.images import MAX_IMAGE_BYTES, open_image, to_rgb
from mogao.errors import DataError, printable

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 16 * 2**20  # one sample: text and image paths, never megabytes of it
MAX_FILE_BYTES = 64 * 2**30
SAMPLE_KEYS = ("id", "segments")
TEXT_KEYS = ("text", "loss")
IMAGE_KEYS = ("image", "generate", "loss_weight")


@dataclass(frozen=True)
class TextSegment:
    """A run of text; `loss` says whether its tokens are next-token targets."""

    text: str
    loss: bool = True


@dataclass(frozen=True, eq=False)
class ImageSegment:
    """An image: a file path or, for generated in-memory data, a PIL image.

    `loss_weight` is the flow-loss weight of a generation target (ignored for condition images, which have no flow
    loss).
    """

    image: Path | Image.Image
    generate: bool = False
    loss_weight: float = 1.0

    @property
    def flow_weight(self) -> float:
        return float(self.loss_weight) if self.generate else 0.0


SampleSegment = TextSegment | ImageSegment


@dataclass(frozen=True)
class Sample:
    """A validated sample. `file`/`line` locate it for error messages (line is 1-based; None in memory)."""

    id: str
    segments: tuple[SampleSegment, ...]
    file: str | None = None
    line: int | None = None

    @property
    def has_target(self) -> bool:
        return any(isinstance(s, ImageSegment) and s.generate for s in self.segments)

    def error(self, message: str, field: str | None = None) -> DataError:
        """A `DataError` located at this sample (used by later stages, e.g. the length check)."""
        return DataError(message, file=self.file, line=self.line, field=field)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short_repr(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters (a bad value may be a huge or deeply nested JSON structure)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {_type_name(value)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_unicode(value: str, what: str, where: dict[str, Any], field: str) -> None:
    """Reject strings that cannot be encoded as UTF-8: JSON may escape half a surrogate pair ("\\ud800"),
    which the tokenizer and the file system cannot handle."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{what} is not valid Unicode: unpaired surrogate {value[e.start]!r} at character "
                        f"{e.start} (a \\uXXXX escape must encode a whole character)", field=field,
                        **where) from None


def _flow_weight(value: Any) -> float | None:
    """`value` as a finite, non-negative float, or None when it is not one (bool counts as 0 / 1)."""
    if not isinstance(value, (bool, int, float)):
        return None
    try:
        weight = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return weight if math.isfinite(weight) and weight >= 0 else None


def _check_keys(obj: Mapping[str, Any], allowed: Sequence[str], what: str, where: dict[str, Any], field: str | None):
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise DataError(
            f"unknown key(s) {', '.join(repr(k) for k in unknown)} in {what}; allowed keys: {', '.join(allowed)}",
            field=f"{field}.{unknown[0]}" if field else unknown[0], **where,
        )


def check_image(path: Path | Image.Image, *, where: dict[str, Any], field: str,
                max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
    """Open, fully decode (which catches truncated files) and convert an image, so bad files fail at load time.
    Only a regular file of at most `max_image_bytes` is read (`open_image`)."""
    if isinstance(path, Image.Image):
        return
    try:
        found = path.exists()
    except OSError as e:  # e.g. a name too long for the file system, or a directory it may not enter
        raise DataError(f"cannot access image file {path}: {e.strerror or e}", field=field, **where) from e
    if not found:
        raise DataError(f"image file not found: {path} (paths are relative to the JSONL file)", field=field, **where)
    try:
        to_rgb(open_image(path, field=field, max_bytes=max_image_bytes, **where))
    except DataError as e:
        if e.file is not None:
            raise
        raise DataError(str(e), field=field, **where) from e


def _segment(raw: Any, i: int, root: Path, where: dict[str, Any], check_images: bool,
             max_image_bytes: int = MAX_IMAGE_BYTES) -> SampleSegment:
    field = f"segments[{i}]"
    if not isinstance(raw, dict):
        raise DataError(f"a segment must be an object, got {_type_name(raw)}", field=field, **where)
    has_text, has_image = "text" in raw, "image" in raw
    if has_text == has_image:
        which = "both 'text' and 'image'" if has_text else "neither 'text' nor 'image'"
        raise DataError(f"a segment needs exactly one of 'text' or 'image', this one has {which}", field=field, **where)
    if has_text:
        _check_keys(raw, TEXT_KEYS, "a text segment", where, field)
        text, loss = raw["text"], raw.get("loss", True)
        if not isinstance(text, str):
            raise DataError(f"'text' must be a string, got {_type_name(text)}", field=f"{field}.text", **where)
        if not text:
            raise DataError("empty text; drop the segment or give it some text", field=f"{field}.text", **where)
        _check_unicode(text, "'text'", where, f"{field}.text")
        if not isinstance(loss, bool):
            raise DataError(f"'loss' of a text segment must be true or false, got {_short_repr(loss)}",
                            field=f"{field}.loss", **where)
        return TextSegment(text, loss)
    if "loss" in raw:
        raise DataError("'loss' is a text segment's true/false flag; an image's flow-loss weight is 'loss_weight'",
                        field=f"{field}.loss", **where)
    _check_keys(raw, IMAGE_KEYS, "an image segment", where, field)
    image, generate, loss = raw["image"], raw.get("generate", False), raw.get("loss_weight", 1.0)
    if not isinstance(generate, bool):
        raise DataError(f"'generate' must be true or false, got {_short_repr(generate)}",
                        field=f"{field}.generate", **where)
    weight = _flow_weight(loss)
    if weight is None:
        raise DataError("'loss_weight' of an image must be a finite number >= 0 (flow-loss weight), got "
                        f"{_short_repr(loss)}", field=f"{field}.loss_weight", **where)
    if not generate and "loss_weight" in raw and weight != 0.0:
        raise DataError("'loss_weight' is the flow-loss weight of a generation target; a condition image has no "
                        "flow loss - remove 'loss_weight' or set \"generate\": true", field=f"{field}.loss_weight",
                        **where)
    if isinstance(image, str):
        if not image:
            raise DataError("empty image path", field=f"{field}.image", **where)
        _check_unicode(image, "the image path", where, f"{field}.image")
        if "\0" in image:
            raise DataError("the image path contains a NUL character", field=f"{field}.image", **where)
        image = root / image
    elif not isinstance(image, Image.Image):
        raise DataError(f"'image' must be a path string, got {_type_name(image)}", field=f"{field}.image", **where)
    if check_images:
        check_image(image, where=where, field=f"{field}.image", max_image_bytes=max_image_bytes)
    return ImageSegment(image, generate, weight if generate else 0.0)


def sample_from_dict(
    raw: Any, *, root: str | Path = ".", file: str | None = None, line: int | None = None, check_images: bool = True,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> Sample:
    """Validate one sample given as a dict (a parsed JSONL line or built in memory).

    Image paths are resolved against `root`; in-memory data may put a PIL image in place of the path.
    """
    where: dict[str, Any] = {"file": file, "line": line}
    if not isinstance(raw, dict):
        raise DataError(f"a sample must be a JSON object, got {_type_name(raw)}", **where)
    _check_keys(raw, SAMPLE_KEYS, "a sample", where, None)
    default_id = f"{file if file is not None else '<memory>'}:{line if line is not None else 0}"
    sid = raw.get("id", default_id)
    if not isinstance(sid, str) or not sid:
        raise DataError(f"'id' must be a non-empty string, got {_short_repr(sid)}", field="id", **where)
    _check_unicode(sid, "'id'", where, "id")
    if "segments" not in raw:
        raise DataError("missing 'segments' (a non-empty list of text and image segments)", field="segments", **where)
    segs = raw["segments"]
    if not isinstance(segs, list):
        raise DataError(f"'segments' must be a list, got {_type_name(segs)}", field="segments", **where)
    if not segs:
        raise DataError("'segments' is empty; a sample needs at least one text or image segment",
                        field="segments", **where)
    root = Path(root)
    segments = tuple(_segment(s, i, root, where, check_images, max_image_bytes) for i, s in enumerate(segs))
    return Sample(sid, segments, file, line)


def samples_from_dicts(
    raws: Sequence[Any], *, root: str | Path = ".", name: str = "<memory>", check_images: bool = True,
) -> list[Sample]:
    """Validate in-memory samples (e.g. the built-in generated data sets); `name` stands in for the file name."""
    samples = [sample_from_dict(r, root=root, file=name, line=i + 1, check_images=check_images)
               for i, r in enumerate(raws)]
    first: dict[str, int] = {}
    for s in samples:
        if first.setdefault(s.id, s.line or 0) != s.line:
            raise s.error(f"duplicate id {s.id!r} (first used by item {first[s.id]}); ids seed the noise and "
                          "dropout draws, so they must be unique", field="id")
    return samples


def _parse_line(data: bytes, n: int, file: str) -> Any:
    """One JSONL line -> its JSON value; every way it can fail becomes a `DataError` at file:n."""
    try:
        text = data.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e.reason} at byte {e.start + 1} of the line; save the file as "
                        "UTF-8", file=file, line=n) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} at column {e.colno}", file=file, line=n) from None
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply to parse", file=file, line=n) from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise DataError(f"invalid JSON: {e}", file=file, line=n) from None


def _lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes | None]:
    """The file's lines as bytes, split as text mode splits them (on \\n, \\r\\n and \\r) but decoded by
    the caller, so one line that is not UTF-8 is reported and skipped instead of ending the read. A line longer
    than `max_line_bytes` is skipped in bounded reads and given as None: it is never held in memory whole."""
    with path.open("rb") as f:
        while True:
            chunk = f.readline(max_line_bytes + 1)
            if not chunk:
                return
            if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
                while chunk and not chunk.endswith(b"\n"):
                    chunk = f.readline(1 << 20)
                yield None
                continue
            yield from chunk.splitlines()


def _size_limit_error(what: str, limit: int, flag: str, **where: Any) -> DataError:
    return DataError(f"{what} is longer than the limit of {limit} bytes; a sample file should not need it - if "
                     f"this one does, raise the limit ({flag})", **where)


def iter_lines(path: str | Path, *, check_images: bool = True, max_line_bytes: int = MAX_LINE_BYTES,
               max_file_bytes: int = MAX_FILE_BYTES, max_image_bytes: int = MAX_IMAGE_BYTES,
               ) -> Iterator[tuple[int, bytes | None, Sample | DataError]]:
    """(line number, the line's bytes (None when too long), its `Sample` or the `DataError` describing what is
    wrong with it) for each line of `path` but blank ones; see `iter_samples`."""
    path = Path(path)
    try:
        found = path.is_file()
        size = path.stat().st_size if found else 0
    except OSError as e:
        raise DataError(f"cannot access sample file {path}: {e.strerror or e}", file=str(path)) from e
    if not found:
        raise DataError(f"sample file not found: {path}", file=str(path))
    if size > max_file_bytes:
        raise _size_limit_error(f"the file ({size} bytes)", max_file_bytes, "--max-file-bytes", file=str(path))
    seen: dict[str, int] = {}
    try:
        for n, data in enumerate(_lines(path, max_line_bytes), start=1):
            if data is None:
                yield n, None, _size_limit_error("the line", max_line_bytes, "--max-line-bytes", file=str(path),
                                                 line=n)
                continue
            if not data.strip():
                continue
            try:
                raw = _parse_line(data, n, str(path))
                sample = sample_from_dict(raw, root=path.parent, file=str(path), line=n, check_images=check_images,
                                          max_image_bytes=max_image_bytes)
            except DataError as e:
                yield n, data, e
                continue
            if sample.id in seen:
                yield n, data, DataError(f"duplicate id {sample.id!r} (first used on line {seen[sample.id]}); ids "
                                         "seed the noise and dropout draws, so they must be unique", file=str(path),
                                         line=n, field="id")
                continue
            seen[sample.id] = n
            yield n, data, sample
    except OSError as e:  # unreadable (permissions, I/O error): the rest of the file cannot be checked
        raise DataError(f"cannot read sample file {path}: {e.strerror or e}", file=str(path)) from e


def iter_samples(path: str | Path, *, check_images: bool = True, max_line_bytes: int = MAX_LINE_BYTES,
                 max_file_bytes: int = MAX_FILE_BYTES, max_image_bytes: int = MAX_IMAGE_BYTES,
                 ) -> Iterator[Sample | DataError]:
    """Yield each line's `Sample`, or the `DataError` describing what is wrong with it (blank lines are skipped).

    A line longer than `max_line_bytes` is such a problem, as is (with `check_images`) an image file larger than
    `max_image_bytes`; a file larger than `max_file_bytes` raises one."""
    for _, _, item in iter_lines(path, check_images=check_images, max_line_bytes=max_line_bytes,
                                 max_file_bytes=max_file_bytes, max_image_bytes=max_image_bytes):
        yield item


def load_samples(path: str | Path, *, strict: bool = True, check_images: bool = True) -> list[Sample]:
    """Load and validate a JSONL sample file.

    strict: raise the first `DataError`; otherwise skip bad lines with a logged warning (and a count).
    check_images: open and decode every image now, so a corrupt file fails at start-up, not mid-training.
    """
    samples, bad = [], 0
    for item in iter_samples(path, check_images=check_images):
        if isinstance(item, DataError):
            if strict:
                raise item
            bad += 1
            log.warning("skipping sample: %s", printable(item))
        else:
            samples.append(item)
    if bad:
        log.warning("%s: skipped %d invalid sample(s), kept %d", printable(path), bad, len(samples))
    return samples


def check_samples(path: str | Path, *, check_images: bool = True) -> list[DataError]:
    """Every problem of a sample file (empty list = valid); for `mogao data check`."""
    return [item for item in iter_samples(path, check_images=check_images) if isinstance(item, DataError)]
