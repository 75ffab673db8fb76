"""Image paths from data files (SECURITY.md): only regular files are read, never more than a size limit that the
error names with the setting that raises it. A FIFO would block a reader for ever and a device such as /dev/zero
never ends (a harmless device, /dev/null, stands for it here: reading /dev/zero without the check exhausts
memory); every read runs under a time limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest_data import make_image, run_with_time_limit, small_config, tiny_tokenizer, write_jsonl

from mogao.data import PackedDataset, load_samples, lower_sample
from mogao.data.check import summarise
from mogao.data.cli import main as data_main
from mogao.data.prepared import PreparedSamples, prepare
from mogao.errors import DataError

DEVICE = "/dev/null"


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "src" / "fifo.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _source(tmp_path: Path, images: list[str]) -> Path:
    make_image(tmp_path / "src" / "ok.png")
    return write_jsonl(tmp_path / "src" / "d.jsonl", [
        {"id": f"s{i}", "segments": [{"text": "a red square", "loss": False}, {"image": image, "generate": True}]}
        for i, image in enumerate(["ok.png", *images])])


def test_prepare_reports_a_fifo_and_a_device_as_bad_lines_without_reading_them(tmp_path, fifo, capsys):
    src = _source(tmp_path, [str(fifo), DEVICE])
    summary = run_with_time_limit(lambda: prepare(src, tmp_path / "out", progress=False), [fifo])
    assert (summary.samples, summary.bad) == (1, 2)
    assert all("is not a regular file" in p for p in summary.problems), summary.problems
    assert str(fifo) in summary.problems[0] and DEVICE in summary.problems[1]
    assert all(p.count(f"{src}:") == 1 for p in summary.problems), summary.problems  # (located once)
    assert [s.id for s in PreparedSamples(tmp_path / "out")] == ["s0"]


def test_prepare_refuses_an_image_file_over_the_limit_naming_the_flag(tmp_path, capsys):
    src = _source(tmp_path, [])
    size = (tmp_path / "src" / "ok.png").stat().st_size
    assert data_main(["prepare", str(src), "--out", str(tmp_path / "small"), "--no-progress",
                      "--max-image-bytes", str(size - 1)]) == 0
    out = capsys.readouterr().out
    assert "0 samples" in out and f"limit of {size - 1} bytes" in out and "--max-image-bytes" in out
    assert data_main(["prepare", str(src), "--out", str(tmp_path / "enough"), "--no-progress",
                      "--max-image-bytes", str(size)]) == 0
    assert "1 samples" in capsys.readouterr().out


def test_training_from_jsonl_skips_a_fifo_image_without_hanging(tmp_path, fifo):
    src = _source(tmp_path, [str(fifo)])
    samples = load_samples(src, check_images=False)  # (training checks images when it lowers them)
    with pytest.raises(DataError, match="is not a regular file") as e:
        run_with_time_limit(lambda: lower_sample(samples[1], tiny_tokenizer(), small_config()), [fifo])
    assert f"{src}:2" in str(e.value)
    ds = PackedDataset(samples, tiny_tokenizer(), small_config(), shuffle=False)
    ids = run_with_time_limit(lambda: [i for b in ds for i in b.sample_ids], [fifo])
    assert ids == ["s0"] and ds.stats.bad == 1


def test_training_refuses_an_image_over_data_max_image_bytes(tmp_path):
    src = _source(tmp_path, [])
    (sample,) = load_samples(src, check_images=False)
    with pytest.raises(DataError, match=r"more than the limit of 10 bytes.*data\.max_image_bytes"):
        lower_sample(sample, tiny_tokenizer(), small_config(max_image_bytes=10))
    assert lower_sample(sample, tiny_tokenizer(), small_config()).sample_id == "s0"


def test_data_check_without_image_checks_never_opens_a_fifo(tmp_path, fifo):
    src = _source(tmp_path, [str(fifo)])
    summary = run_with_time_limit(lambda: summarise(src, check_images=False), [fifo])
    assert summary.samples == 2 and summary.resolutions["unreadable"] == 1
    summary = run_with_time_limit(lambda: summarise(src), [fifo])
    (problem,) = summary.problems
    assert problem.line == 2 and "is not a regular file" in str(problem)


def test_importing_a_caption_folder_never_follows_links_out_of_it(tmp_path):
    """A caption folder from elsewhere (an archive keeps its links) whose caption, or image, links to a file of
    the user's: the file is never read nor copied into the samples."""
    from mogao.data.importers import captions_to_samples

    secret = tmp_path / "home" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("the user's private notes")
    folder = tmp_path / "captions"
    make_image(folder / "a.png")
    (folder / "a.txt").symlink_to(secret)
    with pytest.raises(DataError, match="outside the caption folder") as e:
        captions_to_samples(folder, tmp_path / "out.jsonl")
    assert str(folder / "a.txt") in str(e.value)
    (folder / "a.txt").unlink()
    (folder / "a.txt").write_text("a red square")
    make_image(tmp_path / "home" / "private.png")
    (folder / "b.png").symlink_to(tmp_path / "home" / "private.png")
    (folder / "b.txt").write_text("a red square")
    with pytest.raises(DataError, match="outside the caption folder") as e:
        captions_to_samples(folder, tmp_path / "out.jsonl")
    assert str(folder / "b.png") in str(e.value)
    (folder / "b.png").unlink()
    (folder / "b.txt").unlink()
    assert [s["id"] for s in captions_to_samples(folder, tmp_path / "out.jsonl")] == ["a"]
