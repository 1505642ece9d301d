"""The one reading rule for a text file of one text per line, shared by every command that reads one
(``predict --input`` and stdin, ``predict-dataset``'s .txt files, ``calibrate --unlabeled`` and
``train-exits --unlabeled``), and the one rule for a text value read from a data file.

A line ends at ``\\n`` only (a ``\\r`` before it is dropped): a lone ``\\r``, U+0085, U+2028 and the like
stay inside their text. ``Path.read_text`` and ``str.splitlines`` are not used: their universal newlines
end a line at a lone ``\\r`` too, so one text became several (issue 30, case 20)."""
from __future__ import annotations

import json
from typing import Iterator

from ..errors import UserError


def read_lines(stream, stats=None, strict: str | None = None) -> Iterator[str]:
    """Lines of a binary stream as text: CRLF or LF ends, a last line without newline kept. Bytes that
    are not UTF-8 are replaced (counted in ``stats.replaced``), or, with ``strict`` (how to name the
    file in the message), refused: one UserError naming the line and the byte."""
    for n, raw in enumerate(stream, 1):
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict is not None:
                raise UserError(f"{strict} line {n} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "give the texts in UTF-8") from None
            if stats is not None:
                stats.replaced += 1
            yield raw.decode("utf-8", errors="replace")


def check_text(value, column: str, where: str):
    """A text read from a data file: a string, or null (an empty text); anything else (a number, a list)
    is one UserError naming ``where`` (the file and line or record) and the column."""
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: '{column}' holds {kind(value)} ({short(value)}), not a string")
    return value


def kind(v) -> str:
    """A JSON value's type in words ('a number', 'a list')."""
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    return {list: "a list", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def short(v, limit: int = 40) -> str:
    """A value as JSON, cut to ``limit`` characters."""
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."
