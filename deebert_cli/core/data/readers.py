"""Reading datasets: local CSV/TSV/JSON/JSONL/Parquet files or folders, `save_to_disk` folders, hub names,
and the embedded default (``movie_snippets``). Tables are plain ``{column: list}`` dicts."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..errors import UserError

DEFAULT_DATASET = "movie_snippets"
BUILTIN_DIR = Path(__file__).resolve().parent.parent.parent / "data"
SPLIT_NAMES = ("train", "validation", "test")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

Table = dict  # column name -> list of values


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def load_splits(spec: str) -> dict:
    """Read every split of ``spec`` -> {split name: Table}."""
    if spec in (None, "", DEFAULT_DATASET):
        return _read_folder(BUILTIN_DIR / DEFAULT_DATASET)
    p = Path(spec).expanduser()
    if p.is_file():
        return {"train": read_table(p)}
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "dataset_info.json").is_file():
            return _read_saved(p)
        return _read_folder(p)
    if os.sep in spec and (spec.startswith((".", "/", "~")) or Path(spec).suffix in FILE_SUFFIXES):
        raise UserError(f"dataset file or folder '{spec}' does not exist")
    return _read_hub(spec)


def read_table(path: Path) -> Table:
    """One file -> {column: list}. JSON Lines, JSON arrays of rows, CSV/TSV and Parquet are read by
    `datasets` (Arrow-backed, memory-mapped; only '\\n' ends a JSON line, so U+0085, U+2028 and the like
    stay inside a text); CSV/TSV cells stay strings, JSON and Parquet keep their types. A JSON document
    holding one object ({column: [...]} or {"data": [...]}) is parsed whole: it has no rows to stream."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise UserError(f"unsupported file type '{suffix}' for '{path}' (use {', '.join(FILE_SUFFIXES)})")
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _load_file(path, "parquet")
    if suffix == ".json" and _first_char(path) == "{" and not _looks_jsonl(path):
        return _read_json_object(path)
    return _load_file(path, "json")


def _load_file(path: Path, builder: str, **kw) -> Table:
    """``datasets.load_dataset(builder, data_files=path)`` -> Table; any failure is one UserError line."""
    import datasets
    from datasets.utils import logging as ds_logging

    level, bars = ds_logging.get_verbosity(), datasets.is_progress_bar_enabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # it logs the error it raises; ours is the one line shown
    datasets.disable_progress_bars()  # a local file: no progress worth showing
    try:
        return _from_hf(datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **kw))
    except StopIteration:  # an empty file: no rows, no columns
        return {}
    except Exception as e:  # datasets wraps parse errors of many kinds
        raise UserError(f"cannot read '{path}': {_why(path, builder, e)}") from None
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _why(path: Path, builder: str, e: Exception) -> str:
    """The first line of the root cause; for JSON Lines, the first line of the file that does not parse."""
    if builder == "json" and _first_char(path) != "[":
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):  # binary lines end at b"\n" only
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as bad:
                        return f"line {number}, column {bad.colno}: {bad.msg}"
                    except UnicodeDecodeError as bad:
                        return f"line {number}: {bad}"
    while e.__cause__ is not None or (e.__context__ is not None and not str(e).strip()):
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_csv(path: Path, delimiter: str) -> Table:
    """CSV/TSV via `datasets`, every cell a string (as written: '007' stays '007', 'NA' stays 'NA')."""
    import datasets

    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter=delimiter), [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read '{path}': {e}") from None
    if not header:
        return {}
    features = datasets.Features({c: datasets.Value("string") for c in header})
    return _load_file(path, "csv", delimiter=delimiter, features=features, keep_default_na=False,
                      encoding="utf-8-sig")


def _read_json_object(path: Path) -> Table:
    """A JSON document holding one object: {column: [values]} or {"data": [rows] or {column: [values]}}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read '{path}': {e}") from None
    if isinstance(data.get("data"), (list, dict)):
        data = data["data"]
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        if len({len(v) for v in data.values()}) > 1:
            raise UserError(f"'{path}': its columns differ in length")
        return {k: list(v) for k, v in data.items()}
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"'{path}' must hold one object per row, or an object of columns")
    cols: dict = {}
    for r in data:
        for k in r:
            cols.setdefault(k, None)
    return {k: [r.get(k) for r in data] for k in cols}


def _first_char(path: Path) -> str:
    """The first character that is not whitespace (a UTF-8 BOM skipped), or ''."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return chr(head[0]) if head else ""


def _looks_jsonl(path: Path) -> bool:
    with path.open("rb") as f:  # binary lines end at b"\n" only
        first = f.readline().strip()
        second = f.readline().strip()
    return first.startswith(b"{") and second.startswith(b"{")


def _read_folder(p: Path) -> dict:
    splits = {}
    for f in sorted(p.iterdir()):
        if f.is_file() and f.suffix.lower() in FILE_SUFFIXES:
            splits.setdefault(f.stem, read_table(f))
    if not splits:
        raise UserError(f"folder '{p}' holds no data files ({', '.join(FILE_SUFFIXES)})")
    return splits


def _read_saved(p: Path) -> dict:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises many kinds
        raise UserError(f"cannot read saved dataset '{p}': {e}") from None
    if isinstance(ds, datasets.Dataset):
        ds = {"train": ds}
    return {name: _from_hf(split) for name, split in ds.items()}


def _read_hub(spec: str) -> dict:
    """``name``, ``name/config`` (glue/sst2 style), ``org/name`` or ``org/name:config`` from the hub."""
    import datasets

    attempts = []
    if ":" in spec:
        name, config = spec.split(":", 1)
        attempts.append((name, config))
    else:
        if spec.count("/") == 1:
            attempts.append(tuple(spec.split("/")))
        attempts.append((spec, None))
    last = None
    for name, config in attempts:
        try:
            ds = datasets.load_dataset(name, config)
            return {k: _from_hf(v) for k, v in ds.items()}
        except Exception as e:  # offline, unknown name, unknown config...
            last = e
    msg = str(last).strip().splitlines()[0] if last and str(last).strip() else type(last).__name__
    raise UserError(
        f"dataset '{spec}' is not a local file or folder, and loading it from the Hugging Face hub failed "
        f"(offline, or no such dataset/config?): {msg}"
    )


def _from_hf(split) -> Table:
    table = split.to_dict()
    # keep ClassLabel names so integer labels print as names
    for col, feat in split.features.items():
        names = getattr(feat, "names", None)
        if names:
            table[f"__names__{col}"] = list(names)
    return table
