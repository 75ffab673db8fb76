"""Saved model folders on disk: written as one unit, with the user's umask, never over a foreign folder."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mogao.errors import ConfigError

TEMP_SUFFIX = ".tmp"  # a file or folder being written (renamed into place when complete)


def fsync_directory(directory: str | Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# files a saved model or adapter folder holds: a folder with one of them was written by this project
SAVED_FOLDER_MARKERS = ("mogao_config.json", "adapter_config.json")


def current_umask() -> int:
    """The process's file mode creation mask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(directory: str | Path) -> None:
    """Give every file under `directory` (and the folders) the mode a plain `open` would have given it:
    some writers (safetensors) create their files 0600 whatever the umask, which hides them from the group."""
    mask = current_umask()
    root = Path(directory)
    for d, subdirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                os.chmod(Path(d, name), 0o666 & ~mask)
        for name in subdirs:
            with contextlib.suppress(OSError):
                os.chmod(Path(d, name), 0o777 & ~mask)
    with contextlib.suppress(OSError):
        os.chmod(root, 0o777 & ~mask)


def write_directory(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a saved model / adapter folder as one unit: `write(tmp)` fills a temporary sibling folder, whose
    files then get the user's umask, and the folder is renamed onto `directory` (a previous save there is
    replaced, then removed). A kill leaves the previous folder or the new one, never a mix of both.

    `directory` must be new, empty, or a folder this project saved a model or adapter to (it holds one of
    `SAVED_FOLDER_MARKERS`); ConfigError naming it otherwise, so that no other folder is replaced.
    """
    final = Path(directory).expanduser()
    if final.exists() and not final.is_dir():
        raise ConfigError(f"'{final}' is a file, not a folder to save a model to")
    replace = final.is_dir() and any(final.iterdir())
    if replace and not any((final / m).is_file() for m in SAVED_FOLDER_MARKERS):
        raise ConfigError(f"'{final}' already holds files and is not a folder this project saved a model or "
                          "adapter to; choose a new or empty folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = final.with_name(f".{final.name}.{tag}{TEMP_SUFFIX}")
    tmp.mkdir()
    try:
        write(tmp)
        honour_umask(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.is_dir():
            old = final.with_name(f".{final.name}.{tag}.old")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(final.parent)
    return final


def save_model_directory(model: Any, tokenizer: Any, directory: str | Path,
                         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """`model.save_pretrained` (with `state_dict`, see `MogaoModel.save_pretrained`) and, when given,
    `tokenizer.save_pretrained` into `directory` as one unit (`write_directory`)."""

    def write(d: Path) -> None:
        if state_dict is None:
            model.save_pretrained(d)
        else:
            model.save_pretrained(d, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(d)

    return write_directory(directory, write)
