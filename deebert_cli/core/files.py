"""The files and folders a user names, read and written by one set of rules that every command uses.

Reading: a file that is missing, a folder, unreadable or damaged is one :class:`UserError` line naming the
file and what to do (:func:`check_input_file`, :func:`check_readable`, :func:`read_text`,
:func:`read_json`, :func:`check_shape`); option values read from a file take the types of the options
they set, or name the option (:func:`typed_values`).

Writing: an output is checked before any work (:func:`check_output` for a file, :func:`check_output_folder`
for a folder: what stands there now, and a probe that the place can be written), then written whole or not
at all (:func:`atomic_file`, :func:`atomic_dir`: a temporary sibling renamed over the target when
complete). A folder output never replaces a folder of the user's own, the current folder or one holding
it; a folder it does replace (an earlier output of the same kind) keeps the entries the new one does not
own. An I/O failure on the way (a full disk, a read-only place) is one line, and the temporary sibling is
removed."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Callable

from .errors import UserError


# -- why an I/O operation failed -------------------------------------------------------------------
def io_reason(e: BaseException) -> str | None:
    """The reason of an I/O failure in words ('No space left on device', 'Permission denied'), from an
    OSError or from the text of a Rust library's I/O error ('... (os error 28)': safetensors, tokenizers);
    None when ``e`` is no I/O failure."""
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    m = re.search(r"(?:I/O error: )?([^:]*?) \(os error \d+\)", str(e))
    return m.group(1).strip() if m else None


# -- reading -----------------------------------------------------------------------------------------
def check_readable(path, what: str, todo: str = "") -> Path:
    """``path`` opened for reading and closed again (libraries that read it later, some in Rust, report a
    file they may not read as missing) -> Path; UserError naming ``what`` and the reason otherwise."""
    p = Path(path).expanduser()
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise UserError(_unreadable(p, what, e, todo)) from None
    return p


def _unreadable(p: Path, what: str, e: OSError, todo: str) -> str:
    if isinstance(e, FileNotFoundError):
        why = "does not exist"
    elif isinstance(e, IsADirectoryError):
        why = "is a folder, not a file"
    elif isinstance(e, PermissionError):
        why, todo = "cannot be read: permission denied", "check its permissions (it must be readable by this user)"
    else:
        why = f"cannot be read: {io_reason(e)}"
    return f"{what} '{p}' {why}" + (f"; {todo}" if todo else "")


def check_input_file(path, what: str, flag: str) -> Path:
    """An input the user names as a file (``--input``, ``--config``): it exists, is a file, and can be read."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{what} '{path}' ({flag}) is a folder; give a file")
    if not p.exists():
        raise UserError(f"{what} '{path}' ({flag}) does not exist")
    return check_readable(p, f"{what} ({flag})")


def read_text(path, what: str, todo: str = "") -> str:
    """The UTF-8 text of ``path``; one UserError line when it cannot be read or is not text."""
    p = check_readable(path, what, todo)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} '{p}' is not UTF-8 text (byte {e.start})" + (f"; {todo}" if todo else "")) from None
    except OSError as e:
        raise UserError(_unreadable(p, what, e, todo)) from None


def read_json(path, what: str, todo: str = "", shape: dict | None = None) -> dict:
    """A JSON file holding one object (``{...}``), its fields checked against ``shape`` (see
    :func:`check_shape`); one UserError line naming the file when it is missing, unreadable, not JSON,
    or of another shape."""
    p = Path(path).expanduser()
    try:
        data = json.loads(read_text(p, what, todo))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} '{p}' is not valid JSON ({e})" + (f"; {todo}" if todo else "")) from None
    if not isinstance(data, dict):
        raise UserError(f"{what} '{p}' holds a JSON {_json_type(data)} where an object of fields belongs"
                        + (f"; {todo}" if todo else ""))
    check_shape(data, shape or {}, f"{what} '{p}'", todo)
    return data


def check_shape(data: dict, shape: dict, where: str, todo: str = "") -> None:
    """Each field of ``shape`` (name -> type or tuple of types) that ``data`` holds, and is not null, has
    that type (an int is no bool; a float field takes an int); UserError naming the field otherwise."""
    for name, kind in shape.items():
        value = data.get(name)
        if value is None:
            continue
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            want = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
            raise UserError(f"{where} is damaged: '{name}' should be {want}, not a JSON {_json_type(value)}"
                            + (f"; {todo}" if todo else ""))


_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a whole number", float: "a number",
               bool: "true or false"}


def _json_type(value) -> str:
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "list"), (str, "string"), (int, "number"),
                       (float, "number")):
        if isinstance(value, kind):
            return name
    return "null"


# -- option values read from a file -------------------------------------------------------------------
TYPE_WORDS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false",
              "list": "a list or comma-separated text"}


def typed_values(cls, values: dict, source: str) -> dict:
    """``values`` read from a file (``--config x.yaml``) in the types of dataclass ``cls``'s fields: a
    number where text belongs becomes text, text that reads as a number ('1e-3': YAML 1.1 reads no float
    there) a number; anything else of another type is a UserError naming the option and the type it takes."""
    import dataclasses

    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = {}
    for name, value in values.items():
        kinds = [k.strip() for k in types[name].split("|")]
        if value is None and "None" in kinds:
            out[name] = None
            continue
        for kind in kinds:
            ok, converted = _as_type(value, kind)
            if ok:
                out[name] = converted
                break
        else:
            words = " or ".join(TYPE_WORDS.get(k, k) for k in kinds if k != "None")
            got = "nothing" if value is None else repr(value)
            raise UserError(f"invalid option in {source}: {name} (--{name.replace('_', '-')}) takes {words}, got {got}")
    return out


def _as_type(value, kind: str) -> tuple:
    """(fits, value converted) for one annotation word; unknown words are left to the dataclass."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool), value
    if kind in ("int", "float"):
        if isinstance(value, str):
            try:
                value = int(value) if kind == "int" else float(value)
            except ValueError:
                return False, value
            number = True
        return number and (kind == "float" or isinstance(value, int)), value
    if kind == "str":
        return isinstance(value, str) or number, value if isinstance(value, str) else str(value)
    if kind == "list":
        return isinstance(value, (list, tuple, str)) or number, value
    return kind != "None", value


# -- checking an output before any work ---------------------------------------------------------------
def check_output(output: str, input: str | None = None, flag: str = "--output", checkpoint: str | None = None) -> None:
    """UserError when ``output`` cannot be written as a file: its folder is missing, it is a folder, it
    is the input file itself (writing it would destroy what is being read), it is a file of
    ``checkpoint`` (a file already inside that folder: its weights, configs, tokenizer ...), or its
    folder cannot be written."""
    out = Path(output).expanduser()
    if out.is_dir():
        raise UserError(f"{flag} '{output}' is a folder; give a file name")
    if not out.parent.is_dir():
        raise UserError(f"{flag} '{output}': folder '{out.parent}' does not exist")
    if input is not None and _same_file(Path(input).expanduser(), out):
        raise UserError(f"{flag} '{output}' is the input file; write the results to another file")
    if checkpoint is not None and out.exists() and Path(checkpoint).expanduser().resolve() in out.resolve().parents:
        raise UserError(f"{flag} '{output}' is a file of the checkpoint '{checkpoint}'; write the results elsewhere")
    if not (out.exists() and not stat.S_ISREG(out.stat().st_mode)):  # a special file (/dev/stdout) is written as it is
        check_writable(out, flag)


def check_outputs(outputs: dict, inputs: dict | None = None, checkpoint: str | None = None,
                  suffixes: dict | None = None) -> None:
    """Every output flag of a command (``{"--json": path, "--plot": path}``; None: not asked for) checked
    by one rule before any work: :func:`check_output` each; none is an input (``{"--dataset": path}``: the
    file itself, or a file inside an input folder), a file of ``checkpoint``, or another output; an output
    whose format follows its name ends in one of ``suffixes[flag]``."""
    given = [(f, p) for f, p in outputs.items() if p]
    for k, (flag, path) in enumerate(given):
        check_output(path, flag=flag, checkpoint=checkpoint)
        out = Path(path).expanduser()
        for in_flag, source in (inputs or {}).items():
            src = Path(source).expanduser() if source else None
            if src is None or not src.exists():
                continue
            if _same_file(src, out):
                raise UserError(f"{flag} '{path}' is the input file of {in_flag}; write the results to another file")
            if src.is_dir() and out.exists() and src.resolve() in out.resolve().parents:
                raise UserError(f"{flag} '{path}' is a file of the input folder of {in_flag} ('{source}'); write "
                                "the results elsewhere")
        allowed = (suffixes or {}).get(flag)
        if allowed and Path(path).suffix.lower().lstrip(".") not in allowed:
            raise UserError(f"{flag} '{path}': format '{Path(path).suffix.lstrip('.') or '(none)'}' is not "
                            f"supported; name the file .{', .'.join(sorted(a for a in allowed if a))}")
        for other, other_path in given[:k]:
            if _same_file(Path(other_path).expanduser(), out):
                raise UserError(f"{flag} '{path}' is also the {other} output; give each its own file")


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output_folder(target, flag: str = "--output", owned: Callable[[Path], bool] | None = None,
                        kind: str = "an earlier output") -> Path:
    """UserError (before any work) unless folder ``target`` may be written as a whole: it is not the
    current folder or one holding it (those cannot be replaced while in use), not a file, and either
    absent, empty, or a folder this tool wrote (``owned(path)``: an earlier output of the same kind,
    named by ``kind`` in the message); and the place can be written (:func:`check_writable`)."""
    t = Path(target).expanduser()
    here, where = Path.cwd().resolve(), t.resolve()
    if where == here or where in here.parents:
        raise UserError(f"{flag} '{target}' is the current folder or holds it, which cannot be replaced while in "
                        f"use: give a folder of its own")
    if t.exists() and not t.is_dir():
        raise UserError(f"{flag} '{target}' is a file; give a folder")
    if t.is_dir() and any(t.iterdir()) and not (owned is not None and owned(t)):
        raise UserError(f"{flag} '{target}' is a folder of other files, not {kind}: give a new or empty folder "
                        f"(nothing there is replaced)")
    check_writable(t, flag, inside=True)
    return t


def check_writable(target, flag: str, inside: bool = False) -> None:
    """Probe that ``target`` can be written where it will be: in the nearest existing folder above it (a
    temporary sibling is written there, then renamed) and, with ``inside``, in ``target`` itself when it
    is an existing folder (its files are replaced). A probe folder is made and removed at once, which
    also catches a read-only file system (permission bits do not stop root)."""
    t = Path(target).expanduser().absolute()
    place = t.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    places = [place] + ([t] if inside and t.is_dir() else [])
    for p in places:
        probe = p / f".deebert-probe-{uuid.uuid4().hex[:8]}"
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as e:
            raise UserError(f"{flag} '{target}' cannot be written: '{p}' is not writable ({io_reason(e)})") from None


# -- writing whole or not at all ------------------------------------------------------------------------
class _Sink:
    """A file object whose write and flush failures (a full disk) are one UserError naming ``path``."""

    def __init__(self, f, path, special: bool = False):
        self._f, self._path, self._special = f, path, special

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            raise UserError(write_failure(self._path, e, self._special)) from None

    def flush(self):
        try:
            self._f.flush()
        except OSError as e:
            raise UserError(write_failure(self._path, e, self._special)) from None

    def __getattr__(self, name):
        return getattr(self._f, name)


class OutputClosed(UserError):
    """Standard output was closed by its reader (``deebert predict | head``): the run ends quietly."""


class _StdoutSink(_Sink):
    """Standard output as a :class:`_Sink`: a failed write (``> /dev/full``) is one UserError line, a
    reader that went away (a broken pipe) :class:`OutputClosed`. Either way what is still buffered is
    dropped (stdout is pointed at /dev/null), so the interpreter's own flush at exit adds no traceback."""

    def _failed(self, e: OSError):
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._f.fileno())
            os.close(devnull)
        if isinstance(e, BrokenPipeError):
            return OutputClosed("standard output was closed")
        return UserError(f"cannot write the results to standard output: {io_reason(e)}")

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            raise self._failed(e) from None

    def flush(self):
        try:
            self._f.flush()
        except OSError as e:
            raise self._failed(e) from None


def stdout_sink(stream):
    """``stream`` (``sys.stdout``) wrapped so that its write failures are one line (see :class:`_StdoutSink`)."""
    return _StdoutSink(stream, "standard output", special=True)


def write_failure(path, e: BaseException, special: bool = False) -> str:
    """The one line of a failed write; a special file (a device, a pipe) was written directly."""
    why = f"cannot write '{path}': {io_reason(e) or e}"
    return why if special else why + "; nothing was written there (anything there before is as it was)"


@contextlib.contextmanager
def atomic_file(path: str, binary: bool = False):
    """Yield a file (text: UTF-8, '\\n' newlines) writing to a temporary sibling of ``path``, renamed over
    ``path`` when the block ends without error; on an error or Ctrl-C the sibling is removed and ``path``
    is as it was, so a file at ``path`` is always complete. A special file (``/dev/stdout``, a pipe) is
    written directly. Failures to write (a full disk) are one UserError line."""
    target = Path(path).expanduser()
    special = target.exists() and not stat.S_ISREG(target.stat().st_mode)
    dest = target if special else target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        f = open(dest, "wb") if binary else open(dest, "w", encoding="utf-8", newline="\n")
    except OSError as e:
        raise UserError(f"cannot write '{path}': {io_reason(e)}") from None
    try:
        yield _Sink(f, path, special)
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        if not special:
            dest.unlink(missing_ok=True)
        raise
    try:
        f.close()
        if not special:
            os.replace(dest, target)
    except OSError as e:
        if not special:
            dest.unlink(missing_ok=True)
        raise UserError(write_failure(path, e, special)) from None


def atomic_text_file(path: str):
    """:func:`atomic_file` in text mode."""
    return atomic_file(path)


def atomic_dir(target: str | Path, owned: Callable[[str], bool] | None = None):
    """Context manager yielding a temporary sibling folder; on success it replaces ``target``.

    The previous ``target`` stays intact until the very end, so an interrupted write (Ctrl-C, kill, a
    full disk) never leaves a half-written folder where a good one was, and no temporary folder is left
    behind (one that a writer killed with kill -9 left, named after its pid, is removed by the next write
    to ``target``: :func:`remove_stale_siblings`). Entries of the previous ``target`` that the new folder does not hold and ``owned(name)``
    does not claim (the files of an earlier output of the same kind, which the new one replaces) are
    carried over: a user's files there (an export in ``onnx/``, notes) are never lost. An I/O failure is
    one UserError line."""
    return _AtomicDir(Path(target), owned or (lambda name: False))


def _sibling(target: Path, kind: str) -> Path:
    """A temporary sibling of ``target`` named after this process: ``.NAME.tmp-PID-XXXXXXXX``."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_siblings(target: Path) -> list:
    """Remove the temporary siblings of ``target`` (:func:`_sibling`) left by a writer killed on the way
    (kill -9, power loss): only names of that exact pattern, and only when the process named in them is
    no longer running on this machine (a live one, or a pid now reused, is left alone). -> removed paths."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}")
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m is None or not entry.is_dir() or entry.is_symlink() or _running(int(m.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


class _AtomicDir:
    def __init__(self, target: Path, owned: Callable[[str], bool]):
        self.target, self.owned = target, owned
        self.tmp = _sibling(target, "tmp")

    def __enter__(self) -> Path:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_siblings(self.target)  # what an earlier writer killed on the way left behind
            self.tmp.mkdir()
        except OSError as e:
            raise UserError(write_failure(self.target, e)) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._carry_over()
                self._swap()
                return False
            except OSError as e:
                exc = e
        shutil.rmtree(self.tmp, ignore_errors=True)
        if exc is not None and not isinstance(exc, UserError) and io_reason(exc) is not None:
            raise UserError(write_failure(self.target, exc)) from None
        if exc_type is None:
            raise exc
        return False

    def _carry_over(self) -> None:
        """Link (or copy) into the new folder what the old one holds that the new one does not own."""
        if not self.target.is_dir():
            return
        for entry in self.target.iterdir():
            dst = self.tmp / entry.name
            if self.owned(entry.name) or dst.exists() or dst.is_symlink():
                continue
            if entry.is_symlink():
                os.symlink(os.readlink(entry), dst)
            elif entry.is_dir():
                shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, dst)

    def _swap(self) -> None:
        old = None
        if self.target.exists():
            old = _sibling(self.target, "old")
            os.replace(self.target, old)
        try:
            os.replace(self.tmp, self.target)
        except OSError:
            if old is not None:
                os.replace(old, self.target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def usual_mode(path) -> None:
    """Give a file the mode a plain ``open()`` would (0666 less the umask): libraries that write 0600
    (safetensors, onnx's external data) would leave it unreadable to other users, who are then told the
    file does not exist."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _link_or_copy(src, dst) -> None:
    """A hard link (no copy of a big file) where the file system allows it, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
