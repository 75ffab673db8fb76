"""Prepared data sets: a JSONL sample file turned into memory-mapped Arrow shards, images included.

    prepare("mine.jsonl", "mine.data")      # `mogao data prepare mine.jsonl --out mine.data`
    samples = PreparedSamples("mine.data")  # len(samples), samples[i] -> Sample, read on demand

Engine: Hugging Face `datasets` (Arrow files, memory-mapped, random access by row index). Training shuffles,
shards and resumes by sample *index* (`PackedDataset` needs only `len(source)` and `source[i]`), so a table
that answers `source[i]` without loading the rest keeps the packer's exact-resume logic and its per-rank,
per-worker sharding unchanged. A memory-mapped table is shared by every rank and DataLoader worker on a machine
through the page cache: nothing is copied per process, and opening it costs the same for 10 thousand samples
as for 10 million. (litdata, the other established engine, streams chunks in an order and with a resume state
of its own; it would replace the packer's sample-exact position rather than serve it.)

Layout of DATA_DIR:
    shard-00000.arrow ...  Arrow IPC streams, one per `shard_size` lines of the input (`datasets.Dataset.from_file`
                           opens them); columns: id, line (the sample's line in the input), segments (text,
                           image index, generate, loss), images (the image files' bytes), image_paths (as written)
    shard-00000.json ...   what preparing that shard found: rows, images, and the bad lines with their reasons
    mogao_data.json        the manifest, written last: a directory without it is unfinished

Preparing validates every line as `mogao data check` does, including a full decode of every image; a bad line
or image is reported with file:line and left out (counted in the manifest). Each finished shard is written under
a temporary name and renamed, so an interrupted run leaves only whole shards, and running the same command
again skips them: the result is byte-identical to one uninterrupted run. The input is never modified.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from mogao.data.images import open_image, to_rgb
from mogao.data.samples import MAX_FILE_BYTES, MAX_LINE_BYTES, ImageSegment, Sample, TextSegment, iter_lines
from mogao.errors import ConfigError, DataError

FORMAT = "mogao-prepared"
VERSION = 1
MANIFEST = "mogao_data.json"
PARAMS = ".prepare.json"  # the options of an unfinished run; a rerun must match them
SHARD_SIZE = 10_000  # input lines per shard
WRITE_ROWS = 256  # rows per Arrow record batch: a shard is never held in memory whole
MAX_LISTED_PROBLEMS = 100

SEGMENT = pa.struct([("text", pa.string()), ("image", pa.int32()), ("generate", pa.bool_()), ("loss", pa.float64())])
SCHEMA = pa.schema([("id", pa.string()), ("line", pa.int64()), ("segments", pa.list_(SEGMENT)),
                    ("images", pa.list_(pa.binary())), ("image_paths", pa.list_(pa.string()))])


class ImageBytes(io.BytesIO):
    """An encoded image kept in a prepared set: a file-like object PIL opens (`open_image` accepts it in place
    of a path, with the same size and decoding checks), named after the image file it was read from."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__


def is_prepared(path: str | Path) -> bool:
    """Whether `path` is a finished prepared data directory."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory; a `DataError` naming what is wrong when it is not one."""
    root = Path(path).expanduser()
    man = root / MANIFEST
    if not man.is_file():
        hint = (" - `mogao data prepare` was interrupted: run it again to finish" if (root / PARAMS).is_file()
                else "; make one with `mogao data prepare FILE.jsonl --out DIR`")
        raise DataError(f"not a prepared data directory (no {MANIFEST}){hint}", file=str(root))
    try:
        manifest = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable manifest: {e}", file=str(man)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"not a {FORMAT} manifest", file=str(man))
    if manifest.get("version") != VERSION:
        raise DataError(f"prepared with format version {manifest.get('version')}, this version reads {VERSION}; "
                        "prepare the data again", file=str(man))
    return manifest


# ---- preparing ------------------------------------------------------------------------------------------

@dataclass
class PrepareSummary:
    """What `prepare` did: samples kept, images stored, bad lines left out (the first few listed)."""

    out: Path
    samples: int = 0
    images: int = 0
    targets: int = 0
    bad: int = 0
    shards: int = 0
    resumed_shards: int = 0
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.out}: {self.samples} samples, {self.images} images ({self.targets} generation targets) in "
               f"{self.shards} shard(s); {self.bad} bad line(s) left out"
               + (f"; {self.resumed_shards} shard(s) kept from an earlier run" if self.resumed_shards else "")]
        out += [f"  {p}" for p in self.problems[:20]]
        if self.bad > 20:
            out.append(f"  ... and {self.bad - 20} more (listed in {self.out / MANIFEST})")
        return out


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _row(sample: Sample, raw_paths: list[str]) -> dict[str, Any]:
    """A valid sample as a table row, its images' bytes read and fully decoded (a `DataError` if one is bad)."""
    segments, images = [], []
    for i, seg in enumerate(sample.segments):
        if isinstance(seg, TextSegment):
            segments.append({"text": seg.text, "image": None, "generate": False, "loss": float(seg.loss)})
            continue
        where = {"file": sample.file, "line": sample.line, "field": f"segments[{i}].image"}
        path = Path(seg.image)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"image file not found: {path} (paths are relative to the JSONL file)", **where) from None
        except OSError as e:
            raise DataError(f"cannot read image file {path}: {e.strerror or e}", **where) from None
        try:
            to_rgb(open_image(ImageBytes(data, str(path)), **where))
        except DataError as e:
            raise e if e.file is not None else DataError(e.message, **where) from None
        segments.append({"text": None, "image": len(images), "generate": seg.generate, "loss": seg.loss_weight})
        images.append(data)
    return {"id": sample.id, "line": sample.line, "segments": segments, "images": images,
            "image_paths": raw_paths}


def _image_paths(data: bytes, n: int) -> list[str]:
    raw = json.loads(data.decode("utf-8-sig" if n == 1 else "utf-8"))
    return [s["image"] for s in raw["segments"] if "image" in s]


class _ShardWriter:
    """Rows of one shard, streamed to a temporary Arrow file in record batches, renamed when complete."""

    def __init__(self, out: Path, k: int) -> None:
        self.out, self.k = out, k
        self.path = out / f"{_shard_name(k)}.arrow"
        self.tmp = out / f".{_shard_name(k)}.arrow.tmp"
        self.sink = pa.OSFile(str(self.tmp), "wb")
        self.writer = pa.ipc.new_stream(self.sink, SCHEMA)
        self.rows: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {"rows": 0, "images": 0, "targets": 0, "bad": 0, "problems": []}

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.info["rows"] += 1
        self.info["images"] += len(row["images"])
        self.info["targets"] += sum(bool(s["generate"]) for s in row["segments"])
        if len(self.rows) >= WRITE_ROWS:
            self._flush()

    def bad(self, error: DataError) -> None:
        self.info["bad"] += 1
        if len(self.info["problems"]) < MAX_LISTED_PROBLEMS:
            self.info["problems"].append(str(error))

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=SCHEMA))
            self.rows = []

    def finish(self) -> dict[str, Any]:
        self._flush()
        self.writer.close()
        self.sink.close()
        _write_atomic(self.out / f"{_shard_name(self.k)}.json", json.dumps(self.info, indent=1).encode())
        os.replace(self.tmp, self.path)  # the rename that marks the shard finished
        return self.info

    def abort(self) -> None:
        try:
            self.writer.close()
            self.sink.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _count_lines(path: Path) -> int:
    n, last = 0, b"\n"
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _check_out(src: Path, out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse an --out that is (or holds) the input, a file, or a folder of something else; returns the
    finished manifest when `out` already holds this very preparation."""
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise DataError("--out is the input file or a folder holding it; write the prepared set to a new folder",
                        file=str(out))
    if out.exists() and not out.is_dir():
        raise DataError("--out is an existing file; give a new folder", file=str(out))
    if not out.is_dir() or not any(out.iterdir()):
        return None
    for name, what in ((MANIFEST, "a finished"), (PARAMS, "an unfinished")):
        p = out / name
        if p.is_file():
            try:
                saved = json.loads(p.read_text(encoding="utf-8"))
            except ValueError:
                saved = {}
            if name == MANIFEST:
                saved = {k: saved.get(k) for k in params}
            if saved != params:
                raise DataError(f"--out holds {what} preparation of other data or options ({p}); choose a new "
                                "folder, or delete this one to start over", file=str(out))
            return json.loads((out / MANIFEST).read_text()) if name == MANIFEST else None
    raise DataError("--out is a folder that holds other files; give a new or empty folder", file=str(out))


def prepare(source: str | Path, out: str | Path, *, shard_size: int = SHARD_SIZE, progress: bool = True,
            max_line_bytes: int = MAX_LINE_BYTES, max_file_bytes: int = MAX_FILE_BYTES) -> PrepareSummary:
    """Prepare the JSONL file `source` into the folder `out` (see the module docstring); resumable."""
    from tqdm.auto import tqdm

    src, dst = Path(source).expanduser(), Path(out).expanduser()
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    if not src.is_file():
        raise DataError("input file not found (give a JSONL sample file)", file=str(src))
    params = {"format": FORMAT, "version": VERSION, "source": str(src.resolve()),
              "source_bytes": src.stat().st_size, "shard_size": shard_size}
    done = _check_out(src, dst, params)
    summary = PrepareSummary(dst)
    if done is not None:  # (a run stopped right after writing the manifest may have left its options file)
        (dst / PARAMS).unlink(missing_ok=True)
        summary.samples, summary.images, summary.targets = done["samples"], done["images"], done["targets"]
        summary.bad, summary.shards, summary.resumed_shards = done["bad"], len(done["shards"]), len(done["shards"])
        summary.problems = list(done["problems"])
        return summary
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / PARAMS).is_file():
        _write_atomic(dst / PARAMS, json.dumps(params, indent=1).encode())
    total = _count_lines(src)
    shards = max(1, -(-total // shard_size)) if total else 0
    infos: list[dict[str, Any]] = []
    writer: _ShardWriter | None = None
    current = -1
    bar = tqdm(total=total, unit=" lines", desc=f"preparing {src.name}", disable=not progress, mininterval=0.5)

    def open_shard(k: int) -> _ShardWriter | None:
        if (dst / f"{_shard_name(k)}.arrow").is_file():
            summary.resumed_shards += 1
            return None
        return _ShardWriter(dst, k)

    def close_shard(k: int, w: _ShardWriter | None) -> None:
        info = w.finish() if w is not None else json.loads((dst / f"{_shard_name(k)}.json").read_text())
        infos.append(info)

    try:
        last = 0
        for n, data, item in iter_lines(src, check_images=False, max_line_bytes=max_line_bytes,
                                        max_file_bytes=max_file_bytes):
            bar.update(n - last)
            last = n
            k = (n - 1) // shard_size
            while current < k:
                if current >= 0:
                    close_shard(current, writer)
                current += 1
                writer = open_shard(current)
            if writer is None:  # a shard finished by an earlier run
                continue
            if isinstance(item, DataError):
                writer.bad(item)
                continue
            try:
                writer.add(_row(item, _image_paths(data, n)))
            except DataError as e:
                writer.bad(e)
        while current < shards - 1:  # the last shards may hold only blank lines
            if current >= 0:
                close_shard(current, writer)
            current += 1
            writer = open_shard(current)
        if current >= 0:
            close_shard(current, writer)
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.update(total - bar.n)
        bar.close()
    problems = [p for info in infos for p in info["problems"]][:MAX_LISTED_PROBLEMS]
    manifest = {**params, "samples": sum(i["rows"] for i in infos), "images": sum(i["images"] for i in infos),
                "targets": sum(i["targets"] for i in infos), "bad": sum(i["bad"] for i in infos),
                "shards": [{"file": f"{_shard_name(k)}.arrow", "rows": i["rows"]} for k, i in enumerate(infos)],
                "problems": problems}
    _write_atomic(dst / MANIFEST, json.dumps(manifest, indent=1).encode())
    (dst / PARAMS).unlink(missing_ok=True)
    summary.samples, summary.images, summary.targets = manifest["samples"], manifest["images"], manifest["targets"]
    summary.bad, summary.shards, summary.problems = manifest["bad"], len(infos), problems
    return summary


# ---- reading --------------------------------------------------------------------------------------------

class PreparedSamples(Sequence[Sample]):
    """The samples of a prepared directory as a lazy random-access sequence: `samples[i]` reads row i from the
    memory-mapped shards and builds its `Sample` (images stay encoded until lowered); nothing is read up front.

    `Sample.file` / `.line` are the input JSONL file and line the sample came from (errors point there).
    """

    def __init__(self, path: str | Path) -> None:
        from datasets import Dataset
        from datasets.table import ConcatenationTable, MemoryMappedTable

        self.root = Path(path).expanduser()
        self.manifest = read_manifest(self.root)
        parts = []
        for shard in self.manifest["shards"]:
            name = shard["file"]
            if "/" in name or "\\" in name or name.startswith("."):
                raise DataError(f"manifest names a shard outside the folder: {name!r}", file=str(self.root / MANIFEST))
            f = self.root / name
            if not f.is_file():
                raise DataError(f"shard {name} is missing; prepare the data again", file=str(self.root))
            if shard["rows"]:
                parts.append(MemoryMappedTable.from_file(str(f)))
        # (one Dataset over the memory-mapped shards: `Dataset.from_file` per shard would fingerprint each,
        # tens of milliseconds a shard, which would make opening grow with the data set)
        self.table = Dataset(ConcatenationTable.from_tables(parts)) if parts else None
        self.length = 0 if self.table is None else len(self.table)
        if self.length != self.manifest["samples"]:
            raise DataError(f"the shards hold {self.length} samples, the manifest says {self.manifest['samples']}; "
                            "prepare the data again", file=str(self.root))
        self.file = str(self.manifest["source"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        i = int(index)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"sample index {index} out of range for {self.length} samples")
        return self._sample(self.table[i])

    def __iter__(self) -> Iterator[Sample]:
        if self.table is None:
            return
        for batch in self.table.iter(batch_size=WRITE_ROWS):
            for j in range(len(batch["id"])):
                yield self._sample({k: v[j] for k, v in batch.items()})

    def _sample(self, row: dict[str, Any]) -> Sample:
        segments: list[TextSegment | ImageSegment] = []
        for seg in row["segments"]:
            if seg["image"] is None:
                segments.append(TextSegment(seg["text"], bool(seg["loss"])))
            else:
                k = seg["image"]
                name = f"{row['image_paths'][k]} (stored in {self.root})"
                segments.append(ImageSegment(ImageBytes(row["images"][k], name), bool(seg["generate"]),
                                             float(seg["loss"])))
        return Sample(row["id"], tuple(segments), self.file, int(row["line"]))


def decoded(sample: Sample) -> Sample | None:
    """`sample` with its stored images decoded to PIL images (for code that takes a path or a PIL image);
    None when one of them cannot be decoded (training skips and counts such a sample on its own)."""
    if not any(isinstance(s, ImageSegment) and isinstance(s.image, ImageBytes) for s in sample.segments):
        return sample
    try:
        segs = tuple(ImageSegment(to_rgb(open_image(s.image)), s.generate, s.loss_weight)
                     if isinstance(s, ImageSegment) and isinstance(s.image, ImageBytes) else s
                     for s in sample.segments)
    except DataError:
        return None
    return Sample(sample.id, segs, sample.file, sample.line)
