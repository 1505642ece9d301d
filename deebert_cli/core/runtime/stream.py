"""Lines in, predictions out: :func:`predict_stream` tokenises lines a window at a time, runs them through
the :class:`~.engine.EarlyExitEngine` and yields one :class:`Prediction` per line in input order, empty
lines included; :func:`load_for_inference` loads a checkpoint for either runtime, and
:func:`predict_sharded` spreads the lines over the processes of ``accelerate launch``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ..data.encoding import encode
from ..data.lines import read_lines  # noqa: F401  (the one line-reading rule; predict reads with it)
from ..errors import UserError
from ..model.checkpoint import Checkpoint  # noqa: F401  (type of the torch runtime's checkpoints)
from .engine import EarlyExitEngine
from .rules import ExitRule

RUNTIMES = ("torch", "onnx")


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """One input line's result. ``exit_layer`` is 1-based (0 for an empty line)."""

    index: int
    label: int = -1
    confidence: float = float("nan")
    exit_layer: int = 0
    entropy: float = float("nan")
    probs: list | None = None
    empty: bool = False
    value: float = float("nan")  # regression checkpoints: the predicted value


@dataclass
class PredictStats:
    """Running totals for the end-of-run summary."""

    num_layers: int
    count: int = 0
    empty: int = 0
    truncated: int = 0
    replaced: int = 0  # lines with bytes that were not UTF-8
    histogram: list = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self):
        self.histogram = [0] * self.num_layers

    @property
    def predicted(self) -> int:
        return self.count - self.empty

    @property
    def mean_exit_layer(self) -> float:
        n = sum(self.histogram)
        return sum((i + 1) * c for i, c in enumerate(self.histogram)) / n if n else float("nan")

    @property
    def layer_saving(self) -> float:
        """1 - mean exit layer / L: the fraction of layer computations skipped."""
        return 1 - self.mean_exit_layer / self.num_layers

    @property
    def examples_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else float("nan")


# ------------------------------------------------------------------------------------------------
# reading lines
# ------------------------------------------------------------------------------------------------
# read_lines: the one line-reading rule, in core.data.lines (imported above, used here and by predict)


def split_pair(line: str) -> tuple:
    """'a<TAB>b' -> ('a', 'b') for sentence-pair checkpoints."""
    a, _, b = line.partition("\t")
    return a, b

def predict_stream(ckpt, lines: Iterable[str], rule, device=None, *, batch_size: int = 32,
                   window: int = 1024, max_length: int | None = None, engine: str = "shrink",
                   all_probs: bool = False, stats: PredictStats | None = None,
                   precision: str = "fp32", watch=None, on_watched=None) -> Iterator[Prediction]:
    """Predict every line of ``lines`` (read lazily, ``window`` lines at a time) and yield one result
    per line in input order. ``ckpt`` is what :func:`load_for_inference` returns (either runtime).

    Within a window, rows are sorted by length to cut padding; results pass through a reorder buffer
    and leave as soon as every earlier line is done, so output starts before the input ends and memory
    stays flat however long the input is. Rows whose line index ``watch(index)`` picks also run on to the
    last layer after their exit (:mod:`..model.watch`): ``on_watched(index, exit_layer, exit_logits,
    final_logits)``; their predictions are the same."""
    if ckpt.tokenizer is None:
        raise UserError(f"'{ckpt.path}' has no tokenizer files")
    pairs = bool(ckpt.meta.get("data", {}).get("text_pair_column"))
    max_length = max_length or ckpt.meta.get("max_length", 128)
    max_length = min(max_length, ckpt.model.max_tokens or max_length)  # never past the position embeddings
    eng, engine = _engine(ckpt, rule, device, batch_size, all_probs, precision, engine, max_length)
    stats = stats if stats is not None else PredictStats(eng.L)
    ready: dict = {}  # index -> Prediction, waiting for earlier lines
    windows = _windows(lines, window, ckpt.tokenizer, pairs, max_length, stats, ready)
    watching = (watch, on_watched) if watch is not None else None
    yield from _in_order(_predicted(eng, windows, engine, batch_size, window, all_probs, watching), ready, stats)


def _engine(ckpt, rule, device, batch_size, all_probs, precision, engine: str, max_length: int) -> tuple:
    """The engine that runs ``engine`` -> (engine object, shrink or refill: how rows are fed to it).
    ``static`` (:mod:`.static_engine`: static shapes, CUDA graphs on CUDA) is fed as refill; ``auto``
    follows :func:`~.static_engine.plan_engine` (shrink off CUDA), its one-line note logged."""
    if engine == "auto":
        from .static_engine import plan_engine

        plan = plan_engine(ckpt.meta, device if device is not None else "cpu", batch_size, precision)
        if plan.note:
            import logging

            logging.getLogger("deebert").warning(plan.note)
        engine = plan.engine
        if plan.full_depth:
            from .rules import ExitRule

            rule = ExitRule([0.0] * ckpt.model.num_layers, rule.entropy)
    if engine == "static":
        from .static_engine import StaticEngine

        return StaticEngine(ckpt, rule, device, batch_size, all_probs, precision, max_length=max_length), "refill"
    return EarlyExitEngine(ckpt, rule, device, batch_size, all_probs, precision), engine


def _windows(lines: Iterable[str], window: int, tok, pairs: bool, max_length: int, stats: PredictStats,
             ready: dict) -> Iterator[list]:
    """Length-sorted (index, ids, token_type_ids) of each window's non-empty lines; the empty ones go
    straight into ``ready`` as results."""
    it, base = iter(lines), 0
    while True:
        chunk = [line for _, line in zip(range(window), it)]
        if not chunk:
            return
        live = []
        for k, line in enumerate(chunk):
            if line.strip():
                live.append(k)
            else:
                ready[base + k] = Prediction(index=base + k, empty=True)
        if live:
            texts = [chunk[k] for k in live]
            if pairs:
                a, b = zip(*(split_pair(t) for t in texts))
                enc = encode(tok, list(a), list(b), max_length)
            else:
                enc = encode(tok, texts, None, max_length)
            stats.truncated += enc.truncated
            tt = enc.token_type_ids
            rows = [(base + k, enc.input_ids[j], tt[j] if tt is not None else None) for j, k in enumerate(live)]
            rows.sort(key=lambda r: (len(r[1]), r[0]))
            yield rows
        else:
            yield []
        base += len(chunk)


def _predicted(eng: EarlyExitEngine, windows: Iterator[list], engine: str, batch_size: int, window: int,
               all_probs: bool, watching: tuple | None = None) -> Iterator[Prediction | None]:
    """The rows of ``windows`` through ``eng`` -> Predictions as they finish (``None`` after each window of
    the shrink engine: a point to flush the empty lines waiting in the reorder buffer)."""
    watch, on_watched = watching or (None, None)
    if engine == "refill":
        stream = (r for rows in windows for r in rows)
        for key, layer, logits, ent in eng.run_refill(stream, max_lag=window, watch=watch, on_watched=on_watched):
            yield _result(key, layer, logits, ent, all_probs, eng.regression)
        return
    for rows in windows:
        for s in range(0, len(rows), batch_size):
            part = rows[s : s + batch_size]
            picked = [bool(watch(r[0])) for r in part] if watch is not None else None
            layer, logits, ent = eng.run_rows([r[1] for r in part],
                                              [r[2] for r in part] if part[0][2] is not None else None, picked,
                                              (lambda j, *rest, part=part: on_watched(part[j][0], *rest)) if picked else None)
            yield from _results([r[0] for r in part], layer, logits, ent, all_probs, eng.regression)
        yield None  # window done: flush empties waiting in the buffer


def _in_order(results: Iterator[Prediction | None], ready: dict, stats: PredictStats) -> Iterator[Prediction]:
    """The reorder buffer: each result waits in ``ready`` until every earlier line has left, then leaves,
    counted into ``stats``; trailing empty lines leave at the end."""
    t0 = time.perf_counter()
    nxt = 0
    for res in results:
        if res is not None:
            ready[res.index] = res
        while nxt in ready:
            r = ready.pop(nxt)
            nxt += 1
            stats.count += 1
            if r.empty:
                stats.empty += 1
            else:
                stats.histogram[r.exit_layer - 1] += 1
            stats.seconds = time.perf_counter() - t0
            yield r
    while nxt in ready:  # trailing empty lines
        r = ready.pop(nxt)
        nxt += 1
        stats.count += 1
        stats.empty += 1
        yield r
    stats.seconds = time.perf_counter() - t0


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _results(keys: list, layers: np.ndarray, logits: np.ndarray, ent: np.ndarray, all_probs: bool,
             regression: bool = False) -> list:
    """Predictions of a batch of rows from their exits' logits [b, C] (numpy; one softmax for all)."""
    layers = (np.asarray(layers) + 1).tolist()
    if regression:
        return [Prediction(index=k, exit_layer=l, value=v) for k, l, v in zip(keys, layers, logits[:, 0].tolist())]
    probs = _softmax(np.asarray(logits, dtype=np.float32))
    conf, label = probs.max(-1).tolist(), probs.argmax(-1).tolist()
    plist = probs.tolist() if all_probs else [None] * len(keys)
    return [Prediction(index=k, label=c, confidence=p, exit_layer=l, entropy=e, probs=pr)
            for k, c, p, l, e, pr in zip(keys, label, conf, layers, np.asarray(ent).tolist(), plist)]


def _result(index: int, layer: int, logits, ent, all_probs: bool, regression: bool = False) -> Prediction:
    """One row's Prediction from its exit's logits [C] (regression: the value is logits[0])."""
    return _results([index], np.asarray([int(layer)]), np.asarray(logits, dtype=np.float32)[None],
                    np.asarray([float(ent)]), all_probs, regression)[0]


# ------------------------------------------------------------------------------------------------
# loading for inference
# ------------------------------------------------------------------------------------------------
def load_for_inference(path, runtime: str = "torch", device=None, **runtime_opts):
    """A checkpoint ready for :func:`~.rules.resolve_rule` and :func:`predict_stream` on ``runtime``:

    * ``torch``: :func:`~..model.checkpoint.load_checkpoint` (``device``: a torch device or spec such as
      ``"cpu"``/``"auto"``; None leaves the model on the CPU until predict moves it).
    * ``onnx``: the graphs written by ``deebert export`` (:func:`~.onnx_backend.load_onnx`; options
      ``precision="fp32"|"int8"``, ``threads``), run by ONNX Runtime on the CPU without torch.

    Both give the same attributes: ``.model`` (``num_layers``, ``num_labels``, ``ramp_cfg``), ``.task``,
    ``.exits_trained``, ``.meta``, ``.path``, ``.label_names``, ``.tokenizer``."""
    if runtime == "onnx":
        from .onnx_backend import load_onnx

        if device not in (None, "auto", "cpu") and str(device) != "cpu":
            raise UserError(f"--runtime onnx runs on the CPU; device '{device}' needs --runtime torch")
        return load_onnx(path, **runtime_opts)
    if runtime != "torch":
        raise UserError(f"unknown runtime '{runtime}': use {' or '.join(RUNTIMES)}")
    if runtime_opts:
        raise UserError(f"options {sorted(runtime_opts)} apply to --runtime onnx only")
    from ..model.checkpoint import load_checkpoint

    if isinstance(device, str):
        from ..device import resolve_device

        device = resolve_device(device)
    return load_checkpoint(path, device)


def predict_sharded(ckpt: Checkpoint, lines: Iterable[str], rule: ExitRule, rt, *, stats: PredictStats,
                    window: int = 1024, **kw) -> Iterator[Prediction]:
    """:func:`predict_stream` spread over the processes of ``rt`` (a :class:`~..launch.Runtime` under
    ``accelerate launch``): every process reads all of ``lines`` and predicts its strided share (lines
    ``rank, rank+W, ...``, empty ones included); the main process yields every result in input order,
    one per line, the others yield nothing. Every process must consume the iterator to the end (the
    gathering is collective); ``stats`` then holds the totals over all processes (``stats.replaced``, counted
    by :func:`read_lines` over the whole input, is left as it is)."""
    from ..launch import ordered_shards

    mine = PredictStats(ckpt.model.num_layers)

    def run(shard):
        return predict_stream(ckpt, shard, rule, rt.device, window=window, stats=mine, **kw)

    for index, r in ordered_shards(rt, lines, run, chunk=window):
        r.index = index
        yield r
    parts = rt.gather_objects((mine.count, mine.empty, mine.truncated, mine.histogram, mine.seconds))
    stats.count = sum(p[0] for p in parts)
    stats.empty = sum(p[1] for p in parts)
    stats.truncated = sum(p[2] for p in parts)
    stats.histogram = [sum(p[3][i] for p in parts) for i in range(stats.num_layers)]
    stats.seconds = max(p[4] for p in parts)
