"""The input files of ``deebert predict-dataset``: files, folders and globs expanded and their columns
checked on the driver (:func:`expand_inputs`, :func:`check_columns`), then the lazy Ray Dataset of their
rows (:func:`read_dataset`), read in Ray tasks by the per-file readers of :mod:`.records`, and a failure
about the input unwrapped from Ray's error (:func:`input_error`).

Ray Data's own readers (``read_text``, ``read_json``, ``read_csv``, ``read_parquet``) were checked against
Ray 2.60 and none meets the guarantees here; each reader in :mod:`.records` says which one its Ray
counterpart breaks. The first, for all four: none numbers a row within its file, which the default ids
(path and row) need: ``include_paths`` gives the file, ``read_parquet``'s ``include_row_hash`` a hash, not
a position, and Ray's blocks keep nothing else of where a row came from.
"""
from __future__ import annotations

import csv
import glob
from pathlib import Path

from ..errors import UserError
from .records import PATH_COLUMN, ROW_COLUMN, csv_text_lines, first_line, json_record, plain_type, read_files

FORMATS_BY_SUFFIX = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                     ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
INPUT_FORMATS = ("auto", "text", "jsonl", "csv", "tsv", "parquet")
__all__ = ["PATH_COLUMN", "ROW_COLUMN", "expand_inputs", "check_columns", "read_dataset", "input_error", "about_input"]


def expand_inputs(patterns: list, input_format: str = "auto") -> list:
    """Files, directories (their files with a known suffix) and globs -> sorted unique
    [(absolute path, format)]. A pattern that matches nothing or a file of unknown format is an error."""
    found: dict = {}
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            matches = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in FORMATS_BY_SUFFIX)
            if not matches:
                raise UserError(f"--input '{pattern}': the folder holds no {'/'.join(sorted(FORMATS_BY_SUFFIX))} files")
        elif glob.has_magic(pattern):
            matches = sorted(m for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"--input '{pattern}' matches no files")
        elif p.is_file():
            matches = [str(p)]
        else:
            raise UserError(f"--input '{pattern}' does not exist")
        for m in matches:
            found.setdefault(str(Path(m).resolve()), _format_of(m, input_format))
    return sorted(found.items())


def _format_of(path: str, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    fmt = FORMATS_BY_SUFFIX.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"'{path}': unknown file type; name it .txt, .jsonl, .csv, .tsv or .parquet, or pass --input-format")
    return fmt


def check_columns(files: list, needed: list, texts: tuple = ()) -> None:
    """Every tabular file must have the needed columns (Parquet schema, CSV header, first JSONL record); a
    Parquet text column must hold strings; an id column must hold one type in every file (Ray joins rows
    of several files in one batch, and Arrow cannot join a column of numbers to one of strings); a text
    file has one column, the text, and no other columns. Runs on the driver, before any worker starts."""
    first: dict = {}  # id column -> (its type, the first file that gave it one)
    for path, fmt in files:
        types = _types_of(path, fmt, needed, texts)
        missing = [c for c in needed if c not in types]
        if missing and fmt == "text":
            raise UserError(f"'{path}' is a text file (one text per line): it has no column {', '.join(missing)}; "
                            "use path and row as ids (no --id-column)")
        if missing:
            raise UserError(f"'{path}' has no column {', '.join(repr(m) for m in missing)} (columns: {', '.join(types)})")
        for c in needed:
            if c in texts or types[c] is None:
                continue
            t, where = first.setdefault(c, (types[c], path))
            if t != types[c]:
                raise UserError(f"--id-column {c}: '{where}' holds it as {t}, '{path}' as {types[c]}; one run takes "
                                "one type (convert a file, or predict them in separate runs)")


def _types_of(path: str, fmt: str, needed: list, texts: tuple) -> dict:
    """Column -> its Arrow type as text (None where the first record does not tell)."""
    try:
        if fmt == "parquet":
            return _parquet_types(path, texts)
        if fmt in ("csv", "tsv"):  # read as strings
            return {c: "string" for c in next(csv.reader(csv_text_lines(path), delimiter="\t" if fmt == "tsv" else ","), [])}
        if fmt == "jsonl":
            with open(path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    if raw.strip():
                        return {k: _json_type(v) for k, v in json_record(raw, path, n).items()}
            return {c: None for c in needed}  # no records: nothing to check
    except UserError:
        raise
    except Exception as e:  # unreadable or not the format its name says
        raise UserError(f"'{path}' could not be read as {fmt}: {first_line(e)}") from None
    return {needed[0]: "string"} if needed else {}  # text: the line is the text column


def _json_type(v) -> str | None:
    """The Arrow type the JSONL reader gives a value (pa.array's inference); None: not told by one value."""
    if isinstance(v, bool):
        return "bool"
    return {str: "string", int: "int64", float: "double"}.get(type(v))


def _parquet_types(path: str, texts: tuple) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(path).schema_arrow
    types = {f.name: plain_type(f.type) for f in schema}
    for name in texts:
        t = types.get(name)
        if t is not None and not (pa.types.is_string(t) or pa.types.is_null(t)):
            raise UserError(f"'{path}': column '{name}' holds {schema.field(name).type}, not text; give a column of strings")
    return {k: None if pa.types.is_null(t) else str(t) for k, t in types.items()}


def read_dataset(files: list, columns: list, texts: tuple, ids: bool, retries: int):
    """The lazy Ray Dataset of the input rows: one read task per file (:func:`~.records.read_files`)
    with ``columns`` (the ``texts`` among them as strings) and, when ``ids``, ``path`` and ``row`` (0-based
    position in its file). Reads reserve no CPU: with the actors holding every CPU (concurrency x
    num_cpus = the cluster's), a read task asking for one would never be scheduled; the actors'
    backpressure paces the reads. ``retries``: a read task's retries."""
    import ray.data

    paths = ray.data.from_items([{"path": p, "format": f} for p, f in files], override_num_blocks=len(files))
    return paths.map_batches(read_files, batch_size=1, batch_format="pyarrow", num_cpus=0, max_retries=retries,
                             fn_kwargs=dict(columns=columns, texts=texts, ids=ids))


def input_error(error: BaseException) -> UserError | None:
    """The UserError a worker raised about the input (a reader, the predictor), unwrapped from Ray's task
    error, or None when the failure is not about the input."""
    for e in _chain(error):
        if isinstance(e, UserError) and not hasattr(e, "cause"):  # not Ray's RayTaskError(UserError) twin
            # our messages are one line; Ray appends its retry notes to the exception's message
            return UserError(first_line(e))
    return None


def about_input(error: BaseException) -> bool:
    """Whether a failure is about the input: a UserError raised in a worker."""
    return input_error(error) is not None


def _chain(error: BaseException):
    """The error, the cause Ray keeps in ``.cause`` (the worker's exception) and Python's cause/context."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (getattr(e, "cause", None), e.__cause__, e.__context__) if isinstance(c, BaseException)]
