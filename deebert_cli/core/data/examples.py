"""From tables to examples: which columns hold texts and labels (:class:`DataSpec`), label names, the
evaluation split (a stratified share of train when there is none), as :class:`Examples`."""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .lines import check_text, read_lines
from .readers import DEFAULT_DATASET, Table, load_splits


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


def fingerprint(*splits: Examples, label_names: list | None = None) -> str:
    """A sha256 of the examples themselves (texts, second texts, labels, in order) and the label names:
    it changes when the data at a path changes, whatever the file's name or time stamps say."""
    h = hashlib.sha256()
    h.update(json.dumps(label_names or [], ensure_ascii=False).encode())
    for ex in splits:
        h.update(b"\x1esplit")
        for i in range(len(ex)):
            pair = "" if ex.pairs is None else str(ex.pairs[i])
            h.update(f"{ex.texts[i]}\x1f{pair}\x1f{ex.labels[i]!r}\x1e".encode("utf-8", "replace"))
    return h.hexdigest()


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


def read_unlabeled(path: str, spec: DataSpec, flag: str = "--unlabeled") -> tuple:
    """Unlabelled texts (distillation, label-free calibration): a .txt file (one text per line, read by
    :func:`~.lines.read_lines` as predict reads: a line ends at \\n only; a tab separates a pair; blank
    lines skipped) or a data file / folder read like --dataset (its text column(s); every split). Texts
    are read by predict-dataset's rules: a line that is not UTF-8, or a text that is not a string (a
    number), is one UserError naming ``flag``, the file and the line or record. Returns (texts, pairs | None)."""
    p = Path(path)
    where = f"{flag} '{path}'"
    if not p.exists():
        raise UserError(f"{where} does not exist")
    if p.is_file() and p.suffix.lower() in (".txt", ""):
        with open(p, "rb") as f:
            lines = [l for l in read_lines(f, strict=where) if l.strip()]
        if spec.text_pair_column:
            parts = [l.partition("\t") for l in lines]
            return [a for a, _, _ in parts], [b for _, _, b in parts]
        return lines, None
    texts, pairs = [], [] if spec.text_pair_column else None
    for name, table in load_splits(str(p)).items():
        split = "" if p.is_file() else f" split '{name}'"
        if spec.text_column not in table:
            raise UserError(f"{where}{split} has no column '{spec.text_column}' (columns: "
                            f"{', '.join(columns_of(table)) or 'none'}); name the text column with --text-column")
        texts += _checked_texts(table[spec.text_column], spec.text_column, f"{where}{split}")
        if pairs is not None:
            pairs += _checked_texts(table.get(spec.text_pair_column, [""] * len(table[spec.text_column])),
                                    spec.text_pair_column, f"{where}{split}")
    if not texts:
        raise UserError(f"{where} holds no texts")
    return texts, pairs


def _checked_texts(values: list, col: str, where: str) -> list:
    """Texts of a data file's column by predict-dataset's rule (:func:`~.lines.check_text`): strings, null
    an empty text, anything else refused naming its record."""
    return ["" if check_text(v, col, f"{where} record {i}") is None else v for i, v in enumerate(values, 1)]
