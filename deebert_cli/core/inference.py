"""Batched early-exit inference, one engine for every runtime.

Exit rules are policies (:mod:`.exits`): entropy (DeeBERT), patience (PABEE) or learned (BERxiT). A
policy decides layer by layer from the off-ramp's logits (learned: its exit score) and may keep per-row
state (patience: last prediction and streak); that state travels with its row (sliced with the hidden
states in ``shrink``, carried in the queue items in ``refill``), so every engine and batch size gives the
same exits.

Two engines run the same exit rule and give the same answers (test-enforced):

* ``shrink``: a batch goes layer by layer; rows that exit leave it, so later layers compute only on the
  rest (padding columns no remaining row needs are trimmed too).
* ``refill``: per-layer queues; rows that survive layer i wait for layer i+1 while new inputs enter at
  layer 1, so each layer runs on full batches (continuous batching across a stream).

Both are written once against a small backend interface (:class:`Backend`) and the array operations numpy
and torch share (the Python array API, through ``array_api_compat``): the torch runtime
(:class:`~.torch_backend.TorchBackend`, the :class:`~.modeling.HighwayModel`) and the ONNX runtime
(:class:`~.onnx_runtime.OnnxModel`, one onnxruntime session) plug in underneath. Padding,
bookkeeping and results are numpy on the host; this module imports neither torch nor transformers.

Results always come back in input order, one per input line, empty lines included.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

import numpy as np

from .model.checkpoint import Checkpoint  # noqa: F401  (type of the torch runtime's checkpoints)
from .data.encoding import encode
from .errors import UserError
from .model.policies import EntropyPolicy, LearnedPolicy, PatiencePolicy, exit_entropy, max_entropy

RUNTIMES = ("torch", "onnx")


# ------------------------------------------------------------------------------------------------
# exit rule
# ------------------------------------------------------------------------------------------------
@dataclass
class ExitRule:
    """Entropy rule: a sample leaves after layer i (0-based) if entropy < thresholds[i]; the last layer
    always exits. ``thresholds`` has one value per layer (the last is ignored)."""

    thresholds: list
    entropy: str = "normalized"

    def values(self, num_labels: int) -> list:
        """[layers] thresholds; any at or above the maximum entropy exits everyone (becomes +inf)."""
        top = max_entropy(num_labels, self.entropy)
        return [math.inf if t >= top else float(t) for t in self.thresholds]

    def tensor(self, num_labels: int, device):
        """The thresholds as a float32 torch tensor on ``device``."""
        import torch

        return torch.tensor(self.values(num_labels), dtype=torch.float32, device=device)

    def policy(self, num_labels: int, device=None, xp=None) -> EntropyPolicy:
        """The policy over arrays of namespace ``xp`` (default: torch tensors on ``device``)."""
        from .model.policies import default_namespace

        xp = default_namespace(xp)
        return EntropyPolicy(xp.asarray(self.values(num_labels), dtype=xp.float32, device=device), self.entropy)

    def describe(self) -> str:
        unit = "normalized entropy (0..1)" if self.entropy == "normalized" else "entropy in nats"
        ts = self.thresholds[:-1]
        val = f"{ts[0]:g}" if len(set(ts)) <= 1 else ",".join(f"{t:g}" for t in ts)
        return f"exit when {unit} < {val}"


@dataclass
class PatienceRule:
    """Patience rule (PABEE): leave once the off-ramps' predictions of ``patience`` + 1 consecutive layers
    agree (see :class:`~.exits.PatiencePolicy`); ``tolerance`` is for regression. ``entropy`` is only the
    unit of the entropy reported beside each prediction."""

    patience: int
    tolerance: float | None = None
    entropy: str = "normalized"

    def policy(self, num_labels: int, device=None, xp=None) -> PatiencePolicy:
        return PatiencePolicy(self.patience, self.tolerance)

    def describe(self) -> str:
        if self.tolerance is not None:
            return f"exit when {self.patience + 1} consecutive off-ramps agree within {self.tolerance:g} (patience {self.patience})"
        return f"exit when {self.patience + 1} consecutive off-ramps predict the same class (patience {self.patience})"


@dataclass
class LearnedRule:
    """Learned-exit rule (BERxiT): leave when the off-ramp's exit predictor crosses ``threshold`` (see
    :class:`~.exits.LearnedPolicy`). ``entropy`` is only the unit of the entropy reported beside each result."""

    threshold: float
    regression: bool = False
    entropy: str = "normalized"

    def policy(self, num_labels: int, device=None, xp=None) -> LearnedPolicy:
        return LearnedPolicy(self.threshold, self.regression)

    def describe(self) -> str:
        what = "predicted tanh(|error|) < " if self.regression else "predicted chance of being right > "
        return f"exit when the learned exit's {what}{self.threshold:g}"


def resolve_rule(ckpt, threshold: float | None, thresholds: list | None, entropy: str,
                 default: float = 0.3, policy: str = "entropy", patience: int = 3,
                 tolerance: float = 0.1) -> tuple:
    """Pick the exit rule. Patience policy: a :class:`PatienceRule` (thresholds must not be given).
    Learned: a :class:`LearnedRule` at ``threshold`` (default 0.9; regression 0.1).
    Entropy: per-layer --thresholds > --threshold > thresholds stored in the checkpoint > ``default``.
    A regression checkpoint refuses entropy and uses ``tolerance`` with patience.
    Returns (rule, source description)."""
    L = ckpt.model.num_layers
    regression = ckpt.task == "regression"
    if regression and policy == "entropy":
        raise UserError(f"'{ckpt.path}' is a regression checkpoint: entropy needs class probabilities; "
                        "use --exit-policy patience (with --tolerance) or --exit-policy learned (with --threshold)")
    if policy == "learned":
        if thresholds:
            raise UserError("--thresholds is per-layer entropy; the learned policy takes one --threshold")
        if not ckpt.exits_trained or not ckpt.model.ramp_cfg.learned_exit:
            raise UserError(f"'{ckpt.path}' has no learned exits: run `deebert train-exits --learned-exits` first")
        t = threshold if threshold is not None else (0.1 if regression else 0.9)
        if not 0.0 <= t <= 1.0:
            raise UserError(f"--threshold {t} is out of range: learned exit scores lie in [0, 1]")
        return LearnedRule(t, regression, entropy), "--threshold" if threshold is not None else f"default learned threshold {t:g}"
    if policy == "patience":
        if threshold is not None or thresholds:
            raise UserError("--threshold/--thresholds apply to --exit-policy entropy; the patience policy takes --patience N")
        if not ckpt.exits_trained:
            raise UserError(f"the off-ramps of '{ckpt.path}' are not trained: run `deebert train-exits` first "
                            "(the patience policy compares their predictions)")
        return PatienceRule(patience, tolerance if regression else None, entropy), "--exit-policy patience"
    if thresholds:
        if len(thresholds) not in (L - 1, L):
            raise UserError(f"--thresholds needs {L - 1} values (layers 1..{L - 1}; the last layer always exits), got {len(thresholds)}")
        vals, src = list(thresholds) + [0.0] * (L - len(thresholds)), "--thresholds"
    elif threshold is not None:
        vals, src = [threshold] * L, "--threshold"
    elif ckpt.meta.get("thresholds"):
        stored = ckpt.meta["thresholds"]
        if stored.get("entropy", "normalized") != entropy:
            entropy = stored.get("entropy", "normalized")
        vals, src = list(stored["values"]) + [0.0] * (L - len(stored["values"])), "thresholds stored in the checkpoint"
    else:
        vals, src = [default] * L, f"default threshold {default}"
    vals[-1] = 0.0
    if not ckpt.exits_trained and any(v > 0 for v in vals[:-1]):
        raise UserError(
            f"the off-ramps of '{ckpt.path}' are not trained: run `deebert train-exits` first, "
            "or pass --threshold 0 to run every input to the last layer"
        )
    return ExitRule(vals, entropy), src


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
def read_lines(stream, stats: PredictStats | None = None) -> Iterator[str]:
    """Lines of a binary stream as text: CRLF or LF ends, a last line without newline kept, bytes that
    are not UTF-8 replaced (counted in ``stats.replaced``)."""
    for raw in stream:
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            if stats is not None:
                stats.replaced += 1
            yield raw.decode("utf-8", errors="replace")


def split_pair(line: str) -> tuple:
    """'a<TAB>b' -> ('a', 'b') for sentence-pair checkpoints."""
    a, _, b = line.partition("\t")
    return a, b


# ------------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------------
class Backend(Protocol):
    """What the engine needs from a runtime. Arrays are of namespace ``xp`` (numpy, or torch through
    ``array_api_compat``) on ``device``; everything the engine keeps on the host is numpy."""

    xp: object
    device: object
    num_layers: int
    num_labels: int
    call_tokens: int  # what one more layer call costs, in padded tokens (see :func:`width_groups`)

    def put(self, a: np.ndarray):
        """A host numpy array -> an array of this backend (ids, masks, row selections)."""

    def to_numpy(self, a) -> np.ndarray:
        """An array of this backend -> host numpy (float32 for floating point)."""

    def embed(self, input_ids, token_type_ids=None):
        """[b, s] ids -> hidden states [b, s, H]."""

    def layer(self, i: int, hidden, attention_mask, score: bool = False) -> tuple:
        """Layer i (0-based) and its exit: -> (hidden [b, s, H], logits [b, C] float32, learned exit
        score [b] float32 when ``score`` else None). The last layer's exit is the family's own head."""


def backend_for(ckpt, device=None, precision: str = "fp32") -> Backend:
    """The backend that runs ``ckpt``: its model itself where it is one (the ONNX runtime), else a
    :class:`~.torch_backend.TorchBackend` over the HighwayModel."""
    model = ckpt.model
    if hasattr(model, "backend"):
        return model.backend(device, precision)
    from .torch_backend import TorchBackend

    return TorchBackend(model, device, precision)


def width_groups(lens: list, call_tokens: float) -> list:
    """Split rows of lengths ``lens`` into sub-batches that each pad to their own longest row -> lists of
    row indices (each in ascending length). Minimises sum over sub-batches of (call_tokens + rows x
    longest), i.e. padded tokens plus a fixed cost per extra call, by dynamic programming over the rows
    sorted by length (optimal groups are contiguous there). A refill step holds rows of whatever lengths
    were in flight (a server's requests arrive in any order), and padding them all to the longest cost
    1.86x their tokens on the movie reviews; ``call_tokens`` is the backend's measured price of a call
    (benchmarks/bench_refill_groups.py)."""
    order = sorted(range(len(lens)), key=lens.__getitem__)
    s = [lens[j] for j in order]
    n = len(s)
    if n * s[-1] - sum(s) <= call_tokens:  # all the padding costs less than one more call
        return [order]
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)  # best[k]: cheapest split of the k shortest rows
    for k in range(1, n + 1):
        w = s[k - 1]
        for j in range(k):  # the last group: sorted rows j..k-1, padded to w
            c = best[j] + call_tokens + (k - j) * w
            if c < best[k]:
                best[k], cut[k] = c, j
    groups, k = [], n
    while k:
        groups.append(order[cut[k]:k])
        k = cut[k]
    return groups[::-1]


def pad_rows(ids: list, pad_id: int, token_type_ids: list | None = None) -> tuple:
    """Right-pad token id lists -> (input_ids [b, w] int64, attention_mask [b, w] int64, token_type_ids
    [b, w] int64 or None), numpy."""
    lens = [len(r) for r in ids]
    b, w = len(ids), max(lens)
    out = np.full((b, w), pad_id, dtype=np.int64)
    mask = np.zeros((b, w), dtype=np.int64)
    tt = None if token_type_ids is None else np.zeros((b, w), dtype=np.int64)
    for j, r in enumerate(ids):
        n = lens[j]
        out[j, :n] = r
        mask[j, :n] = 1
        if tt is not None:
            tt[j, :n] = token_type_ids[j]
    return out, mask, tt


# ------------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------------
_END = object()


class EarlyExitEngine:
    """Runs ``rule`` over tokenised rows of a checkpoint (any runtime); see the module docstring."""

    def __init__(self, ckpt, rule, device=None, batch_size: int = 32, all_probs: bool = False,
                 precision: str = "fp32", backend: Backend | None = None):
        self.backend = backend if backend is not None else backend_for(ckpt, device, precision)
        self.xp = self.backend.xp
        self.pad_id = ckpt.tokenizer.pad_token_id if ckpt.tokenizer is not None else 0
        self.device = self.backend.device
        self.L = self.backend.num_layers
        self.C = self.backend.num_labels
        self.rule = rule
        self.policy = rule.policy(self.C, self.device, self.xp)
        self.batch_size = batch_size
        self.all_probs = all_probs
        self.regression = ckpt.task == "regression"

    def _entropy(self, logits: np.ndarray) -> np.ndarray:
        """[b, C] host logits -> [b]: the entropy reported with each result (nan for regression)."""
        if self.regression:
            return np.full(logits.shape[:1], np.nan, dtype=np.float32)
        return np.asarray(exit_entropy(logits, self.rule.entropy))

    def _step(self, i: int, hidden, attn, state: tuple) -> tuple:
        """Layer i and the policy's decision -> (hidden, logits, done [b] host bool, state)."""
        be = self.backend
        last = i == self.L - 1
        hidden, logits, score = be.layer(i, hidden, attn, self.policy.needs_score and not last)
        if last:
            return hidden, logits, np.ones(logits.shape[0], dtype=bool), state
        done, state = self.policy.step(i, logits, state, score)
        return hidden, logits, be.to_numpy(done), state

    # -- shrinking batch ----------------------------------------------------------------------------
    def run_batch(self, batch: dict) -> tuple:
        """One padded batch {input_ids, attention_mask[, token_type_ids]} (numpy) -> (exit_layer [b]
        0-based, logits [b, C] float32, entropy [b]), numpy. Rows that exit leave the batch; padding
        columns that no remaining row needs are trimmed."""
        be = self.backend
        ids, mask, tt = batch["input_ids"], np.asarray(batch["attention_mask"]), batch.get("token_type_ids")
        b = mask.shape[0]
        hidden = be.embed(be.put(np.asarray(ids)), None if tt is None else be.put(np.asarray(tt)))
        attn = be.put(mask)
        active = np.arange(b)  # original rows still in the batch
        lengths = mask.sum(1)
        state = self.policy.init_state(b, self.device, self.xp)  # per-row policy state, sliced with the rows
        exit_layer = np.full(b, self.L - 1, dtype=np.int64)
        out_logits = np.empty((b, self.C), dtype=np.float32)
        for i in range(self.L):
            hidden, logits, done, state = self._step(i, hidden, attn, state)
            if done.any():
                exit_layer[active[done]] = i
                out_logits[active[done]] = be.to_numpy(logits)[done]
                keep = ~done
                if not keep.any():
                    break
                sel = be.put(keep)
                hidden, attn, active, lengths = hidden[sel], attn[sel], active[keep], lengths[keep]
                state = tuple(t[sel] for t in state)
                width = int(lengths.max())
                if width < hidden.shape[1]:  # right padding: trailing columns no remaining row uses
                    hidden, attn = hidden[:, :width], attn[:, :width]
        return exit_layer, out_logits, self._entropy(out_logits)

    def run_rows(self, ids: list, token_type_ids: list | None = None) -> tuple:
        """Token id lists (one per row, unpadded) -> :meth:`run_batch` on them, right-padded."""
        input_ids, mask, tt = pad_rows(ids, self.pad_id, token_type_ids)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if tt is not None:
            batch["token_type_ids"] = tt
        return self.run_batch(batch)

    # -- refill (continuous batching) ---------------------------------------------------------------
    def run_refill(self, rows: Iterator, max_lag: int = 1024) -> Iterator[tuple]:
        """rows: (key, ids, token_type_ids|None) with keys = input positions, or ``None`` meaning "no new
        input right now" -> yields (key, exit_layer, logits [C] numpy, entropy) as rows finish.

        Each queue holds per-row states [len, H]. The deepest full queue runs first; when none is full,
        new rows enter layer 1. A row may not wait while more than ``max_lag`` newer inputs pass it (its
        queue then runs part-full), so the caller's reorder buffer stays bounded. When the iterator yields
        ``None``, the deepest non-empty queue runs part-full (or, with every queue empty, the iterator is
        asked again: it may block until input comes). At the end, partial queues drain shallowest first so
        rows merge downstream."""
        B, L = self.batch_size, self.L
        queues = [deque() for _ in range(L)]  # items: (key, hidden [len, H], policy state: tuple of 0-d arrays)
        exhausted = False
        newest = -1
        rows = iter(rows)
        while True:
            full = [i for i in range(L) if len(queues[i]) >= B]
            oldest = min(((t[0], i) for i in range(L) for t in queues[i]), default=None)
            if full:
                i = full[-1]
            elif oldest is not None and newest - oldest[0] > max_lag:
                i = oldest[1]  # an old row has waited long enough: move it on in a part-full batch
            elif not exhausted:
                fresh, idle = [], False
                for _ in range(B - len(queues[0])):
                    nxt = next(rows, _END)
                    if nxt is _END:
                        exhausted = True
                        break
                    if nxt is None:
                        idle = True
                        break
                    fresh.append(nxt)
                    newest = max(newest, nxt[0])
                if fresh:
                    self._embed_into(fresh, queues[0])
                nonempty = [i for i in range(L) if queues[i]]
                if not idle or not nonempty:
                    continue
                i = nonempty[-1]  # no new input right now: move the deepest rows on, part-full
            else:
                nonempty = [i for i in range(L) if queues[i]]
                if not nonempty:
                    return
                i = nonempty[0]
            yield from self._advance(i, queues)

    def _advance(self, i: int, queues: list) -> Iterator[tuple]:
        """Run up to one batch of queue i through layer i, in sub-batches of similar length
        (:func:`width_groups`): finished rows are yielded, the rest move on."""
        take = [queues[i].popleft() for _ in range(min(self.batch_size, len(queues[i])))]
        for group in width_groups([t[1].shape[0] for t in take], self.backend.call_tokens):
            yield from self._advance_rows(i, [take[j] for j in group], queues)

    def _advance_rows(self, i: int, take: list, queues: list) -> Iterator[tuple]:
        """Rows ``take`` (key, hidden [len, H], state) through layer i as one padded batch."""
        xp, be = self.xp, self.backend
        lens = [t[1].shape[0] for t in take]
        width = max(lens)
        hidden = xp.zeros((len(take), width, take[0][1].shape[1]), dtype=take[0][1].dtype, device=self.device)
        mask = np.zeros((len(take), width), dtype=np.int64)
        for j, t in enumerate(take):
            hidden[j, : lens[j]] = t[1]
            mask[j, : lens[j]] = 1
        state = tuple(xp.stack([t[2][k] for t in take]) for k in range(len(take[0][2])))
        hidden, logits, done, state = self._step(i, hidden, be.put(mask), state)
        logits = be.to_numpy(logits)
        ent = self._entropy(logits)
        for j, t in enumerate(take):
            if done[j]:
                yield t[0], i, logits[j], float(ent[j])
            else:
                queues[i + 1].append((t[0], hidden[j, : lens[j]], tuple(x[j] for x in state)))

    def _embed_into(self, fresh: list, queue: deque) -> None:
        be = self.backend
        ids, _, tt = pad_rows([f[1] for f in fresh], self.pad_id, [f[2] for f in fresh] if fresh[0][2] is not None else None)
        hidden = be.embed(be.put(ids), None if tt is None else be.put(tt))
        state = self.policy.init_state(len(fresh), self.device, self.xp)
        for j, f in enumerate(fresh):
            queue.append((f[0], hidden[j, : len(f[1])], tuple(x[j] for x in state)))


def predict_stream(ckpt, lines: Iterable[str], rule, device=None, *, batch_size: int = 32,
                   window: int = 1024, max_length: int | None = None, engine: str = "shrink",
                   all_probs: bool = False, stats: PredictStats | None = None,
                   precision: str = "fp32") -> Iterator[Prediction]:
    """Predict every line of ``lines`` (read lazily, ``window`` lines at a time) and yield one result
    per line in input order. ``ckpt`` is what :func:`load_for_inference` returns (either runtime).

    Within a window, rows are sorted by length to cut padding; results pass through a reorder buffer
    and leave as soon as every earlier line is done, so output starts before the input ends and memory
    stays flat however long the input is."""
    if ckpt.tokenizer is None:
        raise UserError(f"'{ckpt.path}' has no tokenizer files")
    pairs = bool(ckpt.meta.get("data", {}).get("text_pair_column"))
    max_length = max_length or ckpt.meta.get("max_length", 128)
    max_length = min(max_length, ckpt.model.max_tokens or max_length)  # never past the position embeddings
    eng = EarlyExitEngine(ckpt, rule, device, batch_size, all_probs, precision)
    stats = stats if stats is not None else PredictStats(eng.L)
    tok = ckpt.tokenizer
    ready: dict = {}  # index -> Prediction, waiting for earlier lines

    def windows() -> Iterator[list]:
        """Length-sorted (index, ids, token_type_ids) of each window's non-empty lines."""
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

    def produce() -> Iterator[Prediction]:
        if engine == "refill":
            stream = (r for rows in windows() for r in rows)
            for key, layer, logits, ent in eng.run_refill(stream, max_lag=window):
                yield _result(key, layer, logits, ent, all_probs, eng.regression)
            return
        for rows in windows():
            for s in range(0, len(rows), batch_size):
                part = rows[s : s + batch_size]
                layer, logits, ent = eng.run_rows([r[1] for r in part],
                                                  [r[2] for r in part] if part[0][2] is not None else None)
                yield from _results([r[0] for r in part], layer, logits, ent, all_probs, eng.regression)
            yield None  # window done: flush empties waiting in the buffer

    t0 = time.perf_counter()
    nxt = 0
    for res in produce():
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
    """A checkpoint ready for :func:`resolve_rule` and :func:`predict_stream` on ``runtime``:

    * ``torch``: :func:`~.checkpoint.load_checkpoint` (``device``: a torch device or spec such as
      ``"cpu"``/``"auto"``; None leaves the model on the CPU until predict moves it).
    * ``onnx``: the graphs written by ``deebert export`` (:func:`~.onnx_runtime.load_onnx`; options
      ``precision="fp32"|"int8"``, ``threads``), run by ONNX Runtime on the CPU without torch.

    Both give the same attributes: ``.model`` (``num_layers``, ``num_labels``, ``ramp_cfg``), ``.task``,
    ``.exits_trained``, ``.meta``, ``.path``, ``.label_names``, ``.tokenizer``."""
    if runtime == "onnx":
        from .onnx_runtime import load_onnx

        if device not in (None, "auto", "cpu") and str(device) != "cpu":
            raise UserError(f"--runtime onnx runs on the CPU; device '{device}' needs --runtime torch")
        return load_onnx(path, **runtime_opts)
    if runtime != "torch":
        raise UserError(f"unknown runtime '{runtime}': use {' or '.join(RUNTIMES)}")
    if runtime_opts:
        raise UserError(f"options {sorted(runtime_opts)} apply to --runtime onnx only")
    from .model.checkpoint import load_checkpoint

    if isinstance(device, str):
        from .device import resolve_device

        device = resolve_device(device)
    return load_checkpoint(path, device)


def predict_sharded(ckpt: Checkpoint, lines: Iterable[str], rule: ExitRule, rt, *, stats: PredictStats,
                    window: int = 1024, **kw) -> Iterator[Prediction]:
    """:func:`predict_stream` spread over the processes of ``rt`` (a :class:`~.launch.Runtime` under
    ``accelerate launch``): every process reads all of ``lines`` and predicts its strided share (lines
    ``rank, rank+W, ...``, empty ones included); the main process yields every result in input order,
    one per line, the others yield nothing. Every process must consume the iterator to the end (the
    gathering is collective); ``stats`` then holds the totals over all processes (``stats.replaced``, counted
    by :func:`read_lines` over the whole input, is left as it is)."""
    from .launch import ordered_shards

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
