"""The ``map_batches`` callable: :class:`DeeBertPredictor`, for ``ray.data.Dataset.map_batches(DeeBertPredictor,
fn_constructor_kwargs=..., concurrency=N)``. Each actor loads the checkpoint once and maps a batch (a
pyarrow Table, a pandas DataFrame or a dict of numpy arrays) with a text column to label, confidence,
exit_layer, entropy (regression: value) and empty, with the same exit rules and engine as ``deebert
predict`` (:func:`~..runtime.rules.resolve_rule`, :func:`~..runtime.stream.predict_stream`). One row out
per row in."""
from __future__ import annotations

from ..config import PredictConfig
from ..errors import UserError

RAY_EXTRA = "pip install 'deebert-cli[ray]'"
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
    from ..runtime.stream import load_for_inference

    opts = {"precision": onnx_precision, "threads": threads} if runtime == "onnx" else {}
    return load_for_inference(path, runtime, device, **opts)


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
                 keep_columns: list | None = None, prefix: str = "", num_threads: int | None = None,
                 watch_rate: float = 0.0, **options):
        unknown = sorted(set(options) - set(PREDICT_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(PREDICT_OPTIONS)}")
        from ..runtime.rules import resolve_rule
        from ..runtime.stream import PredictStats

        cfg = PredictConfig(checkpoint=str(checkpoint), window=max(1024, options.get("batch_size", 32)), **options)
        self.cfg, self.text_column, self.pair_column = cfg, text_column, text_pair_column
        self.keep_columns, self.prefix = keep_columns, prefix
        if cfg.runtime == "onnx":  # ONNX Runtime on the CPU, without torch
            self.device = "cpu"
            self.ckpt = load_model(cfg.checkpoint, "onnx", onnx_precision=cfg.onnx_precision,
                                   threads=int(num_threads) if num_threads else None)
        else:
            import torch

            from ..device import check_precision, resolve_device

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
        self.watch_rate = float(watch_rate)  # > 0: a sample of rows also runs to the last layer (watch_disagreed)

    def output_columns(self) -> list:
        names = ["value", "exit_layer", "empty"] if self.regression else ["label", "confidence", "exit_layer", "entropy", "empty"]
        return [self.prefix + n for n in names + (["watch_disagreed"] if self.watch_rate > 0 else [])]

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
        """Texts in ``deebert predict``'s line format (a tab separates a pair) -> one Prediction each (with
        ``watch_rate``: a sampled row's Prediction carries ``watch_disagreed``, did its exit disagree with the
        last layer; the others None)."""
        from ..model.guarantee import stored_guarantee
        from ..model.watch import Sampler, disagrees
        from ..runtime.stream import predict_stream

        cfg, bits = self.cfg, {}
        sample = Sampler(self.watch_rate) if self.watch_rate > 0 else None
        g = stored_guarantee(self.ckpt.meta)
        tol = (g.tolerance if g is not None else None) or cfg.tolerance

        def on_watched(index, layer, exit_logits, final_logits):
            bits[index] = disagrees(exit_logits, final_logits, self.regression, tol)

        out = list(predict_stream(self.ckpt, lines, self.rule, self.device, batch_size=cfg.batch_size,
                                  window=max(cfg.window, len(lines)), max_length=cfg.max_length,
                                  engine=cfg.engine, stats=self.stats, precision=cfg.precision,
                                  watch=(lambda index: sample()) if sample else None, on_watched=on_watched))
        for p in out:
            p.watch_disagreed = bits.get(p.index)
        return out

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
        watched = [pa.array([getattr(r, "watch_disagreed", None) for r in results], pa.bool_())] if self.watch_rate > 0 else []
        if self.regression:
            return [pa.array([r.value if ok else None for r, ok in zip(results, live)], pa.float64()), layer, empty] + watched
        names = self.ckpt.label_names
        return [pa.array([names[r.label] if ok else None for r, ok in zip(results, live)], pa.string()),
                pa.array([r.confidence if ok else None for r, ok in zip(results, live)], pa.float64()),
                layer,
                pa.array([r.entropy if ok else None for r, ok in zip(results, live)], pa.float64()),
                empty] + watched


def _column_values(table, name: str) -> list:
    """The texts of column ``name``: strings or nulls; a column of another type is refused, not read as
    the text of its values (a number, a list or a struct is no text)."""
    import pyarrow as pa

    if name not in table.column_names:
        raise UserError(f"no column '{name}' in the batch (columns: {', '.join(table.column_names)})")
    col = table.column(name)
    t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t)):
        raise UserError(f"column '{name}' holds {col.type}, not text: give the texts as strings")
    return col.to_pylist()


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
