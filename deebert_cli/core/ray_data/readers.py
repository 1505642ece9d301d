"""Reading the input files of ``deebert predict-dataset`` in Ray Data tasks: files, folders and globs
expanded, their columns checked up front, then read in chunks of ``READ_CHUNK`` rows (text lines, JSONL,
CSV/TSV, Parquet) with each row's file and position."""
from __future__ import annotations

import glob
import json
from pathlib import Path

from ..errors import UserError

FORMATS_BY_SUFFIX = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                     ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
INPUT_FORMATS = ("auto", "text", "jsonl", "csv", "tsv", "parquet")
PATH_COLUMN, ROW_COLUMN = "path", "row"
READ_CHUNK = 4096  # rows per block a reader yields


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


def check_columns(files: list, needed: list) -> None:
    """Every tabular file must have the needed columns (Parquet schema, CSV header, first JSONL record);
    a text file has one column, the text, and no other columns."""
    for path, fmt in files:
        cols = _columns_of(path, fmt, needed)
        missing = [c for c in needed if c not in cols]
        if missing and fmt == "text":
            raise UserError(f"'{path}' is a text file (one text per line): it has no column {', '.join(missing)}; "
                            "use path and row as ids (no --id-column)")
        if missing:
            raise UserError(f"'{path}' has no column {', '.join(repr(m) for m in missing)} (columns: {', '.join(cols)})")


def _columns_of(path: str, fmt: str, needed: list) -> list:
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).schema_arrow.names
        if fmt in ("csv", "tsv"):
            import csv

            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                return next(csv.reader(f, delimiter="\t" if fmt == "tsv" else ","), [])
        if fmt == "jsonl":
            with open(path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    if raw.strip():
                        return list(_json_record(raw, path, n))
            return list(needed)  # no records: nothing to check
    except UserError:
        raise
    except Exception as e:  # unreadable or not the format its name says
        raise UserError(f"'{path}' could not be read as {fmt}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return [needed[0]] if needed else []  # text: the line is the text column


def _json_record(raw: bytes, path: str, n: int) -> dict:
    try:
        rec = json.loads(raw)
    except ValueError as e:
        raise UserError(f"'{path}' line {n} is not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise UserError(f"'{path}' line {n} is not a JSON object")
    return rec


def read_files(batch, *, columns: list, text_column: str, ids: bool):
    """map_batches generator over a batch of (path, format) rows: yields pyarrow Tables of at most
    ``READ_CHUNK`` rows with ``columns`` (text and pair columns as strings) and, when ``ids``, ``path``
    and ``row`` (0-based position in its file). Row order within a file is kept."""
    import pyarrow as pa

    paths, fmts = batch["path"].to_pylist(), batch["format"].to_pylist()
    for path, fmt in zip(paths, fmts):
        start = 0
        for chunk in _read_chunks(path, fmt, columns, text_column):
            if ids:
                n = chunk.num_rows
                chunk = chunk.append_column(PATH_COLUMN, pa.array([path] * n, pa.string()))
                chunk = chunk.append_column(ROW_COLUMN, pa.array(range(start, start + n), pa.int64()))
                start += n
            yield chunk


def _read_chunks(path: str, fmt: str, columns: list, text_column: str):
    if fmt == "text":
        yield from _text_chunks(path, text_column)
    elif fmt == "jsonl":
        yield from _jsonl_chunks(path, columns)
    elif fmt in ("csv", "tsv"):
        yield from _csv_chunks(path, columns, "\t" if fmt == "tsv" else ",")
    else:
        yield from _parquet_chunks(path, columns)


def _text_chunks(path: str, text_column: str):
    """One row per line, read by ``deebert predict``'s own line reader; empty lines kept as rows."""
    import pyarrow as pa

    from ..runtime.stream import read_lines  # torch-free: cheap in a read worker

    with open(path, "rb") as f:
        buf = []
        for line in read_lines(f):
            buf.append(line)
            if len(buf) == READ_CHUNK:
                yield pa.table({text_column: pa.array(buf, pa.string())})
                buf = []
        if buf:
            yield pa.table({text_column: pa.array(buf, pa.string())})


def _jsonl_chunks(path: str, columns: list):
    """One row per JSON object (blank lines are not records); a missing key reads as null."""
    with open(path, "rb") as f:
        buf = []
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            rec = _json_record(raw, path, n)
            buf.append([rec.get(c) for c in columns])
            if len(buf) == READ_CHUNK:
                yield _rows_table(buf, columns)
                buf = []
        if buf:
            yield _rows_table(buf, columns)


def _rows_table(rows: list, columns: list):
    import pyarrow as pa

    arrays = []
    for j in range(len(columns)):
        vals = [r[j] for r in rows]
        try:
            arrays.append(pa.array(vals))
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in one column: keep them as text
            arrays.append(pa.array([None if v is None else str(v) for v in vals], pa.string()))
    return pa.Table.from_arrays(arrays, names=columns)


def _csv_chunks(path: str, columns: list, delimiter: str):
    """CSV/TSV with a header; the needed columns read as strings (as written in the file)."""
    import pyarrow as pa
    from pyarrow import csv

    reader = csv.open_csv(path, parse_options=csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                          convert_options=csv.ConvertOptions(include_columns=columns,
                                                             column_types={c: pa.string() for c in columns}))
    for rb in reader:
        if rb.num_rows:
            yield pa.Table.from_batches([rb]).select(columns)


def _parquet_chunks(path: str, columns: list):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for rb in pq.ParquetFile(path).iter_batches(batch_size=READ_CHUNK, columns=columns):
        yield pa.Table.from_batches([rb])
