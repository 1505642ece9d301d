"""Batched early-exit inference, one engine for every runtime.

Exit rules are policies (:mod:`..model.policies`, chosen by :mod:`.rules`): entropy (DeeBERT), patience
(PABEE) or learned (BERxiT). A policy decides layer by layer from the off-ramp's logits (learned: its exit
score) and may keep per-row state (patience: last prediction and streak); that state travels with its row
(sliced with the hidden states in ``shrink``, carried in the queue items in ``refill``), so every engine and
batch size gives the same exits.

Two engines run the same exit rule and give the same answers (test-enforced):

* ``shrink``: a batch goes layer by layer; rows that exit leave it, so later layers compute only on the
  rest (padding columns no remaining row needs are trimmed too).
* ``refill``: per-layer queues; rows that survive layer i wait for layer i+1 while new inputs enter at
  layer 1, so each layer runs on full batches (continuous batching across a stream).

Both are written once against a small backend interface (:class:`Backend`) and the array operations numpy
and torch share (the Python array API, through ``array_api_compat``): the torch runtime
(:class:`~.torch_backend.TorchBackend`, the :class:`~..model.highway.HighwayModel`) and the ONNX runtime
(:class:`~.onnx_backend.OnnxModel`, one onnxruntime session) plug in underneath. Padding,
bookkeeping and results are numpy on the host; this module imports neither torch nor transformers.
Lines in, predictions out (in input order) is :mod:`.stream`.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Iterator, Protocol

import numpy as np

from ..model.policies import exit_entropy


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

    def layer(self, i: int, hidden, attention_mask, score: bool = False, exit: bool = True) -> tuple:
        """Layer i (0-based) and its exit: -> (hidden [b, s, H], logits [b, C] float32, learned exit
        score [b] float32 when ``score`` else None). The last layer's exit is the family's own head.
        ``exit=False`` (a layer where the rule lets nobody leave) may skip the off-ramp: logits None."""


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
        self._shadow, self._watch, self._on_watched = [], None, None  # watched rows (run_refill)

    def _entropy(self, logits: np.ndarray) -> np.ndarray:
        """[b, C] host logits -> [b]: the entropy reported with each result (nan for regression)."""
        if self.regression:
            return np.full(logits.shape[:1], np.nan, dtype=np.float32)
        return np.asarray(exit_entropy(logits, self.rule.entropy))

    def _decide(self, i: int, hidden, attn, state: tuple) -> tuple:
        """Layer i and the policy's decision, all on the device -> (hidden, logits or None, done, state)
        with ``done`` a [b] bool array of the backend, or ``None`` where nobody may leave (the off-ramp is
        skipped: an entropy threshold of 0), or ``True`` at the last layer (everyone leaves). The one exit
        logic of every engine (the static engine runs it inside its captured steps)."""
        be = self.backend
        last = i == self.L - 1
        if not last and not self.policy.can_exit(i):
            hidden, _, _ = be.layer(i, hidden, attn, False, exit=False)
            return hidden, None, None, state
        hidden, logits, score = be.layer(i, hidden, attn, self.policy.needs_score and not last)
        if last:
            return hidden, logits, True, state
        done, state = self.policy.step(i, logits, state, score)
        return hidden, logits, done, state

    def _step(self, i: int, hidden, attn, state: tuple) -> tuple:
        """:meth:`_decide` with the decision read back -> (hidden, logits, done [b] host bool, state). At a
        layer where the rule lets nobody leave there are no logits and no decision to read from the device."""
        hidden, logits, done, state = self._decide(i, hidden, attn, state)
        if done is None or done is True:
            return hidden, logits, np.full(attn.shape[0], done is True, dtype=bool), state
        return hidden, logits, self.backend.to_numpy(done), state

    # -- shrinking batch ----------------------------------------------------------------------------
    def run_batch(self, batch: dict, watch: np.ndarray | None = None, on_watched=None) -> tuple:
        """One padded batch {input_ids, attention_mask[, token_type_ids]} (numpy) -> (exit_layer [b]
        0-based, logits [b, C] float32, entropy [b]), numpy. Rows that exit leave the batch; padding
        columns that no remaining row needs are trimmed. Rows where ``watch`` [b] is true keep their exit's
        result but go on to the last layer, where ``on_watched(row, exit_layer, exit_logits, final_logits)``
        is called for each (the results are the same with or without)."""
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
        watch = np.zeros(b, dtype=bool) if watch is None else np.asarray(watch, dtype=bool)
        gone = np.zeros(b, dtype=bool)  # rows whose answer is in (watched rows go on after it)
        for i in range(self.L):
            hidden, logits, done, state = self._step(i, hidden, attn, state)
            if done.any():
                new = done & ~gone[active]
                exit_layer[active[new]] = i
                out_logits[active[new]] = be.to_numpy(logits)[new]
                gone[active[new]] = True
                if i == self.L - 1 and watch.any():
                    final = be.to_numpy(logits)
                    for j in np.flatnonzero(watch[active]):
                        r = int(active[j])
                        on_watched(r, int(exit_layer[r]), out_logits[r], final[j])
                keep = ~done | (watch[active] & (i < self.L - 1))
                if not keep.any():
                    break
                sel = be.put(keep)
                hidden, attn, active, lengths = hidden[sel], attn[sel], active[keep], lengths[keep]
                state = tuple(t[sel] for t in state)
                width = int(lengths.max())
                if width < hidden.shape[1]:  # right padding: trailing columns no remaining row uses
                    hidden, attn = hidden[:, :width], attn[:, :width]
        return exit_layer, out_logits, self._entropy(out_logits)

    def run_rows(self, ids: list, token_type_ids: list | None = None, watch=None, on_watched=None) -> tuple:
        """Token id lists (one per row, unpadded) -> :meth:`run_batch` on them, right-padded."""
        input_ids, mask, tt = pad_rows(ids, self.pad_id, token_type_ids)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if tt is not None:
            batch["token_type_ids"] = tt
        return self.run_batch(batch, watch, on_watched)

    # -- refill (continuous batching) ---------------------------------------------------------------
    def run_refill(self, rows: Iterator, max_lag: int = 1024, watch=None, on_watched=None) -> Iterator[tuple]:
        """rows: (key, ids, token_type_ids|None) with keys = input positions, or ``None`` meaning "no new
        input right now" -> yields (key, exit_layer, logits [C] numpy, entropy) as rows finish.

        Each queue holds per-row states [len, H]. The deepest full queue runs first; when none is full,
        new rows enter layer 1. A row may not wait while more than ``max_lag`` newer inputs pass it (its
        queue then runs part-full), so the caller's reorder buffer stays bounded. When the iterator yields
        ``None``, the deepest non-empty queue runs part-full (or, with every queue empty, the iterator is
        asked again: it may block until input comes). At the end, partial queues drain shallowest first so
        rows merge downstream.

        Watching (``watch(key)`` true for a sampled row): the row's result is yielded at its exit as any
        other, then its hidden state goes on to the last layer as a *shadow* row (not restarted), and
        ``on_watched(key, exit_layer, exit_logits, final_logits)`` is called there. Shadow rows are of lower
        priority: they fill the free places of a layer step (:meth:`_advance`), run alone only when no new
        input is waiting (the row source yields ``None``; :attr:`shadow_rows` tells it there is such work)
        or when more than one batch of them waits, and never change what or when a row answers."""
        B, L = self.batch_size, self.L
        queues = [deque() for _ in range(L)]  # items: (key, hidden [len, H], policy state: tuple of 0-d arrays)
        self._shadow = [deque() for _ in range(L)]  # items: (key, hidden, state, (exit layer, exit logits))
        self._watch, self._on_watched = watch, on_watched
        exhausted = False
        newest = -1
        rows = iter(rows)
        while True:
            full = [i for i in range(L) if len(queues[i]) >= B]
            oldest = min(((t[0], i) for i in range(L) for t in queues[i]), default=None)
            if full:
                i = full[-1]
            elif self.shadow_rows > B:  # shadow work piled up (a saturated server): bound it, one batch
                yield from self._advance_shadow(max(j for j in range(L) if self._shadow[j]), queues)
                continue
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
                if idle and not nonempty and self.shadow_rows:  # idle: the time for shadow work
                    yield from self._advance_shadow(max(j for j in range(L) if self._shadow[j]), queues)
                    continue
                if not idle or not nonempty:
                    continue
                i = nonempty[-1]  # no new input right now: move the deepest rows on, part-full
            else:
                nonempty = [i for i in range(L) if queues[i]]
                if not nonempty:
                    if not self.shadow_rows:
                        return
                    yield from self._advance_shadow(min(j for j in range(L) if self._shadow[j]), queues)
                    continue
                i = nonempty[0]
            yield from self._advance(i, queues)

    @property
    def shadow_rows(self) -> int:
        """Watched rows past their exit, still on their way to the last layer (:meth:`run_refill`)."""
        return sum(len(q) for q in self._shadow)

    def _advance_shadow(self, i: int, queues: list) -> Iterator[tuple]:
        """Shadow rows of layer i alone (idle time, or too many waiting)."""
        take = [self._shadow[i].popleft() for _ in range(min(self.batch_size, len(self._shadow[i])))]
        for group in width_groups([t[1].shape[0] for t in take], self.backend.call_tokens):
            yield from self._advance_rows(i, [take[j] for j in group], queues)

    def _advance(self, i: int, queues: list) -> Iterator[tuple]:
        """Run up to one batch of queue i through layer i, in sub-batches of similar length
        (:func:`width_groups`): finished rows are yielded, the rest move on."""
        take = [queues[i].popleft() for _ in range(min(self.batch_size, len(queues[i])))]
        while self._shadow and self._shadow[i] and len(take) < self.batch_size:  # free places: watched rows ride along
            take.append(self._shadow[i].popleft())
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
        if logits is not None:
            logits = be.to_numpy(logits)
            ent = self._entropy(logits)
        watched = []  # (key, exit layer, exit logits) of rows whose final logits are in hand
        for j, t in enumerate(take):
            item = (t[0], hidden[j, : lens[j]], tuple(x[j] for x in state))
            if len(t) > 3:  # a shadow row: its answer has left already
                if i == self.L - 1:
                    watched.append((t[0], t[3][0], t[3][1], logits[j]))
                else:
                    self._shadow[i + 1].append(item + (t[3],))
            elif done[j]:
                yield t[0], i, logits[j], float(ent[j])  # the answer first: the watch never delays it
                if self._watch is not None and self._watch(t[0]):
                    if i == self.L - 1:
                        watched.append((t[0], i, logits[j], logits[j]))
                    else:
                        self._shadow[i + 1].append(item + ((i, logits[j].copy()),))
            else:
                queues[i + 1].append(item)
        for w in watched:
            self._on_watched(*w)

    def _embed_into(self, fresh: list, queue: deque) -> None:
        be = self.backend
        ids, _, tt = pad_rows([f[1] for f in fresh], self.pad_id, [f[2] for f in fresh] if fresh[0][2] is not None else None)
        hidden = be.embed(be.put(ids), None if tt is None else be.put(tt))
        state = self.policy.init_state(len(fresh), self.device, self.xp)
        for j, f in enumerate(fresh):
            queue.append((f[0], hidden[j, : len(f[1])], tuple(x[j] for x in state)))
