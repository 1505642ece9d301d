"""Serving core: one worker thread owns the model and batches rows across concurrent requests.

Requests are admitted up to a bound (beyond it :class:`Overloaded`), tokenised in the caller's thread,
and queued. The worker feeds their rows to the refill engine (:meth:`EarlyExitEngine.run_refill`): rows
of different requests share each layer step, rows that exit leave, waiting rows enter at layer 1. When
no new row is waiting the row source yields ``None`` and the engine advances its deepest rows part-full,
so a lone request never waits for company. A request's future resolves when its last row is done.
With ``batching=False`` each request runs alone (the shrinking batch over its own rows): the baseline.

Nothing here knows HTTP; :mod:`.http` puts a TEI-compatible API in front of it."""
from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..data.encoding import Encoded, encode
from ..errors import UserError
from ..model.checkpoint import Checkpoint
from ..runtime.engine import EarlyExitEngine
from ..runtime.stream import Prediction, _result, split_pair


def load_model(path: str, device=None, runtime: str = "torch", onnx_precision: str = "fp32"):
    """The checkpoint the server runs, on the torch or the onnx runtime (:func:`~..runtime.stream.load_for_inference`)."""
    from ..runtime.stream import load_for_inference

    return load_for_inference(path, runtime, device, **({"precision": onnx_precision} if runtime == "onnx" else {}))


SERVE_EXTRA = ("starlette", "uvicorn", "prometheus_client")


def check_serve_extra() -> None:
    """The HTTP stack is the optional `[serve]` extra: one clear error when a part of it is missing."""
    import importlib.util

    missing = [m for m in SERVE_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"deebert serve needs {', '.join(missing)}: pip install 'deebert-cli[serve]'")


# With only shadow rows in the engine (watched rows past their answer), the row source waits this long for a
# request before the engine runs a shadow step alone: under load a request comes first and the shadow rows ride
# along in its steps' free places (RefillEngine._advance) instead of taking steps of their own.
SHADOW_WAIT = 0.002


class Overloaded(Exception):
    """Too many requests admitted (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down and takes no new requests (HTTP 503)."""


class InputError(Exception):
    """A request the server refuses: ``status`` 400 (empty), 413 (too large) or 422 (invalid), TEI's ``error_type``."""

    def __init__(self, message: str, status: int = 422, error_type: str = "validation"):
        super().__init__(message)
        self.status, self.error_type = status, error_type


class Observer:
    """Hooks the worker calls (no-ops here; the HTTP layer exports them as Prometheus metrics)."""

    def step(self, layer: int, rows: int) -> None:
        """One layer step ran on ``rows`` rows (0-based ``layer``)."""

    def request_done(self, seconds: float, exit_layers: list) -> None:
        """A request finished after ``seconds``; its rows left at these 1-based layers."""

    def load(self, rows_waiting: int, requests: int) -> None:
        """Rows waiting to enter the engine and requests admitted (queued or running)."""

    def watched(self, disagreed: bool, snapshot: dict) -> None:
        """A watched row reached the last layer: did its exit disagree, and the watch's state after it."""


@dataclass
class Request:
    """One admitted request: its rows, results by position, and the future that resolves with them."""

    rows: list  # (key, position, ids, token_type_ids|None)
    truncated: list  # per input: was it cut to max_length
    tokenization: float = 0.0  # seconds spent tokenising it
    results: list = field(default_factory=list)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    remaining: int = 0
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)  # admitted (after tokenising)
    entered: float | None = None  # its first row entered the engine
    finished: float | None = None  # its last row was done

    def __post_init__(self):
        self.results = [None] * len(self.rows)
        self.remaining = len(self.rows)

    @property
    def tokens(self) -> int:
        return sum(len(r[2]) for r in self.rows)

    def timings(self) -> dict:
        """Seconds spent tokenising, queued (admitted until its first row ran) and in inference (until
        its last row was done): TEI's x-tokenization-time, x-queue-time and x-inference-time."""
        entered = self.entered if self.entered is not None else self.started
        finished = self.finished if self.finished is not None else entered
        return {"tokenization": self.tokenization, "queue": entered - self.started, "inference": finished - entered}


class _ObservedPolicy:
    """The engine's exit policy, reporting each layer step's size to an :class:`Observer`."""

    def __init__(self, policy, observer: Observer):
        self._policy, self._observer = policy, observer

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def step(self, i, logits, state, score=None):
        self._observer.step(i, int(logits.shape[0]))
        return self._policy.step(i, logits, state, score)


class BatchingServer:
    """Owns the model in one worker thread; :meth:`submit` from any thread, :meth:`drain` to stop."""

    def __init__(self, ckpt: Checkpoint, rule, device, *, batch_size: int = 32, max_batch_tokens: int = 16384,
                 max_concurrent_requests: int = 512, max_wait_ms: float = 0.0, batching: bool = True,
                 max_length: int | None = None, precision: str = "fp32", observer: Observer | None = None,
                 max_lag: int | None = None, watch=None, sampler=None, watch_log=None):
        if ckpt.tokenizer is None:
            raise UserError(f"'{ckpt.path}' has no tokenizer files")
        self.ckpt, self.rule = ckpt, rule
        self.max_length = max_length or ckpt.meta.get("max_length", 128)
        limit = getattr(ckpt.model, "max_tokens", None)  # never past the position embeddings (as predict)
        self.max_length = min(self.max_length, limit or self.max_length)
        self.pairs = bool(ckpt.meta.get("data", {}).get("text_pair_column"))
        # a token budget per step: rows are capped so that rows x max_length fits it
        rows_cap = max(1, min(batch_size, max_batch_tokens // self.max_length))
        self.engine = EarlyExitEngine(ckpt, rule, device, rows_cap, all_probs=True, precision=precision)
        self.observer = observer or Observer()
        self.engine.policy = _ObservedPolicy(self.engine.policy, self.observer)
        self.batching, self.max_wait = batching, max_wait_ms / 1000.0
        # a row waiting in a part-full queue moves on once max_lag newer rows have passed it (default: one
        # batch). Under steady load new rows keep the shallow queues full; a longer lag (B x L was tried)
        # left the deep rows waiting, p99 above full depth's (benchmarks/bench_serve.py); a shorter one
        # trades throughput for p99 (benchmarks/bench_refill_groups.py --lags, docs/BENCHMARKS.md)
        self.max_lag = max_lag if max_lag is not None else self.engine.batch_size
        if self.max_lag < 1:
            raise UserError(f"max_lag must be at least 1 row, got {self.max_lag}")
        self.max_requests = max_concurrent_requests
        self._inbox: queue.Queue = queue.Queue()
        self._keys = itertools.count()
        self._by_key: dict = {}  # key -> (request, position), rows handed to the engine
        self._lock = threading.Lock()  # admission counters
        self._tok_lock = threading.Lock()  # a fast tokenizer must not be called from two threads at once
        self._admitted = 0
        self._waiting_rows = 0
        self._in_engine = 0  # rows handed to the engine and not yet finished (worker thread only)
        self._draining = False
        self._error: BaseException | None = None
        # watching the guarantee (:mod:`..model.watch`): a sampled request's rows also run to the last layer
        # after answering; ``sampler()`` picks the requests, ``watch`` keeps the verdict, ``watch_log`` the texts
        self.watch, self.sampler, self.watch_log = watch, sampler, watch_log
        self._watched: dict = {}  # key of a watched row -> its input (texts only kept for watch_log)
        self._thread = threading.Thread(target=self._work, name="deebert-serve-worker", daemon=True)

    # -- caller side ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.engine.L

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._draining

    def start(self) -> "BatchingServer":
        self._thread.start()
        return self

    def submit(self, inputs: list, truncate: bool = True, direction: str | None = None) -> Request:
        """Tokenise ``inputs`` (texts, or (a, b) pairs on a pair checkpoint) and queue them. Over-long
        inputs lose their end (``direction`` "right") or their start ("left"; None: the tokenizer's own
        side, as predict). Raises :class:`InputError` for inputs the model cannot take,
        :class:`Overloaded` when full, :class:`Draining` after :meth:`drain`."""
        if direction not in (None, "left", "right"):
            raise InputError(f"truncation direction must be 'left' or 'right', got {direction!a}")
        firsts, seconds = self._split(inputs)
        self._admit_check()
        t0 = time.perf_counter()
        with self._tok_lock:
            tok = self.ckpt.tokenizer
            side = getattr(tok, "truncation_side", "right")
            tok.truncation_side = direction or side  # special tokens stay: [CLS] + the kept part + [SEP]
            try:
                enc = encode(tok, firsts, seconds, self.max_length)
                cut = self._truncated(firsts, seconds, enc)
            finally:
                tok.truncation_side = side
        if any(cut) and not truncate:
            raise InputError(f"input {cut.index(True)} is longer than {self.max_length} tokens and truncate is false",
                             413, "validation")
        tt = enc.token_type_ids
        rows = [(next(self._keys), j, enc.input_ids[j], tt[j] if tt is not None else None) for j in range(len(inputs))]
        rows.sort(key=lambda r: len(r[2]))  # as predict: rows of similar length together, less padding
        req = Request(rows, cut, tokenization=time.perf_counter() - t0)
        if self.watch is not None and self.sampler is not None and self.sampler():
            keep = self.watch_log is not None
            self._watched.update((r[0], inputs[r[1]] if keep else None) for r in rows)
        with self._lock:
            self._admit_check()
            self._admitted += 1
            self._waiting_rows += len(inputs)
            self.observer.load(self._waiting_rows, self._admitted)
            self._inbox.put(req)  # under the lock: a drain that starts now still sees it
        return req

    def _admit_check(self) -> None:
        if self._draining:
            raise Draining("the server is shutting down")
        if self._admitted >= self.max_requests:
            raise Overloaded(f"model is overloaded: {self._admitted} requests in progress "
                             f"(--max-concurrent-requests {self.max_requests})")

    def cancel(self, req: Request) -> None:
        """Drop a request (its client went away): its queued rows never run, its results are discarded."""
        with self._lock:
            if req.cancelled or req.future.done():
                return
            req.cancelled = True
        req.future.cancel()

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests, finish the admitted ones, stop the worker. True if it stopped in time."""
        with self._lock:
            self._draining = True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _split(self, inputs: list) -> tuple:
        """Inputs -> (first texts, second texts or None), as predict reads them (a tab splits a pair)."""
        if self.pairs:
            both = [x if isinstance(x, tuple) else split_pair(x) for x in inputs]
            return [a for a, _ in both], [b for _, b in both]
        for k, x in enumerate(inputs):
            if isinstance(x, tuple):
                raise InputError(f"input {k} is a pair of texts, but '{self.ckpt.path}' classifies single texts")
        return list(inputs), None

    def _truncated(self, firsts: list, seconds: list | None, enc: Encoded) -> list:
        """Per input: was it cut to max_length (only inputs that reached the limit can have been)."""
        flags = []
        for j, ids in enumerate(enc.input_ids):
            long = len(ids) >= self.max_length
            flags.append(long and encode(self.ckpt.tokenizer, [firsts[j]], [seconds[j]] if seconds else None,
                                         self.max_length).truncated > 0)
        return flags

    # -- worker side ---------------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            if self.batching:
                self._work_batched()
            else:
                self._work_alone()
        except BaseException as e:  # a bug or a device error: fail every waiting request, not hang them
            self._error = e
            self._fail_all(e)

    def _work_batched(self) -> None:
        watch = (lambda key: key in self._watched) if self.watch is not None else None
        for key, layer, logits, ent in self.engine.run_refill(self._row_source(), max_lag=self.max_lag, watch=watch,
                                                              on_watched=self._watched_row):
            self._in_engine -= 1
            req, pos = self._by_key.pop(key)
            self._finish_row(req, pos, layer, logits, ent)

    def _row_source(self):
        """Rows for the refill engine: (key, ids, token_type_ids). ``None`` when no row is waiting but
        rows are in the engine; blocks when the engine is empty; ends once draining and idle."""
        pending: deque = deque()
        linger = False  # after new rows came in, wait up to max_wait once for more before a part-full step
        while True:
            if pending:
                req, (key, pos, ids, tt) = pending.popleft()
                self._row_taken()
                if req.cancelled:
                    self._watched.pop(key, None)
                    self._row_done(req)
                    continue
                self._by_key[key] = (req, pos)
                self._in_engine += 1
                if req.entered is None:
                    req.entered = time.perf_counter()
                linger = True
                yield key, ids, tt
                continue
            shadow = self.engine.shadow_rows  # watched rows after their answer, on their way to the last layer
            busy = self._in_engine or shadow
            if self._in_engine:
                wait = self.max_wait if linger and self.max_wait > 0 else 0
            else:  # only shadow work (or none): a request that comes within SHADOW_WAIT goes first
                wait = SHADOW_WAIT if shadow else 0.05
            req = self._take(wait)
            if req is None:
                if busy:
                    linger = False
                    yield None
                elif self._draining and self._inbox.empty():
                    return
                continue
            pending.extend((req, r) for r in req.rows)

    def _work_alone(self) -> None:
        """Batching off: each request alone, its rows in shrinking batches of up to batch_size."""
        B = self.engine.batch_size
        while True:
            req = self._take(0.05)
            if req is None:
                if self._draining and self._inbox.empty():
                    return
                continue
            for _ in req.rows:
                self._row_taken()
            if req.cancelled:
                for r in req.rows:
                    self._watched.pop(r[0], None)
                    self._row_done(req)
                continue
            req.entered = time.perf_counter()
            for s in range(0, len(req.rows), B):
                part = req.rows[s : s + B]
                layer, logits, ent = self.engine.run_rows([r[2] for r in part],
                                                          [r[3] for r in part] if part[0][3] is not None else None)
                for j, r in enumerate(part):
                    self._finish_row(req, r[1], int(layer[j]), logits[j], ent[j])
            self._watch_alone([r for r in req.rows if r[0] in self._watched])

    def _watch_alone(self, rows: list) -> None:
        """Batching off: the watched rows of a request, after its answer, run again to the last layer (the
        exits recomputed on the way: the same rule gives the same ones) for :meth:`_watched_row`."""
        B = self.engine.batch_size
        for s in range(0, len(rows), B):
            part = rows[s : s + B]
            self.engine.run_rows([r[2] for r in part], [r[3] for r in part] if part[0][3] is not None else None,
                                 watch=[True] * len(part),
                                 on_watched=lambda j, *rest: self._watched_row(part[j][0], *rest))

    def _watched_row(self, key, exit_layer: int, exit_logits, final_logits) -> None:
        """A watched row reached the last layer: its bit into the watch (and its text into the log)."""
        from ..model.watch import disagrees

        text = self._watched.pop(key, None)
        g = self.watch.g
        tol = (g.tolerance if g is not None else None) or getattr(self.rule, "tolerance", None)
        bad = disagrees(exit_logits, final_logits, self.engine.regression, tol)
        self.watch.record(bad)
        self.observer.watched(bad, self.watch.snapshot())
        if self.watch_log is not None and text is not None:
            self.watch_log.add(text)

    def _take(self, timeout: float) -> Request | None:
        try:
            return self._inbox.get(block=timeout > 0, timeout=timeout if timeout > 0 else None)
        except queue.Empty:
            return None

    def _row_taken(self) -> None:
        with self._lock:
            self._waiting_rows -= 1

    def _finish_row(self, req: Request, pos: int, layer: int, logits, ent) -> None:
        """Store one row's result (converted as predict converts it)."""
        if not req.cancelled:
            req.results[pos] = (_result(pos, layer, logits, ent, True, self.engine.regression), logits.tolist())
        self._row_done(req)

    def _row_done(self, req: Request) -> None:
        """Count one row of ``req`` as done (run or dropped); the last one resolves its future."""
        req.remaining -= 1
        if req.remaining:
            return
        with self._lock:
            self._admitted -= 1
            self.observer.load(self._waiting_rows, self._admitted)
        if req.cancelled:
            return
        req.finished = time.perf_counter()
        results = [r[0] for r in req.results]
        self.observer.request_done(time.perf_counter() - req.started, [r.exit_layer for r in results])
        try:
            req.future.set_result([Served(p, raw, t) for (p, raw), t in zip(req.results, req.truncated)])
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            pass

    def _fail_all(self, e: BaseException) -> None:
        with self._lock:
            self._draining = True
        while True:
            req = self._take(0.0)
            if req is None:
                break
            req.future.set_exception(e) if not req.future.done() else None
        for req, _ in list(self._by_key.values()):
            if not req.future.done():
                req.future.set_exception(e)


@dataclass
class Served:
    """One input's result: the prediction (as predict computes it), the raw logits, truncation."""

    prediction: Prediction
    logits: list
    truncated: bool
