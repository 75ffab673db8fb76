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

import bisect
import io
import itertools
import json
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from mogao.data.images import MAX_IMAGE_BYTES, open_image, read_image_file, to_rgb
from mogao.data.samples import MAX_FILE_BYTES, MAX_LINE_BYTES, ImageSegment, Sample, TextSegment, iter_lines
from mogao.errors import ConfigError, DataError, printable

FORMAT = "mogao-prepared"
VERSION = 1
MANIFEST = "mogao_data.json"
PARAMS = ".prepare.json"  # the options of an unfinished run; a rerun must match them
SHARD_SIZE = 10_000  # input lines per shard
WRITE_ROWS = 256  # rows per Arrow record batch: a shard is never held in memory whole
MAX_LISTED_PROBLEMS = 100
MAX_MANIFEST_BYTES = 16 * 2**20

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
        size = man.stat().st_size
        if size > MAX_MANIFEST_BYTES:  # (a manifest lists at most MAX_LISTED_PROBLEMS problems: kilobytes)
            raise DataError(f"the manifest is {size} bytes, more than a manifest of `mogao data prepare` holds "
                            f"({MAX_MANIFEST_BYTES}); prepare the data again", file=str(man))
        manifest = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"unreadable manifest: {printable(e)}", file=str(man)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"not a {FORMAT} manifest", file=str(man))
    if manifest.get("version") != VERSION:
        raise DataError(f"prepared with format version {_short(manifest.get('version'))}, this version reads "
                        f"{VERSION}; prepare the data again", file=str(man))
    check_manifest(manifest, man)
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


def _row(sample: Sample, raw_paths: list[str], max_image_bytes: int = MAX_IMAGE_BYTES) -> dict[str, Any]:
    """A valid sample as a table row, its images' bytes read (regular files of at most `max_image_bytes` only)
    and fully decoded (a `DataError` if one is bad)."""
    segments, images = [], []
    for i, seg in enumerate(sample.segments):
        if isinstance(seg, TextSegment):
            segments.append({"text": seg.text, "image": None, "generate": False, "loss": float(seg.loss)})
            continue
        where = {"file": sample.file, "line": sample.line, "field": f"segments[{i}].image"}
        path = Path(seg.image)
        if not path.exists():
            raise DataError(f"image file not found: {path} (paths are relative to the JSONL file)", **where)
        data = read_image_file(path, max_bytes=max_image_bytes, **where)
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
            max_line_bytes: int = MAX_LINE_BYTES, max_file_bytes: int = MAX_FILE_BYTES,
            max_image_bytes: int = MAX_IMAGE_BYTES) -> PrepareSummary:
    """Prepare the JSONL file `source` into the folder `out` (see the module docstring); resumable. Images are
    read from regular files of at most `max_image_bytes` only (a FIFO, a device or a larger file is a bad
    line, reported)."""
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
                writer.add(_row(item, _image_paths(data, n), max_image_bytes))
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

def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return printable(text if len(text) <= limit else text[: limit - 3] + "...")


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Refuse (a DataError naming `path`) a manifest that is not as `prepare` writes it: the shards
    shard-00000.arrow, shard-00001.arrow, ... each named once and in order with their row counts, the samples
    their sum, and the fields readers use of the right types."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise DataError("the manifest's 'shards' is not a list; prepare the data again", file=str(path))
    for k, shard in enumerate(shards):
        want = f"{_shard_name(k)}.arrow"
        if not isinstance(shard, dict) or shard.get("file") != want or not _is_count(shard.get("rows")):
            raise DataError(f"the manifest's shard {k} is {_short(shard)}, expected "
                            f"{{'file': '{want}', 'rows': N}} (every shard named once, in order); prepare the data "
                            "again", file=str(path))
    rows = sum(s["rows"] for s in shards)
    if not _is_count(manifest.get("samples")) or manifest["samples"] != rows:
        raise DataError(f"the manifest says {_short(manifest.get('samples'))} samples, its shards hold {rows}; "
                        "prepare the data again", file=str(path))
    problems = manifest.get("problems")
    if (not isinstance(manifest.get("source"), str) or not _is_count(manifest.get("bad"))
            or not isinstance(problems, list) or not all(isinstance(p, str) for p in problems)):
        raise DataError("the manifest's 'source', 'bad' or 'problems' is missing or of the wrong type; prepare "
                        "the data again", file=str(path))


def _flatbuffer_field(buf: bytes, table: int, i: int) -> int | None:
    """Where field `i` of the flatbuffer table at `table` is in `buf` (None: absent)."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    if 4 + 2 * i + 2 > struct.unpack_from("<H", buf, vtable)[0]:
        return None
    offset = struct.unpack_from("<H", buf, vtable + 4 + 2 * i)[0]
    return table + offset if offset else None


def _is_compressed(metadata: bytes) -> bool:
    """Whether an Arrow IPC message (its flatbuffer `Message` metadata) holds a record batch - or a dictionary
    batch's record batch - with compressed buffers (the `compression` field of `RecordBatch`, Arrow's
    format/Message.fbs). pyarrow decompresses such buffers when it reads them, into as much memory as each
    claims; it gives no other way to ask before."""
    root = struct.unpack_from("<I", metadata, 0)[0]
    kind_at, header_at = _flatbuffer_field(metadata, root, 1), _flatbuffer_field(metadata, root, 2)
    if kind_at is None or header_at is None:
        return False
    kind, header = metadata[kind_at], header_at + struct.unpack_from("<I", metadata, header_at)[0]
    if kind == 2:  # DictionaryBatch: its record batch is field 1
        data_at = _flatbuffer_field(metadata, header, 1)
        if data_at is None:
            return False
        header, kind = data_at + struct.unpack_from("<I", metadata, data_at)[0], 3
    return kind == 3 and _flatbuffer_field(metadata, header, 3) is not None


def _open_shard(path: Path, rows: int) -> Any:
    """The memory-mapped table of one shard, its schema checked against `SCHEMA` (names and types of every
    column, nothing more) and its record batches checked to be uncompressed (as `prepare` writes them: a
    compressed buffer could decompress to far more memory than the file holds) before any batch is read; a
    DataError naming the file otherwise."""
    from datasets.table import MemoryMappedTable

    try:
        with pa.memory_map(str(path)) as source:
            schema = pa.ipc.open_stream(source).schema
            if schema.equals(SCHEMA):
                source.seek(0)
                if any(m.type in ("record batch", "dictionary") and _is_compressed(m.metadata.to_pybytes())
                       for m in pa.ipc.MessageReader.open_stream(source)):
                    raise DataError("the shard's record batches are compressed (`mogao data prepare` writes them "
                                    "uncompressed, and decompressing could take far more memory than the file "
                                    "holds); prepare the data again", file=str(path))
    except DataError:
        raise
    except (pa.ArrowException, OSError, struct.error, IndexError) as e:
        raise DataError(f"not an Arrow stream written by `mogao data prepare` ({type(e).__name__}: "
                        f"{printable(e)}); prepare the data again", file=str(path)) from None
    if not schema.equals(SCHEMA):  # (also refuses extension types, dictionaries and extra columns)
        raise DataError(f"the shard's columns are {printable(_describe_schema(schema))}, not "
                        f"{_describe_schema(SCHEMA)}; prepare the data again", file=str(path))
    try:
        table = MemoryMappedTable.from_file(str(path))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"unreadable shard ({type(e).__name__}: {printable(e)}); prepare the data again",
                        file=str(path)) from None
    if len(table) != rows:
        raise DataError(f"the shard holds {len(table)} rows, the manifest says {rows}; prepare the data again",
                        file=str(path))
    return table


def _describe_schema(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


class PreparedSamples(Sequence[Sample]):
    """The samples of a prepared directory as a lazy random-access sequence: `samples[i]` reads row i from the
    memory-mapped shards and builds its `Sample` (images stay encoded until lowered); nothing is read up front.

    The folder may come from someone else: its manifest must name the shards `prepare` writes, each shard must
    have exactly the columns `prepare` writes (`SCHEMA`), and rows are read as plain Arrow values - never
    through a library's feature types, which could make a stored value fetch a URL or open a local file. A
    malformed row is a `DataError` naming its shard and row (training skips and counts it).

    `Sample.file` / `.line` are the input JSONL file and line the sample came from (errors point there).
    """

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path).expanduser()
        self.manifest = read_manifest(self.root)
        self.shards: list[tuple[Path, Any]] = []
        for shard in self.manifest["shards"]:
            f = self.root / shard["file"]
            if not f.is_file():
                raise DataError(f"shard {shard['file']} is missing; prepare the data again", file=str(self.root))
            if shard["rows"]:
                self.shards.append((f, _open_shard(f, shard["rows"])))
        # (a list of memory-mapped tables, pickled by path to DataLoader workers: opening costs the same for
        # ten thousand samples as for ten million)
        self.ends = list(itertools.accumulate(len(t) for _, t in self.shards))
        self.length = self.ends[-1] if self.ends else 0
        self.file = self.manifest["source"]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        i = int(index)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"sample index {index} out of range for {self.length} samples")
        k = bisect.bisect_right(self.ends, i)
        row = i - (self.ends[k - 1] if k else 0)
        path, table = self.shards[k]
        return self._sample(table.fast_slice(row, 1).to_pylist()[0], path, row)

    def __iter__(self) -> Iterator[Sample]:
        for item in self.checked():
            if isinstance(item, DataError):
                raise item
            yield item

    def checked(self) -> Iterator[Sample | DataError]:
        """Every row in order: its `Sample`, or the `DataError` saying what is wrong with it (read a batch of
        rows at a time, for `mogao data check`)."""
        for path, table in self.shards:
            row = 0
            for batch in table.to_batches(max_chunksize=WRITE_ROWS):
                for values in batch.to_pylist():
                    try:
                        yield self._sample(values, path, row)
                    except DataError as e:
                        yield e
                    row += 1

    def _sample(self, row: dict[str, Any], shard: Path, index: int) -> Sample:
        """The `Sample` of one row; a DataError naming the shard and row when a value is missing or out of range
        (the schema fixes the types, not that values are present)."""

        def bad(what: str, field: str | None = None) -> DataError:
            return DataError(f"row {index}: {what}; prepare the data again", file=str(shard), field=field)

        sid, line, segs = row["id"], row["line"], row["segments"]
        images, paths = row["images"] or [], row["image_paths"] or []
        if not sid or line is None or not segs:
            raise bad("no id, line or segments")
        segments: list[TextSegment | ImageSegment] = []
        for j, seg in enumerate(segs):
            where = f"segments[{j}]"
            if (seg is None or seg["loss"] is None or not math.isfinite(seg["loss"]) or seg["loss"] < 0
                    or (seg["image"] is not None and seg["generate"] is None)):
                raise bad("a segment without a valid loss or generate flag", where)
            k = seg["image"]
            if k is None:
                if not seg["text"]:
                    raise bad("a text segment without text", where)
                segments.append(TextSegment(seg["text"], bool(seg["loss"])))
                continue
            if not 0 <= k < len(images) or images[k] is None or k >= len(paths) or paths[k] is None:
                raise bad(f"image {k} is not stored in the row", where)
            name = f"{paths[k]} (stored in {self.root})"
            segments.append(ImageSegment(ImageBytes(images[k], name), bool(seg["generate"]), float(seg["loss"])))
        return Sample(sid, tuple(segments), self.file, int(line))


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
