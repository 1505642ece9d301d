"""Output files written whole or not at all: a temporary sibling renamed over the target when complete."""
from __future__ import annotations

import contextlib
import os
import stat
import uuid
from pathlib import Path

from .errors import UserError


def check_output(output: str, input: str | None = None, flag: str = "--output", checkpoint: str | None = None) -> None:
    """UserError when ``output`` cannot be written as a file: its folder is missing, it is a folder, it
    is the input file itself (writing it would destroy what is being read), or it is a file of
    ``checkpoint`` (a file already inside that folder: its weights, configs, tokenizer ...)."""
    out = Path(output).expanduser()
    if out.is_dir():
        raise UserError(f"{flag} '{output}' is a folder; give a file name")
    if not out.parent.is_dir():
        raise UserError(f"{flag} '{output}': folder '{out.parent}' does not exist")
    if input is not None and _same_file(Path(input).expanduser(), out):
        raise UserError(f"{flag} '{output}' is the input file; write the results to another file")
    if checkpoint is not None and out.exists() and Path(checkpoint).expanduser().resolve() in out.resolve().parents:
        raise UserError(f"{flag} '{output}' is a file of the checkpoint '{checkpoint}'; write the results elsewhere")


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


@contextlib.contextmanager
def atomic_text_file(path: str):
    """Yield a text file (UTF-8, '\\n' newlines) writing to a temporary sibling of ``path``, renamed over
    ``path`` when the block ends without error; on an error or Ctrl-C the sibling is removed and ``path``
    is as it was, so a file at ``path`` is always complete. A special file (``/dev/stdout``, a pipe) is
    written directly."""
    target = Path(path).expanduser()
    if target.exists() and not stat.S_ISREG(target.stat().st_mode):
        with open(target, "w", encoding="utf-8", newline="\n") as f:
            yield f
        return
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        f = open(tmp, "w", encoding="utf-8", newline="\n")
    except OSError as e:
        raise UserError(f"cannot write '{path}': {e.strerror or e}") from None
    try:
        with f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
