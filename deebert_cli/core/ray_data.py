"""Batch prediction over many files on Ray Data (optional extra: ``pip install 'deebert-cli[ray]'``).

Two public pieces:

* :class:`DeeBertPredictor`, a callable class for ``ray.data.Dataset.map_batches(DeeBertPredictor,
  fn_constructor_kwargs=..., concurrency=N)``: each actor loads the checkpoint once and maps a batch (a
  pyarrow Table, a pandas DataFrame or a dict of numpy arrays) with a text column to label, confidence,
  exit_layer, entropy (regression: value) and empty, with the same exit rules and engine as ``deebert
  predict`` (:func:`~.inference.resolve_rule`, :func:`~.inference.predict_stream`). One row out per row in.
* :func:`predict_dataset`, what ``deebert predict-dataset`` runs: expand files and globs, read them with
  Ray Data (text, JSONL, CSV/TSV, Parquet), predict in an actor pool, write sharded Parquet or JSONL that
  carries each row's identifying columns, and summarise the exits.

Nothing else in deebert imports this module, and it imports ray only inside functions, so the rest of the
package works without the extra.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from .config import PredictConfig, _check, parse_thresholds
from .errors import UserError

RAY_EXTRA = "pip install 'deebert-cli[ray]'"
FORMATS_BY_SUFFIX = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                     ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
INPUT_FORMATS = ("auto", "text", "jsonl", "csv", "tsv", "parquet")
OUTPUT_FORMATS = ("parquet", "jsonl")
PATH_COLUMN, ROW_COLUMN = "path", "row"
OUTPUT_NAMES = {"label", "confidence", "exit_layer", "entropy", "empty", "value"}  # prediction columns
READ_CHUNK = 4096  # rows per block a reader yields
# the exit options a predictor takes, validated by PredictConfig (same rules and messages as `deebert predict`)
PREDICT_OPTIONS = ("threshold", "thresholds", "entropy", "exit_policy", "patience", "tolerance", "batch_size",
                   "engine", "max_length", "device", "precision", "runtime", "onnx_precision")


def require_ray():
    """Import ray (and ray.data), or one UserError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(f"Ray Data is not installed: {RAY_EXTRA}") from None
    return ray


def load_model(path, runtime: str = "torch", device=None, onnx_precision: str = "fp32", threads: int | None = None):
    """The checkpoint an actor predicts with, on the torch or the onnx runtime (``deebert export``)."""
    from .runtime.stream import load_for_inference

    opts = {"precision": onnx_precision, "threads": threads} if runtime == "onnx" else {}
    return load_for_inference(path, runtime, device, **opts)


# ------------------------------------------------------------------------------------------------
# the map_batches callable
# ------------------------------------------------------------------------------------------------
class DeeBertPredictor:
    """Callable class for ``Dataset.map_batches`` (an actor pool: ``concurrency=N``).

    ``text_column`` holds the texts (``text_pair_column`` the second texts of a sentence-pair
    checkpoint); a null or blank text gives a row marked ``empty``, as an empty line does in ``deebert
    predict``. The output keeps the input's ``keep_columns`` (None: every input column) and adds
    ``{prefix}label``, ``confidence``, ``exit_layer`` (1-based), ``entropy`` and ``empty`` (regression:
    ``value``, ``exit_layer``, ``empty``), in the input's batch format. ``options`` are ``deebert
    predict``'s exit options (threshold, thresholds, entropy, exit_policy, patience, tolerance,
    batch_size, engine, max_length, device, precision), validated the same way."""

    def __init__(self, checkpoint: str, *, text_column: str = "text", text_pair_column: str | None = None,
                 keep_columns: list | None = None, prefix: str = "", num_threads: int | None = None, **options):
        unknown = sorted(set(options) - set(PREDICT_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(PREDICT_OPTIONS)}")
        from .runtime.rules import resolve_rule
        from .runtime.stream import PredictStats

        cfg = PredictConfig(checkpoint=str(checkpoint), window=max(1024, options.get("batch_size", 32)), **options)
        self.cfg, self.text_column, self.pair_column = cfg, text_column, text_pair_column
        self.keep_columns, self.prefix = keep_columns, prefix
        if cfg.runtime == "onnx":  # ONNX Runtime on the CPU, without torch
            self.device = "cpu"
            self.ckpt = load_model(cfg.checkpoint, "onnx", onnx_precision=cfg.onnx_precision,
                                   threads=int(num_threads) if num_threads else None)
        else:
            import torch

            from .device import check_precision, resolve_device

            if num_threads:
                torch.set_num_threads(int(num_threads))
            self.device = resolve_device(cfg.device)
            check_precision(cfg.precision, self.device)
            self.ckpt = load_model(cfg.checkpoint, device=self.device)
        self.rule, self.rule_source = resolve_rule(self.ckpt, cfg.threshold, cfg.thresholds, cfg.entropy,
                                                   policy=cfg.exit_policy, patience=cfg.patience,
                                                   tolerance=cfg.tolerance)
        self.regression = self.ckpt.task == "regression"
        pairs = bool(self.ckpt.meta.get("data", {}).get("text_pair_column"))
        # a pair checkpoint without text_pair_column reads "first<TAB>second" texts, as predict does
        if text_pair_column and not pairs:
            raise UserError(f"'{checkpoint}' takes one text per row; it was not trained on pairs (drop --text-pair-column)")
        self.stats = PredictStats(self.ckpt.model.num_layers)  # running totals of this actor

    def output_columns(self) -> list:
        names = ["value", "exit_layer", "empty"] if self.regression else ["label", "confidence", "exit_layer", "entropy", "empty"]
        return [self.prefix + n for n in names]

    def __call__(self, batch):
        table, back = _to_arrow(batch)
        keep = table.column_names if self.keep_columns is None else list(self.keep_columns)
        clash = sorted(set(keep) & set(self.output_columns()))
        if clash:
            raise UserError(f"input column(s) {', '.join(clash)} would be overwritten by the predictions: "
                            "keep other columns or give the predictions a prefix")
        lines = self._lines(table)
        results = self.predict_lines(lines)
        if len(results) != table.num_rows:  # the engine yields one result per line; never drop a row
            raise RuntimeError(f"predicted {len(results)} rows for a batch of {table.num_rows}")
        out = table.select(keep)
        for name, values in zip(self.output_columns(), self._columns(results)):
            out = out.append_column(name, values)
        return back(out)

    def predict_lines(self, lines: list) -> list:
        """Texts in ``deebert predict``'s line format (a tab separates a pair) -> one Prediction each."""
        from .runtime.stream import predict_stream

        cfg = self.cfg
        return list(predict_stream(self.ckpt, lines, self.rule, self.device, batch_size=cfg.batch_size,
                                   window=max(cfg.window, len(lines)), max_length=cfg.max_length,
                                   engine=cfg.engine, stats=self.stats, precision=cfg.precision))

    def _lines(self, table) -> list:
        """The batch's texts as predict's lines: null -> '' (marked empty); a pair joined by a tab (tabs
        inside the first text become spaces, which the tokenizer reads the same)."""
        texts = _column_values(table, self.text_column)
        if not self.pair_column:
            return ["" if t is None else str(t) for t in texts]
        seconds = _column_values(table, self.pair_column)
        return ["" if a is None or not str(a).strip() else f"{str(a).replace(chr(9), ' ')}\t{'' if b is None else b}"
                for a, b in zip(texts, seconds)]

    def _columns(self, results: list) -> list:
        """Predictions -> pyarrow arrays (nulls where a row is empty)."""
        import pyarrow as pa

        live = [not r.empty for r in results]
        layer = pa.array([r.exit_layer if ok else None for r, ok in zip(results, live)], pa.int32())
        empty = pa.array([r.empty for r in results], pa.bool_())
        if self.regression:
            return [pa.array([r.value if ok else None for r, ok in zip(results, live)], pa.float64()), layer, empty]
        names = self.ckpt.label_names
        return [pa.array([names[r.label] if ok else None for r, ok in zip(results, live)], pa.string()),
                pa.array([r.confidence if ok else None for r, ok in zip(results, live)], pa.float64()),
                layer,
                pa.array([r.entropy if ok else None for r, ok in zip(results, live)], pa.float64()),
                empty]


def _column_values(table, name: str) -> list:
    if name not in table.column_names:
        raise UserError(f"no column '{name}' in the batch (columns: {', '.join(table.column_names)})")
    return table.column(name).to_pylist()


def _to_arrow(batch) -> tuple:
    """A map_batches batch -> (pyarrow Table, function turning a Table back into the batch's format)."""
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch, lambda t: t
    try:
        import pandas as pd

        if isinstance(batch, pd.DataFrame):
            return pa.Table.from_pandas(batch, preserve_index=False), lambda t: t.to_pandas()
    except ImportError:
        pass
    if isinstance(batch, dict):
        table = pa.table({k: pa.array(list(v)) for k, v in batch.items()})
        return table, lambda t: {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
    raise TypeError(f"unsupported batch type {type(batch).__name__}: pass a pyarrow Table, pandas DataFrame or dict")


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
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

    from .runtime.stream import read_lines  # torch-free: cheap in a read worker

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


# ------------------------------------------------------------------------------------------------
# the pipeline behind `deebert predict-dataset`
# ------------------------------------------------------------------------------------------------
@dataclass
class PredictDatasetConfig:
    """Prediction over many files on Ray Data. The exit options mean what they mean in ``deebert predict``."""

    checkpoint: str = "deebert-checkpoint"
    input: list | None = None  # files, folders, globs
    output: str | None = None  # a new folder of shards
    input_format: str = "auto"  # auto (by suffix), text, jsonl, csv, tsv, parquet
    text_column: str = "text"
    text_pair_column: str | None = None
    id_column: list | None = None  # carried into the output; default: path + row
    format: str = "parquet"  # of the output: parquet or jsonl
    threshold: float | None = None
    thresholds: list | None = None
    entropy: str = "normalized"
    exit_policy: str = "entropy"
    patience: int = 3
    tolerance: float = 0.1
    batch_size: int = 32  # rows per model batch inside an actor
    engine: str = "shrink"
    max_length: int | None = None
    rows_per_batch: int = 1024  # rows per map_batches call (sorted by length within it)
    concurrency: str | None = None  # actors: N, or MIN,MAX to autoscale; default: Ray's autoscaling pool
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor
    max_retries: int = 3  # restarts of a dead actor / retries of its task or of a read task
    address: str | None = None  # Ray cluster; default: RAY_ADDRESS, else a local instance
    local_cpus: int | None = None  # a local instance's CPUs (default: all cores)
    object_store_mb: int | None = None  # a local instance's object store (default: Ray's, 30% of memory)
    device: str = "auto"
    precision: str = "fp32"
    runtime: str = "torch"  # torch, or onnx (the graphs of `deebert export`)
    onnx_precision: str = "fp32"  # onnx runtime: fp32 or int8

    def __post_init__(self):
        if isinstance(self.input, str):
            self.input = [self.input]
        if isinstance(self.id_column, str):
            self.id_column = [c.strip() for c in self.id_column.split(",") if c.strip()]
        self.id_column = list(self.id_column) or None if self.id_column else None
        self.thresholds = parse_thresholds(self.thresholds)
        _check(bool(self.input), "input is required: one or more files, folders or globs (--input)")
        _check(bool(self.output), "output is required: a new folder for the shards (--output)")
        _check(self.input_format in INPUT_FORMATS, f"input_format must be one of {', '.join(INPUT_FORMATS)}, got '{self.input_format}'")
        _check(self.format in OUTPUT_FORMATS, f"format must be one of {', '.join(OUTPUT_FORMATS)}, got '{self.format}'")
        _check(self.rows_per_batch > 0, f"rows_per_batch must be > 0, got {self.rows_per_batch}")
        _check(self.num_cpus > 0, f"num_cpus must be > 0, got {self.num_cpus}")
        _check(self.num_gpus >= 0, f"num_gpus must be >= 0, got {self.num_gpus}")
        _check(self.max_retries >= 0, f"max_retries must be >= 0, got {self.max_retries}")
        _check(self.local_cpus is None or self.local_cpus >= 1, f"local_cpus must be >= 1, got {self.local_cpus}")
        _check(self.object_store_mb is None or self.object_store_mb >= 100, f"object_store_mb must be >= 100, got {self.object_store_mb}")
        self.concurrency_value()
        self.predict_options()  # the exit options, validated by PredictConfig

    def predict_options(self) -> dict:
        opts = {k: getattr(self, k) for k in PREDICT_OPTIONS}
        PredictConfig(checkpoint=self.checkpoint, window=max(1024, self.batch_size), **opts)
        return opts

    def concurrency_value(self):
        """None, N or (MIN, MAX) for map_batches."""
        if self.concurrency is None or str(self.concurrency).strip() == "":
            return None
        try:
            vals = [int(v) for v in str(self.concurrency).split(",")]
        except ValueError:
            raise ValueError(f"concurrency must be N or MIN,MAX (whole numbers), got '{self.concurrency}'") from None
        _check(len(vals) in (1, 2) and all(v >= 1 for v in vals) and vals == sorted(vals),
               f"concurrency must be N or MIN,MAX with 1 <= MIN <= MAX, got '{self.concurrency}'")
        return vals[0] if len(vals) == 1 else tuple(vals)


@dataclass
class DatasetSummary:
    stats: object  # PredictStats over the written output
    files: int
    output: str
    rule: str  # the exit rule in words, and where it came from
    ray: str  # where it ran


def predict_dataset(cfg: PredictDatasetConfig, log=lambda msg: None) -> DatasetSummary:
    """Read ``cfg.input`` with Ray Data, predict in an actor pool, write shards to ``cfg.output``
    (written to a temporary sibling folder, renamed when complete), summarise the exits from what was
    written. ``log`` receives progress lines."""
    files = expand_inputs(cfg.input, cfg.input_format)
    ids = not cfg.id_column
    columns = (cfg.id_column or []) + [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    check_columns(files, columns)
    clash = sorted(set(cfg.id_column or []) & OUTPUT_NAMES)
    if clash:
        raise UserError(f"--id-column {', '.join(clash)}: the output has a prediction column of that name; "
                        "carry another column (or none: path and row identify each row)")
    out = Path(cfg.output)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"--output '{out}' already exists; give a new folder (nothing is overwritten)")
    # one probe on this machine checks checkpoint and exit options before any worker starts (on the CPU:
    # the driver may have no GPU; device and precision are checked in each actor)
    probe = DeeBertPredictor(cfg.checkpoint, text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                             **{**cfg.predict_options(), "device": "cpu", "precision": "fp32"})
    rule = f"{probe.rule.describe()} ({probe.rule_source})"
    L = probe.ckpt.model.num_layers
    del probe
    with ray_session(cfg.address, cfg.local_cpus, cfg.object_store_mb) as where:
        log(f"{len(files)} file(s); {rule}; {L} layers; Ray: {where}")
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            t0 = time.perf_counter()
            _write(build_dataset(cfg, files, columns, ids), cfg.format, str(tmp.resolve()))
            seconds = time.perf_counter() - t0
            stats = summarise(tmp, cfg.format, L, seconds)
            _write_run_file(tmp, cfg, stats)
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return DatasetSummary(stats, len(files), str(out), rule, where)


def build_dataset(cfg: PredictDatasetConfig, files: list, columns: list, ids: bool):
    """The lazy Ray Dataset: one read task per file -> predictor actor pool -> kept columns + predictions."""
    import ray.data

    retries = cfg.max_retries
    keep = cfg.id_column or [PATH_COLUMN, ROW_COLUMN]
    ctor = dict(checkpoint=str(Path(cfg.checkpoint).resolve()), text_column=cfg.text_column,
                text_pair_column=cfg.text_pair_column, keep_columns=keep,
                num_threads=max(1, int(cfg.num_cpus)), **cfg.predict_options())
    with warnings.catch_warnings():
        # Ray 2.60 takes the retry limits (max_retries of tasks; max_restarts / max_task_retries of
        # actors) only as "ray_remote_args", which it marks deprecated without a named replacement yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        paths = ray.data.from_items([{"path": p, "format": f} for p, f in files], override_num_blocks=len(files))
        # reads reserve no CPU: with the actors holding every CPU (concurrency x num_cpus = the cluster's),
        # a read task asking for one would never be scheduled; the actors' backpressure paces the reads
        rows = paths.map_batches(read_files, batch_size=1, batch_format="pyarrow", num_cpus=0, max_retries=retries,
                                 fn_kwargs=dict(columns=columns, text_column=cfg.text_column, ids=ids))
        return rows.map_batches(DeeBertPredictor, fn_constructor_kwargs=ctor, batch_size=cfg.rows_per_batch,
                                batch_format="pyarrow", compute=actor_pool(cfg.concurrency_value()),
                                num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or None,
                                max_restarts=retries, max_task_retries=retries)


def actor_pool(concurrency):
    """None (Ray's autoscaling pool), N (fixed) or (MIN, MAX) (autoscaling) -> a compute strategy."""
    import ray.data

    if concurrency is None:
        return None
    if isinstance(concurrency, tuple):
        return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    return ray.data.ActorPoolStrategy(size=concurrency)


def _write(ds, fmt: str, path: str) -> None:
    """Run the pipeline into ``path``; an error a worker raised about the user's input becomes a UserError."""
    try:
        if fmt == "parquet":
            ds.write_parquet(path)
        else:
            ds.write_json(path, force_ascii=False)
    except Exception as e:
        m = re.search(r"UserError: (.+)", str(e))
        if m:
            raise UserError(m.group(1).strip()) from None
        raise


def summarise(folder: Path, fmt: str, num_layers: int, seconds: float):
    """PredictStats over the written shards (count, empty, exit histogram): what was written is what is counted."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    from .runtime.stream import PredictStats

    stats = PredictStats(num_layers)
    stats.seconds = seconds
    files = sorted(str(p) for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(("_", ".")))
    if not files:
        return stats
    table = pds.dataset(files, format="parquet" if fmt == "parquet" else "json").to_table(columns=["exit_layer", "empty"])
    stats.count = table.num_rows
    stats.empty = int(pc.sum(table["empty"]).as_py() or 0)
    counts = pc.value_counts(pc.drop_null(table["exit_layer"])).to_pylist()
    for c in counts:
        stats.histogram[int(c["values"]) - 1] += int(c["counts"])
    return stats


def _write_run_file(folder: Path, cfg: PredictDatasetConfig, stats) -> None:
    """``_deebert.yaml`` beside the shards: the resolved config and the summary (a leading underscore
    keeps it out of Parquet/JSON dataset readers)."""
    import yaml

    doc = {"config": dataclasses.asdict(cfg),
           "summary": {"rows": stats.count, "empty": stats.empty, "exit_histogram": stats.histogram,
                       "seconds": round(stats.seconds, 3)}}
    (folder / "_deebert.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


class ray_session:
    """Context manager: connect to ``address`` (else ``RAY_ADDRESS``, else a new local instance without
    dashboard, with ``local_cpus`` and ``object_store_mb`` when given) unless Ray is already
    initialised; shut down only what it started. Yields a description of the cluster."""

    def __init__(self, address: str | None = None, local_cpus: int | None = None, object_store_mb: int | None = None):
        self.address, self.started = address, False
        self.local = dict(num_cpus=local_cpus, object_store_memory=object_store_mb * 2**20 if object_store_mb else None)

    def __enter__(self) -> str:
        import logging

        ray = require_ray()
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS") or None
            local = {} if address else {k: v for k, v in self.local.items() if v is not None}
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, **local)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"could not connect to Ray at '{address}' (--address / RAY_ADDRESS): {str(e).splitlines()[0]}") from None
            self.started = True
        res = ray.cluster_resources()
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        gpus = f", {res['GPU']:g} GPUs" if res.get("GPU") else ""
        return f"{nodes} node(s), {res.get('CPU', 0):g} CPUs{gpus}"

    def __exit__(self, *exc):
        if self.started:
            import ray

            ray.shutdown()
        return False


__all__ = ["DeeBertPredictor", "PredictDatasetConfig", "predict_dataset", "load_model", "expand_inputs", "RAY_EXTRA"]
