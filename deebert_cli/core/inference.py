"""Batched early-exit inference.

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

Results always come back in input order, one per input line, empty lines included.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from .checkpoint import Checkpoint
from .data import Encoded, encode, pad_batch
from .device import autocast
from .errors import UserError
from .exits import EntropyPolicy, LearnedPolicy, PatiencePolicy, exit_entropy, max_entropy


# ------------------------------------------------------------------------------------------------
# exit rule
# ------------------------------------------------------------------------------------------------
@dataclass
class ExitRule:
    """Entropy rule: a sample leaves after layer i (0-based) if entropy < thresholds[i]; the last layer
    always exits. ``thresholds`` has one value per layer (the last is ignored)."""

    thresholds: list
    entropy: str = "normalized"

    def tensor(self, num_labels: int, device) -> torch.Tensor:
        """[layers] thresholds; any at or above the maximum entropy exits everyone (becomes +inf)."""
        top = max_entropy(num_labels, self.entropy)
        vals = [math.inf if t >= top else float(t) for t in self.thresholds]
        return torch.tensor(vals, dtype=torch.float32, device=device)

    def policy(self, num_labels: int, device) -> EntropyPolicy:
        return EntropyPolicy(self.tensor(num_labels, device), self.entropy)

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

    def policy(self, num_labels: int, device) -> PatiencePolicy:
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

    def policy(self, num_labels: int, device) -> LearnedPolicy:
        return LearnedPolicy(self.threshold, self.regression)

    def describe(self) -> str:
        what = "predicted tanh(|error|) < " if self.regression else "predicted chance of being right > "
        return f"exit when the learned exit's {what}{self.threshold:g}"


def resolve_rule(ckpt: Checkpoint, threshold: float | None, thresholds: list | None, entropy: str,
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
# engines
# ------------------------------------------------------------------------------------------------
class EarlyExitEngine:
    """Runs ``rule`` over tokenised rows with a given checkpoint; see the module docstring."""

    def __init__(self, ckpt: Checkpoint, rule: ExitRule, device, batch_size: int = 32, all_probs: bool = False,
                 precision: str = "fp32"):
        self.model = ckpt.model.to(device).eval()
        self.precision = precision
        self.pad_id = ckpt.tokenizer.pad_token_id if ckpt.tokenizer is not None else 0
        self.device = device
        self.L = self.model.num_layers
        self.rule = rule
        self.policy = rule.policy(self.model.num_labels, device)
        self.batch_size = batch_size
        self.all_probs = all_probs
        self.regression = ckpt.task == "regression"

    def _exit(self, i: int, hidden: torch.Tensor, attn: torch.Tensor) -> tuple:
        """Exit after layer i: (logits [b, C] float32, learned exit score [b] or None when the policy
        needs none)."""
        if self.policy.needs_score:
            logits, score = self.model.exit_logits_and_score(i, hidden, attn)
            return logits.float(), score.float()
        return self.model.exit_logits(i, hidden, attn).float(), None

    def _entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """[b, C] -> [b]: the entropy reported with each result (nan for regression)."""
        if self.regression:
            return torch.full(logits.shape[:1], float("nan"), device=logits.device)
        return exit_entropy(logits, self.rule.entropy)

    # -- shrinking batch ----------------------------------------------------------------------------
    def _amp(self):
        """Autocast for the model's compute (entered around compute only, never across a ``yield``)."""
        return autocast(self.device, self.precision)

    @torch.no_grad()
    def run_batch(self, batch: dict) -> tuple:
        """One padded batch -> (exit_layer [b] 0-based, logits [b, C], entropy [b]). Rows that exit
        leave the batch; padding columns that no remaining row needs are trimmed."""
        with self._amp():
            return self._run_batch(batch)

    def _run_batch(self, batch: dict) -> tuple:
        m = self.model
        attn = batch["attention_mask"]
        hidden = m.embed(batch["input_ids"], batch.get("token_type_ids"))
        b = hidden.shape[0]
        active = torch.arange(b, device=hidden.device)
        state = self.policy.init_state(b, hidden.device)  # per-row policy state, sliced with the rows
        exit_layer = torch.full((b,), self.L - 1, dtype=torch.long, device=hidden.device)
        out_logits = torch.empty((b, m.num_labels), dtype=torch.float32, device=hidden.device)
        out_ent = torch.empty((b,), dtype=torch.float32, device=hidden.device)
        for i in range(self.L):
            hidden = m.run_layer(i, hidden, m.prepare_mask(attn, hidden))
            logits, score = self._exit(i, hidden, attn)
            ent = self._entropy(logits)
            done, state = self.policy.step(i, logits, state, score)
            if i == self.L - 1:
                done = torch.ones_like(done)
            if bool(done.any()):
                rows = active[done]
                exit_layer[rows], out_logits[rows], out_ent[rows] = i, logits[done], ent[done]
                keep = ~done
                if not bool(keep.any()):
                    break
                hidden, attn, active = hidden[keep], attn[keep], active[keep]
                state = tuple(t[keep] for t in state)
                width = int(attn.sum(1).max())
                if width < hidden.shape[1]:  # right padding: trailing columns no remaining row uses
                    hidden, attn = hidden[:, :width], attn[:, :width]
        return exit_layer, out_logits, out_ent

    # -- refill (continuous batching) ---------------------------------------------------------------
    @torch.no_grad()
    def run_refill(self, rows: Iterator[tuple], max_lag: int = 1024) -> Iterator[tuple]:
        """rows: (key, ids, token_type_ids|None), keys = input positions -> yields (key, exit_layer,
        logits, ent) as rows finish. Each queue holds per-row states [len, H]. The deepest full queue runs
        first; when none is full, new rows enter layer 1. A row may not wait while more than ``max_lag``
        newer inputs pass it (its queue then runs part-full), so the caller's reorder buffer stays
        bounded. At the end, partial queues drain shallowest first so rows merge downstream.

        ``rows`` may yield ``None``: "no new input right now" (a server between requests). The deepest
        non-empty queue then runs part-full; when every queue is empty the engine asks again (the
        iterator may block until input arrives)."""
        m, B, L = self.model, self.batch_size, self.L
        queues = [deque() for _ in range(L)]  # items: (key, hidden [len, H], policy state: tuple of 0-d tensors)
        exhausted = False
        newest = -1
        rows = iter(rows)
        end = object()
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
                    nxt = next(rows, end)
                    if nxt is end:
                        exhausted = True
                        break
                    if nxt is None:
                        idle = True
                        break
                    fresh.append(nxt)
                    newest = max(newest, nxt[0])
                if fresh:
                    self._embed_into(fresh, queues[0])
                if fresh or not idle:
                    continue
                nonempty = [i for i in range(L) if queues[i]]
                if not nonempty:
                    continue  # nothing in flight: ask the iterator again
                i = nonempty[-1]  # no new input right now: advance the deepest rows part-full
            else:
                nonempty = [i for i in range(L) if queues[i]]
                if not nonempty:
                    return
                i = nonempty[0]
            take = [queues[i].popleft() for _ in range(min(B, len(queues[i])))]
            width = max(t[1].shape[0] for t in take)
            hidden = torch.zeros((len(take), width, take[0][1].shape[1]), dtype=take[0][1].dtype, device=self.device)
            attn = torch.zeros((len(take), width), dtype=torch.long, device=self.device)
            for j, t in enumerate(take):
                n = t[1].shape[0]
                hidden[j, :n], attn[j, :n] = t[1], 1
            state = tuple(torch.stack([t[2][k] for t in take]) for k in range(len(take[0][2])))
            with self._amp():
                hidden = m.run_layer(i, hidden, m.prepare_mask(attn, hidden))
                logits, score = self._exit(i, hidden, attn)
            ent = self._entropy(logits)
            done, state = self.policy.step(i, logits, state, score)
            done = done.tolist() if i < L - 1 else [True] * len(take)
            for j, t in enumerate(take):
                if done[j]:
                    yield t[0], i, logits[j], ent[j]
                else:
                    queues[i + 1].append((t[0], hidden[j, : t[1].shape[0]], tuple(x[j] for x in state)))

    def _embed_into(self, fresh: list, queue: deque) -> None:
        enc_ids = [f[1] for f in fresh]
        tt = [f[2] for f in fresh] if fresh[0][2] is not None else None
        b = {k: v.to(self.device) for k, v in pad_batch(Encoded(enc_ids, tt), range(len(fresh)), self.pad_id).items()}
        with self._amp():
            hidden = self.model.embed(b["input_ids"], b.get("token_type_ids"))
        state = self.policy.init_state(len(fresh), self.device)
        for j, f in enumerate(fresh):
            queue.append((f[0], hidden[j, : len(f[1])], tuple(x[j] for x in state)))


def predict_stream(ckpt: Checkpoint, lines: Iterable[str], rule: ExitRule, device, *, batch_size: int = 32,
                   window: int = 1024, max_length: int | None = None, engine: str = "shrink",
                   all_probs: bool = False, stats: PredictStats | None = None,
                   precision: str = "fp32") -> Iterator[Prediction]:
    """Predict every line of ``lines`` (read lazily, ``window`` lines at a time) and yield one result
    per line in input order.

    Within a window, rows are sorted by length to cut padding; results pass through a reorder buffer
    and leave as soon as every earlier line is done, so output starts before the input ends and memory
    stays flat however long the input is."""
    if ckpt.tokenizer is None:
        raise UserError(f"'{ckpt.path}' has no tokenizer files")
    pairs = bool(ckpt.meta.get("data", {}).get("text_pair_column"))
    max_length = max_length or ckpt.meta.get("max_length", 128)
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
                enc = Encoded([r[1] for r in part], [r[2] for r in part] if part[0][2] is not None else None)
                b = {k: v.to(device) for k, v in pad_batch(enc, range(len(part)), eng.pad_id).items()}
                layer, logits, ent = eng.run_batch(b)
                for j, r in enumerate(part):
                    yield _result(r[0], int(layer[j]), logits[j], ent[j], all_probs, eng.regression)
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


def _result(index: int, layer: int, logits: torch.Tensor, ent: torch.Tensor, all_probs: bool,
            regression: bool = False) -> Prediction:
    """One row's Prediction from its exit's logits [C] (regression: the value is logits[0])."""
    if regression:
        return Prediction(index=index, exit_layer=int(layer) + 1, value=float(logits[0]))
    probs = torch.softmax(logits.float(), -1)
    conf, label = probs.max(-1)
    return Prediction(index=index, label=int(label), confidence=float(conf), exit_layer=int(layer) + 1,
                      entropy=float(ent), probs=probs.tolist() if all_probs else None)


def predict_sharded(ckpt: Checkpoint, lines: Iterable[str], rule: ExitRule, rt, *, stats: PredictStats,
                    window: int = 1024, **kw) -> Iterator[Prediction]:
    """:func:`predict_stream` spread over the processes of ``rt`` (a :class:`~.distributed.Runtime` under
    ``accelerate launch``): every process reads all of ``lines`` and predicts its strided share (lines
    ``rank, rank+W, ...``, empty ones included); the main process yields every result in input order,
    one per line, the others yield nothing. Every process must consume the iterator to the end (the
    gathering is collective); ``stats`` then holds the totals over all processes (``stats.replaced``, counted
    by :func:`read_lines` over the whole input, is left as it is)."""
    from .distributed import ordered_shards

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
