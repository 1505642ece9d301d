"""Datasets: local CSV/TSV/JSON/JSONL/Parquet files or folders, `save_to_disk` folders, hub names,
and the embedded default (``movie_snippets``). Tables are plain ``{column: list}`` dicts."""
from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

DEFAULT_DATASET = "movie_snippets"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "data"
SPLIT_NAMES = ("train", "validation", "test")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

Table = dict  # column name -> list of values


@dataclass
class Examples:
    """One split ready for tokenisation: texts [n], optional second texts [n], label ids [n]."""

    texts: list
    pairs: list | None
    labels: list

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "Examples":
        return Examples([self.texts[i] for i in idx], None if self.pairs is None else [self.pairs[i] for i in idx],
                        [self.labels[i] for i in idx])


@dataclass
class DataSpec:
    """Where the data comes from and how to read it (stored in the checkpoint so analyze can reuse it)."""

    dataset: str = DEFAULT_DATASET
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    train_split: str = "train"
    eval_split: str = "validation"
    validation_fraction: float = 0.1
    seed: int = 42
    task: str = "classification"  # or "regression": a float label column, one output


@dataclass
class PreparedData:
    train: Examples
    eval: Examples
    label_names: list
    eval_source: str  # e.g. "split 'validation'" or "10% of 'train' (stratified, seed 42)"
    splits: dict  # all raw splits (name -> Table) for later use (e.g. a test split)


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


# ------------------------------------------------------------------------------------------------
# preparation
# ------------------------------------------------------------------------------------------------
def columns_of(table: Table) -> list:
    return [c for c in table if not c.startswith("__names__")]


def _column(table: Table, col: str, split: str, what: str) -> list:
    if col not in table:
        raise UserError(f"{what} column '{col}' not found in split '{split}'; columns: {', '.join(columns_of(table))}")
    return table[col]


def _texts(values: list, col: str) -> list:
    return ["" if v is None else str(v) for v in values]


def label_names_from(table: Table, label_col: str, labels: list) -> list:
    names = table.get(f"__names__{label_col}")
    if names:
        return [str(n) for n in names]
    uniq = {v for v in labels if v is not None}
    if all(isinstance(v, (int, float)) and float(v).is_integer() for v in uniq):
        return [str(int(v)) for v in sorted(uniq)]
    return sorted(str(v) for v in uniq)


def to_examples(table: Table, spec: DataSpec, split: str, label_names: list | None) -> tuple:
    """Table -> (Examples, label_names). With ``label_names`` given, labels unseen in them are an error."""
    texts = _texts(_column(table, spec.text_column, split, "text"), spec.text_column)
    pairs = _texts(_column(table, spec.text_pair_column, split, "text pair"), spec.text_pair_column) if spec.text_pair_column else None
    raw = _column(table, spec.label_column, split, "label")
    if any(v is None or v == "" for v in raw):
        bad = next(i for i, v in enumerate(raw) if v is None or v == "")
        raise UserError(f"split '{split}' row {bad + 1} has no label in column '{spec.label_column}'")
    if spec.task == "regression":
        return Examples(texts, pairs, _floats(raw, split, spec.label_column)), [spec.label_column]
    class_names = table.get(f"__names__{spec.label_column}")
    keys = [class_names[int(v)] if class_names else _label_key(v) for v in raw]
    if label_names is None:
        label_names = label_names_from(table, spec.label_column, raw) if class_names else sorted(set(keys), key=_sort_key)
    index = {n: i for i, n in enumerate(label_names)}
    unseen = sorted({k for k in keys if k not in index})
    if unseen:
        raise UserError(
            f"split '{split}' has label(s) {', '.join(map(repr, unseen[:5]))} that training never saw "
            f"(known: {', '.join(label_names)})"
        )
    return Examples(texts, pairs, [index[k] for k in keys]), label_names


def _floats(raw: list, split: str, col: str) -> list:
    """Regression targets as floats (a UserError names the first row that is not a number)."""
    out = []
    for i, v in enumerate(raw):
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = float("nan")
        if not math.isfinite(x):
            raise UserError(f"split '{split}' row {i + 1}: regression label {v!r} in column '{col}' is not a finite number")
        out.append(x)
    return out


def _label_key(v) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def _sort_key(s: str):
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)


def stratified_split(labels: list, fraction: float, seed: int) -> tuple:
    """Indices (train, held_out) with ``fraction`` of each class held out, seeded."""
    rng = random.Random(seed)
    by_class: dict = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, held = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * fraction)) if len(idx) > 1 else 0
        held += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(held)


def prepare_data(spec: DataSpec) -> PreparedData:
    """Load ``spec.dataset`` and return train/eval Examples with label names (errors are UserErrors)."""
    splits = load_splits(spec.dataset)
    if spec.train_split not in splits:
        raise UserError(f"train split '{spec.train_split}' not found in '{spec.dataset}'; splits: {', '.join(splits)}")
    train_table = splits[spec.train_split]
    if not any(len(v) for v in train_table.values()):
        raise UserError(f"split '{spec.train_split}' of '{spec.dataset}' is empty")
    train, label_names = to_examples(train_table, spec, spec.train_split, None)
    if len(train) == 0:
        raise UserError(f"split '{spec.train_split}' of '{spec.dataset}' is empty")
    if len(label_names) < 2 and spec.task != "regression":
        raise UserError(f"split '{spec.train_split}' has a single class ({label_names[0]!r}); a classifier needs at least 2")
    if spec.eval_split and spec.eval_split in splits:
        evals, _ = to_examples(splits[spec.eval_split], spec, spec.eval_split, label_names)
        source = f"split '{spec.eval_split}'"
    elif spec.eval_split and spec.eval_split != "validation":
        raise UserError(f"evaluation split '{spec.eval_split}' not found in '{spec.dataset}'; splits: {', '.join(splits)}")
    else:
        keys = train.labels if spec.task != "regression" else [0] * len(train)  # regression: one plain random split
        tr, ev = stratified_split(keys, spec.validation_fraction, spec.seed)
        train, evals = train.subset(tr), train.subset(ev)
        how = "stratified, " if spec.task != "regression" else ""
        source = f"{spec.validation_fraction:.0%} of '{spec.train_split}' ({how}seed {spec.seed})"
    if len(evals) == 0:
        raise UserError(f"evaluation data ({source}) is empty")
    return PreparedData(train, evals, label_names, source, splits)


def eval_examples(spec: DataSpec, label_names: list, split: str | None = None) -> tuple:
    """The evaluation examples a checkpoint was trained with (or ``split``) -> (Examples, description)."""
    if split is None:
        data = prepare_data(spec)
        labels_idx = {n: i for i, n in enumerate(data.label_names)}
        # re-map to the checkpoint's label order (the same unless the data changed)
        ex = data.eval
        if data.label_names != label_names:
            if set(data.label_names) - set(label_names):
                raise UserError(f"dataset labels {data.label_names} differ from the checkpoint's {label_names}")
            remap = {labels_idx[n]: label_names.index(n) for n in data.label_names}
            ex = Examples(ex.texts, ex.pairs, [remap[y] for y in ex.labels])
        return ex, data.eval_source
    splits = load_splits(spec.dataset)
    if split not in splits:
        raise UserError(f"split '{split}' not found in '{spec.dataset}'; splits: {', '.join(splits)}")
    ex, _ = to_examples(splits[split], spec, split, label_names)
    return ex, f"split '{split}'"


# ------------------------------------------------------------------------------------------------
# tokenisation and batching
# ------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Token ids of n texts, unpadded: input_ids [n][len], token_type_ids [n][len] or None."""

    input_ids: list
    token_type_ids: list | None
    truncated: int = 0  # how many texts lost tokens to max_length

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list:
        return [len(x) for x in self.input_ids]

    def subset(self, idx) -> "Encoded":
        idx = list(idx)
        tt = None if self.token_type_ids is None else [self.token_type_ids[i] for i in idx]
        return Encoded([self.input_ids[i] for i in idx], tt)


def encode(tokenizer, texts: list, pairs: list | None, max_length: int) -> Encoded:
    """Tokenise with truncation to ``max_length`` and count the texts that were cut."""
    kw = dict(truncation=True, max_length=max_length, padding=False)
    out = tokenizer(texts, pairs, **kw) if pairs is not None else tokenizer(texts, **kw)
    ids = out["input_ids"]
    ttype = out.get("token_type_ids")
    # only texts that hit the limit can have been cut: re-check just those without truncation
    full = [i for i, x in enumerate(ids) if len(x) >= max_length]
    truncated = 0
    if full:
        sub_t = [texts[i] for i in full]
        sub_p = [pairs[i] for i in full] if pairs is not None else None
        raw = tokenizer(sub_t, sub_p, truncation=False, padding=False, verbose=False) if sub_p is not None \
            else tokenizer(sub_t, truncation=False, padding=False, verbose=False)
        truncated = sum(len(x) > max_length for x in raw["input_ids"])
    return Encoded(ids, ttype, truncated)


def pad_batch(enc: Encoded, idx, pad_id: int) -> dict:
    """Rows ``idx`` of ``enc`` -> right-padded tensors {input_ids, attention_mask[, token_type_ids]} [b, s]."""
    import torch

    rows = [enc.input_ids[i] for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if enc.token_type_ids is not None:
        tt = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(idx):
            t = enc.token_type_ids[i]
            tt[j, : len(t)] = torch.tensor(t, dtype=torch.long)
        out["token_type_ids"] = tt
    return out


def length_sorted_batches(lengths: list, batch_size: int) -> list:
    """Index batches with rows of similar length together (less padding); order is deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
