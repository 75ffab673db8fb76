"""The project's own error types: everything a user can cause raises one of these with a message that says
where (file, line, field or config key) and what would fix it; `printable`, how such a message (or any text
from a file) is made safe to print."""

from __future__ import annotations

import unicodedata


class MogaoError(Exception):
    """Base class of every error a user can cause."""


class DataError(MogaoError, ValueError):
    """Bad data: a sample, an image or a data file. The message names file, line and field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        if field:
            prefix += f"field '{field}': "
        super().__init__(prefix + message)
        self.message = message  # without the location, for reports that give it separately
        self.file, self.line, self.field = file, line, field


class ConfigError(MogaoError, ValueError):
    """Bad configuration: the message names the key or path."""


class NumericalError(MogaoError, ArithmeticError):
    """Training diverged: non-finite losses or gradients beyond what the run is configured to skip. The
    message names what was seen (loss or gradient norm, values, steps, sample ids) and what to try."""


def printable(text: object, keep: str = "") -> str:
    """`str(text)` with control and format characters (terminal escape sequences, bidirectional overrides,
    ...) shown as escapes, except those in `keep` (e.g. "\\n\\t" for multi-line model output): what a data
    file or a model wrote must not drive the terminal it is printed on."""
    out = []
    for ch in str(text):
        if ch not in keep and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)
