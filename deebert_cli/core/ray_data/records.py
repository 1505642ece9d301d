"""The per-file readers of ``deebert predict-dataset``, hand-written because Ray Data's own readers do not
meet these guarantees (each reader says which it breaks; the first, for all four: a row's position in its
file, see :mod:`.readers`): :func:`read_files`, a ``map_batches`` generator over (path, format) rows, yields
pyarrow Tables of at most ``READ_CHUNK`` rows of one file, in file order, each row with its ``path`` and
``row`` (0-based position in its file) when asked. What a file holds is checked as it is read, and what
is wrong ends the run in one UserError naming the file and the line: a JSONL record without a needed key,
a text that is not a string, an id whose type changes; a CSV/TSV line that is not UTF-8 or has another
number of fields than the header. Nothing is substituted: a null text is an empty row (as an empty line
is in ``deebert predict``), and a value is either carried as written or refused."""
from __future__ import annotations

import csv
import json
import re

from ..data.lines import check_text, kind, short
from ..errors import UserError

PATH_COLUMN, ROW_COLUMN = "path", "row"
READ_CHUNK = 4096  # rows per block a reader yields


def read_files(batch, *, columns: list, texts: tuple, ids: bool):
    """map_batches generator over a batch of (path, format) rows: yields pyarrow Tables of at most
    ``READ_CHUNK`` rows with ``columns`` (``texts`` as strings) and, when ``ids``, ``path`` and ``row``
    (0-based position in its file). Row order within a file is kept."""
    import pyarrow as pa

    paths, fmts = batch["path"].to_pylist(), batch["format"].to_pylist()
    for path, fmt in zip(paths, fmts):
        start = 0
        for chunk in read_one(path, fmt, columns, texts):
            if ids:
                n = chunk.num_rows
                chunk = chunk.append_column(PATH_COLUMN, pa.array([path] * n, pa.string()))
                chunk = chunk.append_column(ROW_COLUMN, pa.array(range(start, start + n), pa.int64()))
                start += n
            yield chunk


def read_one(path: str, fmt: str, columns: list, texts: tuple):
    """The Tables of one file; a file that cannot be opened is a UserError naming it."""
    readers = {"text": lambda: _text_chunks(path, texts[0] if texts else columns[0]),
               "jsonl": lambda: _jsonl_chunks(path, columns, texts),
               "csv": lambda: _csv_chunks(path, columns, ","), "tsv": lambda: _csv_chunks(path, columns, "\t"),
               "parquet": lambda: _parquet_chunks(path, columns)}
    try:
        yield from readers[fmt]()
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise UserError(f"'{path}' could not be read: {e.strerror}") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------------
# text: deebert predict's line reader
# ------------------------------------------------------------------------------------------------
def _text_chunks(path: str, text_column: str):
    """One row per line, read by ``deebert predict``'s own line reader (lines end at \\n only, so a text
    holding U+0085 or U+2028 stays one row; bytes that are not UTF-8 are replaced, as predict does);
    empty lines kept as rows.

    Not ``ray.data.read_text``: it splits a file with ``str.splitlines``, which also ends a line at
    U+0085, U+2028, U+2029, \\x0b, \\x0c and \\x1c-\\x1e (one text would become several rows), decodes
    strictly (a stray byte fails the run where ``predict`` replaces it), and reads a file whole."""
    import pyarrow as pa

    from ..data.lines import read_lines  # the one line-reading rule (torch-free: cheap in a read worker)

    with open(path, "rb") as f:
        buf = []
        for line in read_lines(f):
            buf.append(line)
            if len(buf) == READ_CHUNK:
                yield pa.table({text_column: pa.array(buf, pa.string())})
                buf = []
        if buf:
            yield pa.table({text_column: pa.array(buf, pa.string())})


# ------------------------------------------------------------------------------------------------
# JSONL: one object per line, checked record by record
# ------------------------------------------------------------------------------------------------
def json_record(raw: bytes, path: str, n: int) -> dict:
    """Line ``n`` of ``path`` as a JSON object, or a UserError naming the line."""
    try:
        rec = json.loads(raw)
    except UnicodeDecodeError as e:
        raise UserError(f"'{path}' line {n} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    except ValueError as e:
        raise UserError(f"'{path}' line {n} is not valid JSON: {getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')}") from None
    if not isinstance(rec, dict):
        raise UserError(f"'{path}' line {n} is not a JSON object (it holds {kind(rec)})")
    return rec


def _jsonl_chunks(path: str, columns: list, texts: tuple):
    """One row per JSON object (blank lines are not records). Every record holds every needed key; a text
    is a string or null (null: an empty row); an id keeps its JSON type, the same on every line.

    Not ``ray.data.read_json``: pyarrow's JSON reader (its default) gives a missing key and a null alike
    (null), so a record without its text would pass as an empty row; its error for a bad line names no
    line, and on any pyarrow error Ray logs a warning and re-reads the whole file with ``json.load``,
    which fails on every JSONL file of two records or more ("Extra data: line 2 column 1"). ``lines=True`` (pandas) turns
    a missing key into NaN as well."""
    types: dict = {}  # id column -> the Arrow type of its first non-null chunk
    with open(path, "rb") as f:
        rows, lines = [], []
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            rows.append(_values(json_record(raw, path, n), columns, texts, path, n))
            lines.append(n)
            if len(rows) == READ_CHUNK:
                yield _rows_table(rows, lines, columns, texts, types, path)
                rows, lines = [], []
        if rows:
            yield _rows_table(rows, lines, columns, texts, types, path)


def _values(rec: dict, columns: list, texts: tuple, path: str, n: int) -> list:
    out = []
    for c in columns:
        if c not in rec:
            hint = " (null gives an empty row)" if c in texts else ""
            raise UserError(f"'{path}' line {n} has no key '{c}'{hint}")
        v = rec[c]
        if c in texts:
            check_text(v, c, f"'{path}' line {n}")
        out.append(v)
    return out


def _rows_table(rows: list, lines: list, columns: list, texts: tuple, types: dict, path: str):
    import pyarrow as pa

    arrays = []
    for j, c in enumerate(columns):
        vals = [r[j] for r in rows]
        if c in texts:
            arrays.append(pa.array(vals, pa.string()))
            continue
        try:
            arr = pa.array(vals, types.get(c))
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            raise _mixed(vals, lines, c, types.get(c), path) from None
        if c not in types and not pa.types.is_null(arr.type):
            types[c] = arr.type
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, names=columns)


def _mixed(vals: list, lines: list, col: str, typ, path: str) -> UserError:
    """The first value of an id column that does not fit the type of the values before it."""
    import pyarrow as pa

    first = next((v for v in vals if v is not None), None)
    for v, n in zip(vals, lines):
        if v is None:
            continue
        try:
            pa.array([v], typ if typ is not None else pa.array([first]).type)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            return UserError(f"'{path}' line {n}: '{col}' holds {kind(v)} ({short(v)}), unlike the lines before it; "
                             f"give '{col}' one JSON type in every record")
    return UserError(f"'{path}': the values of '{col}' have no common type; give '{col}' one JSON type in every record")


# ------------------------------------------------------------------------------------------------
# CSV/TSV and Parquet: pyarrow's readers, errors named by file and line
# ------------------------------------------------------------------------------------------------
def csv_arrow_args(columns: list, delimiter: str) -> dict:
    """pyarrow CSV options: a header, quoted values may hold newlines, the needed columns only and as
    strings (as written: '007' stays '007', 'NA' stays 'NA')."""
    import pyarrow as pa
    from pyarrow import csv as pcsv

    return dict(parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pcsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns}))


def _csv_chunks(path: str, columns: list, delimiter: str):
    """CSV/TSV with a header, read by pyarrow; a parse or encoding error becomes one UserError naming the
    file and line (:func:`csv_problem`).

    Not ``ray.data.read_csv`` (pyarrow's reader as well): Ray 2.60 re-assigns ``ParseOptions.
    invalid_row_handler`` to itself (its workaround for ARROW-17641), which makes pyarrow call None on a
    malformed row, so the worker prints a traceback ("'NoneType' object is not callable", or a
    UnicodeDecodeError for a row that is not UTF-8) to the terminal before the run fails, and Ray's
    error names the file but not the line."""
    import pyarrow as pa
    from pyarrow import csv as pcsv

    try:
        for rb in pcsv.open_csv(path, **csv_arrow_args(columns, delimiter)):
            if rb.num_rows:
                yield pa.Table.from_batches([rb]).select(columns)
    except pa.ArrowInvalid as e:
        raise csv_problem(path, delimiter, e) from None


def csv_text_lines(path: str):
    """The lines of a CSV/TSV file as text, for Python's csv module: a UserError names the first line
    that holds a NUL byte (a binary file) or is not UTF-8. Lines end at \\n only, as in pyarrow."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if b"\0" in raw:
                raise UserError(f"'{path}' line {n} holds a NUL byte: it is not a text file")
            try:
                yield raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"'{path}' line {n} is not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None


def csv_problem(path: str, delimiter: str, error: Exception) -> UserError:
    """The first line of a CSV/TSV file that pyarrow could not read, found by reading it again with
    Python's csv module (only after pyarrow failed: pyarrow's message counts CSV rows, not lines, and
    echoes the row's bytes); pyarrow's first line, the echo cut, when Python's reader finds nothing."""
    reader = None
    try:
        reader = csv.reader(csv_text_lines(path), delimiter=delimiter)
        header = next(reader, [])
        start = reader.line_num + 1
        for rec in reader:
            if rec and len(rec) != len(header):
                fields = f"{len(rec)} field{'s' if len(rec) != 1 else ''}"
                return UserError(f"'{path}' line {start} has {fields}; the header has {len(header)}")
            start = reader.line_num + 1
    except UserError as e:
        return e
    except csv.Error as e:
        return UserError(f"'{path}' line {reader.line_num if reader else 1}: {e}")
    what = re.sub(r"(got \d+): .*", r"\1", first_line(error))
    return UserError(f"'{path}' could not be read as {'TSV' if delimiter == chr(9) else 'CSV'}: {what}")


def _parquet_chunks(path: str, columns: list):
    """The needed columns of a Parquet file, in row order, with :func:`plain_type` types.

    Not ``ray.data.read_parquet``: besides the row positions, in Ray 2.60 its default datasource (V2)
    lists the files in a task of its own that asks for a CPU whatever ``num_cpus`` says, so with the
    actors holding every CPU the run hangs; and it samples each file in Ray tasks while the dataset is
    built, so a damaged file fails there first, and each retry's traceback is printed to the terminal by
    the raylet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=READ_CHUNK, columns=columns):
            table = pa.Table.from_batches([rb])
            yield table.cast(pa.schema([pa.field(f.name, plain_type(f.type)) for f in table.schema]))
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise UserError(f"'{path}' could not be read as Parquet: {first_line(e)}") from None


def plain_type(t):
    """The Arrow type a column is carried in: strings as ``string`` (not large or view or dictionary
    encoded), integers as ``int64`` and floats as ``double`` (lossless), so that Arrow can join the rows of
    different files in one batch; other types as they are."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return pa.string()
    if pa.types.is_signed_integer(t) or (pa.types.is_unsigned_integer(t) and t.bit_width < 64):
        return pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    return t
