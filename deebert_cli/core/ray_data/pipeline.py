"""What ``deebert predict-dataset`` runs (:func:`predict_dataset`): expand files and globs, read them with
Ray Data (:mod:`.readers`), predict in an actor pool (:class:`~.predictor.DeeBertPredictor`), write sharded
Parquet or JSONL that carries each row's identifying columns, and summarise the exits."""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..config import PredictConfig, _check, parse_thresholds
from ..errors import UserError
from ..files import check_output_folder
from .predictor import PREDICT_OPTIONS, DeeBertPredictor, require_ray
from .quiet import quiet_ray, quiet_stderr
from .readers import INPUT_FORMATS, PATH_COLUMN, ROW_COLUMN, check_columns, expand_inputs, input_error, read_dataset

OUTPUT_FORMATS = ("parquet", "jsonl")
OUTPUT_NAMES = {"label", "confidence", "exit_layer", "entropy", "empty", "value", "watch_disagreed"}  # prediction columns


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
    patience: int | None = None  # None: the certified value, else 3
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
    watch_rate: float = 0.0  # share of rows also run to the last layer: the stored guarantee on this corpus
    watch_delta: float | None = None  # confidence of its bounds (None: the guarantee's delta)
    watch_window: int = 5000  # watched rows per block of the restarted sequence (0: the cumulative one alone)

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
        _check(0 <= self.watch_rate <= 1, f"watch_rate must be in [0, 1], got {self.watch_rate}")
        _check(self.watch_delta is None or 0 < self.watch_delta < 1, f"watch_delta must be in (0, 1), got {self.watch_delta}")
        _check(self.watch_window >= 0, f"watch_window must be >= 0 (0: no window), got {self.watch_window}")
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
    watch: dict | None = None  # --watch-rate: the stored guarantee on this corpus (model.watch.Watch.snapshot)


def predict_dataset(cfg: PredictDatasetConfig, log=lambda msg: None) -> DatasetSummary:
    """Read ``cfg.input`` with Ray Data, predict in an actor pool, write shards to ``cfg.output``
    (written to a temporary sibling folder, renamed when complete), summarise the exits from what was
    written. ``log`` receives progress lines."""
    files = expand_inputs(cfg.input, cfg.input_format)
    ids = not cfg.id_column
    texts = (cfg.text_column,) + ((cfg.text_pair_column,) if cfg.text_pair_column else ())
    columns = (cfg.id_column or []) + list(texts)
    check_columns(files, columns, texts)
    clash = sorted(set(cfg.id_column or []) & OUTPUT_NAMES)
    if clash:
        raise UserError(f"--id-column {', '.join(clash)}: the output has a prediction column of that name; "
                        "carry another column (or none: path and row identify each row)")
    out = Path(cfg.output)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"--output '{out}' already exists; give a new folder (nothing is overwritten)")
    check_output_folder(out, "--output")  # not the current folder, and writable: before any worker starts
    # one probe on this machine checks checkpoint and exit options before any worker starts (on the CPU:
    # the driver may have no GPU; device and precision are checked in each actor)
    probe = DeeBertPredictor(cfg.checkpoint, text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                             **{**cfg.predict_options(), "device": "cpu", "precision": "fp32"})
    rule = f"{probe.rule.describe()} ({probe.rule_source})"
    L = probe.ckpt.model.num_layers
    from ..model.guarantee import stored_guarantee

    g = stored_guarantee(probe.ckpt.meta)
    del probe
    watch = None
    with ray_session(cfg.address, cfg.local_cpus, cfg.object_store_mb) as where:
        log(f"{len(files)} file(s); {rule}; {L} layers; Ray: {where}")
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            t0 = time.perf_counter()
            _write(build_dataset(cfg, files, columns, ids), cfg.format, str(tmp.resolve()))
            tmp.mkdir(exist_ok=True)  # no input rows: Ray writes no shard and no folder; the output is empty
            seconds = time.perf_counter() - t0
            stats = summarise(tmp, cfg.format, L, seconds)
            if cfg.watch_rate > 0:
                watch = watched(tmp, cfg.format, g, cfg.watch_delta, cfg.watch_rate, cfg.watch_window)
            _write_run_file(tmp, cfg, stats)
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return DatasetSummary(stats, len(files), str(out), rule, where, watch)


def build_dataset(cfg: PredictDatasetConfig, files: list, columns: list, ids: bool):
    """The lazy Ray Dataset: the input rows (:func:`~.readers.read_dataset`) -> predictor actor pool ->
    kept columns + predictions."""
    retries = cfg.max_retries
    keep = cfg.id_column or [PATH_COLUMN, ROW_COLUMN]
    ctor = dict(checkpoint=str(Path(cfg.checkpoint).resolve()), text_column=cfg.text_column,
                text_pair_column=cfg.text_pair_column, keep_columns=keep, watch_rate=cfg.watch_rate,
                num_threads=max(1, int(cfg.num_cpus)), **cfg.predict_options())
    with warnings.catch_warnings():
        # Ray 2.60 takes the retry limits (max_retries of tasks; max_restarts / max_task_retries of
        # actors) only as "ray_remote_args", which it marks deprecated without a named replacement yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        texts = (cfg.text_column,) + ((cfg.text_pair_column,) if cfg.text_pair_column else ())
        rows = read_dataset(files, columns, texts, ids, retries)
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
    """Run the pipeline into ``path``; a UserError a worker raised about the input comes out as itself."""
    try:
        with quiet_stderr():
            if fmt == "parquet":
                ds.write_parquet(path)
            else:
                ds.write_json(path, force_ascii=False)
    except Exception as e:
        bad = input_error(e)
        if bad is None:
            raise
        raise bad from None


def summarise(folder: Path, fmt: str, num_layers: int, seconds: float):
    """PredictStats over the written shards (count, empty, exit histogram): what was written is what is counted."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    from ..runtime.stream import PredictStats

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


def watched(folder: Path, fmt: str, g, delta: float | None, rate: float, window: int = 5000) -> dict:
    """The watched rows' bits (column ``watch_disagreed``, in the order written) through the same
    confidence sequence the server runs -> the verdict on the stored guarantee ``g`` for this corpus."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    from ..model.watch import Watch

    w = Watch(g, delta, rate, window=window)
    files = sorted(str(p) for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(("_", ".")))
    if files:
        col = pds.dataset(files, format="parquet" if fmt == "parquet" else "json").to_table(columns=["watch_disagreed"])
        for bit in pc.drop_null(col["watch_disagreed"]).to_pylist():
            w.record(bool(bit))
    return w.snapshot()


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
    initialised; shut down only what it started. Ray's messages a user cannot act on are kept off the
    terminal while it lasts (:class:`~.quiet.quiet_ray`). Yields a description of the cluster."""

    def __init__(self, address: str | None = None, local_cpus: int | None = None, object_store_mb: int | None = None):
        self.address, self.started, self.quiet = address, False, quiet_ray()
        self.local = dict(num_cpus=local_cpus, object_store_memory=object_store_mb * 2**20 if object_store_mb else None)

    def __enter__(self) -> str:
        import logging

        ray = require_ray()
        self.quiet.__enter__()
        try:
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
        except BaseException:
            self.__exit__(None, None, None)
            raise
        gpus = f", {res['GPU']:g} GPUs" if res.get("GPU") else ""
        return f"{nodes} node(s), {res.get('CPU', 0):g} CPUs{gpus}"

    def __exit__(self, *exc):
        try:
            if self.started:
                import ray

                ray.shutdown()
                self.started = False
        finally:
            self.quiet.__exit__(None, None, None)
        return False
