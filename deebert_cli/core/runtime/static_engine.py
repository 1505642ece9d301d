"""The static engine: early exit with static shapes, for CUDA graphs (issue 29), on any torch device.

The refill engine (:class:`~.engine.EarlyExitEngine`, per-layer queues at a fixed batch B), with three
changes that take a GPU's per-layer overheads out and leave the exit logic (``_decide``: layer, off-ramp,
policy) as it is:

* **Static shapes.** A step pads its rows to a row bucket (a power of two, at most B: :func:`row_bucket`)
  and a length bucket (:func:`length_bucket`) and runs on static buffers kept per (layer, row bucket,
  length bucket). Padded rows attend to their first column only and are dropped after the step; padded
  columns are masked, so padding never changes a real row's answer. On CUDA each such step (layer,
  off-ramp, entropy and the exit decision as a device bool tensor) is
  captured once into a ``torch.cuda.CUDAGraph`` on first use and replayed; elsewhere the same code runs
  eagerly on the same buffers (so it is tested on a CPU). :meth:`StaticEngine.graph_report` counts them.
* **Decisions read late.** A step's decision (and logits) goes to the host through :class:`Decisions`:
  on CUDA a non-blocking copy into pinned memory and an event, elsewhere a plain read. Every row of a
  step moves on to the next layer's queue at once (speculatively); a decision is read ``lag`` steps later
  (default 1 on CUDA, 0 elsewhere), when rows that left are reported and dropped. A row that left thus
  costs at most ``lag`` wasted layer steps and the answers are those of ``lag`` 0 (test-enforced).
* **Full steps.** Queues run at B rows (the refill engine's scheduling), so most replays are full graphs.

Scripted exits (a timing mode) are a policy, :class:`~..model.policies.ScriptedPolicy`, so they run inside
the captured steps too.

:func:`plan_engine` is the rule ``--engine auto`` follows on a device."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .engine import EarlyExitEngine, width_groups

log = logging.getLogger("deebert")


def row_bucket(n: int, batch_size: int) -> int:
    """Rows of a step -> its row bucket: the next power of two, at most ``batch_size`` (which then is a
    bucket of its own when it is no power of two)."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def length_bucket(width: int, max_length: int) -> int:
    """Longest row of a step (tokens) -> its length bucket: a power of two (at least 8) up to 64, then a
    multiple of 64; never past ``max_length`` unless the row itself is longer."""
    b = max(8, 1 << max(width - 1, 0).bit_length()) if width <= 64 else -(-width // 64) * 64
    return max(width, min(b, max_length))


class Decisions:
    """Exit decisions on their way to the host. On CUDA :meth:`send` starts a non-blocking copy of the
    step's done flags and logits into pinned memory and records an event; :meth:`read` waits for that
    event only (the GPU meanwhile runs the steps launched since). Elsewhere ``send`` keeps the arrays and
    ``read`` is a plain synchronous read: the engine's logic of a decision arriving late is the same."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def send(self, done, logits) -> tuple:
        if not self.cuda:
            return done, logits, None
        pin = lambda t: None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        d, lg = pin(done), pin(logits)
        ev = torch.cuda.Event()
        ev.record()
        return d, lg, ev

    def read(self, sent: tuple) -> tuple:
        """-> (done [n] numpy bool, logits [n, C] numpy float32 or None)."""
        done, logits, ev = sent
        if ev is not None:
            ev.synchronize()
        return (None if done is None else done.numpy(), None if logits is None else logits.float().numpy())


class _Inputs:
    """The static input buffers of one (row bucket, length bucket), shared by the steps of every layer (a
    step copies its rows in first, and its outputs are copied out before the next step runs)."""

    def __init__(self, rows: int, width: int, hidden_size: int, dtype, state: tuple, device):
        self.hidden = torch.zeros(rows, width, hidden_size, dtype=dtype, device=device)
        self.mask = torch.zeros(rows, width, dtype=torch.int64, device=device)
        self.mask[:, 0] = 1
        self.state = tuple(torch.zeros((rows,) + tuple(s.shape[1:]), dtype=s.dtype, device=device) for s in state)


class _Step:
    """One (layer, row bucket, length bucket): its inputs, captured graph (CUDA) and outputs."""

    def __init__(self, inputs: _Inputs):
        self.hidden, self.mask, self.state = inputs.hidden, inputs.mask, inputs.state
        self.graph, self.out = None, None

    def tensors(self) -> list:
        out = [t for t in (self.out or ()) if isinstance(t, torch.Tensor)]
        out += [t for t in (self.out[3] if self.out else ()) if isinstance(t, torch.Tensor)]
        return [self.hidden, self.mask, *self.state, *out]


class StaticEngine(EarlyExitEngine):
    """See the module docstring. ``lag``: steps a decision may stay unread (None: 1 on CUDA, 0 elsewhere);
    ``graphs``: capture CUDA graphs (None: on CUDA)."""

    def __init__(self, ckpt, rule, device=None, batch_size: int = 32, all_probs: bool = False,
                 precision: str = "fp32", backend=None, *, lag: int | None = None, graphs: bool | None = None,
                 max_length: int | None = None):
        super().__init__(ckpt, rule, device, batch_size, all_probs, precision, backend)
        from .torch_backend import TorchBackend

        if not isinstance(self.backend, TorchBackend):
            from ..errors import UserError

            raise UserError("--engine static runs on the torch runtime (--runtime torch)")
        cuda = self.device.type == "cuda"
        self.lag = (1 if cuda else 0) if lag is None else int(lag)
        self.graphs = cuda if graphs is None else bool(graphs)
        if self.graphs and not cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.backend.autocast_cache = not self.graphs
        self.max_length = max_length or ckpt.meta.get("max_length", 128)
        self.decisions = Decisions(self.device)
        self.steps: dict = {}  # (layer, row bucket, length bucket) -> _Step
        self._inputs: dict = {}  # (row bucket, length bucket, dtype) -> _Inputs
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None  # one memory pool for all graphs
        self.capture_seconds = 0.0
        self.wasted_rows = 0  # rows computed at a layer after they had left (speculation), for the report
        self._pending: deque = deque()  # (layer, keys, sent decision) not yet read
        self._dead: set = set()  # keys whose result is out
        self._queues = None

    # -- the refill loop with late decisions ------------------------------------------------------
    def run_refill(self, rows: Iterator, max_lag: int = 1024, watch=None, on_watched=None) -> Iterator[tuple]:
        """:meth:`EarlyExitEngine.run_refill` on static steps; the decisions still unread at the end are read.
        A stream that pauses (yields ``None``) with every queue empty keeps the results of its last ``lag``
        steps until it resumes or ends: serving (which pauses) keeps the default engine, and so does
        watching (shadow rows to the last layer), which this engine does not run."""
        if watch is not None:
            raise ValueError("the static engine does not watch rows (serve and predict-dataset use the refill engine)")
        self._pending.clear()
        self._dead.clear()
        yield from super().run_refill(rows, max_lag)
        yield from self._read(0)

    def run_rows(self, ids: list, token_type_ids: list | None = None) -> tuple:
        """One batch of rows -> (exit_layer, logits, entropy) numpy in row order, as :meth:`run_batch` gives."""
        tts = token_type_ids or [None] * len(ids)
        out = {k: r for k, *r in self.run_refill(((k, ids[k], tts[k]) for k in range(len(ids))))}
        layer = np.array([out[k][0] for k in range(len(ids))], dtype=np.int64)
        logits = np.stack([out[k][1] for k in range(len(ids))]).astype(np.float32)
        return layer, logits, np.array([out[k][2] for k in range(len(ids))], dtype=np.float32)

    def run_batch(self, batch: dict) -> tuple:
        ids = [r[m.astype(bool)].tolist() for r, m in zip(np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"]))]
        tt = batch.get("token_type_ids")
        tts = None if tt is None else [r[m.astype(bool)].tolist() for r, m in zip(np.asarray(tt), np.asarray(batch["attention_mask"]))]
        return self.run_rows(ids, tts)

    def _advance(self, i: int, queues: list) -> Iterator[tuple]:
        """Up to B live rows of queue i through layer i (rows already out are dropped unseen)."""
        self._queues = queues
        take, q = [], queues[i]
        while q and len(take) < self.batch_size:
            t = q.popleft()
            if t[0] not in self._dead:
                take.append(t)
        if take:
            for group in width_groups([t[1].shape[0] for t in take], self.backend.call_tokens):
                yield from self._advance_rows(i, [take[j] for j in group], queues)

    def _advance_rows(self, i: int, take: list, queues: list) -> Iterator[tuple]:
        """Rows ``take`` (key, hidden [len, H], state) through layer i as one static step; every row moves on
        to queue i+1 at once, and the decisions older than ``lag`` steps are read."""
        keys = [t[0] for t in take]
        lens = [t[1].shape[0] for t in take]
        hidden, logits, done, state = self._run_step(i, take, lens)
        if done is not None:
            n = len(take)
            self._pending.append((i, keys, self.decisions.send(None if done is True else done[:n],
                                                               None if logits is None else logits[:n])))
        yield from self._read(self.lag)
        if i + 1 < self.L:
            for j, t in enumerate(take):
                if t[0] not in self._dead:
                    queues[i + 1].append((t[0], hidden[j, : lens[j]], tuple(x[j] for x in state)))

    def _read(self, lag: int) -> Iterator[tuple]:
        """Read the decisions of all but the newest ``lag`` steps: rows that left are yielded (key, layer,
        logits [C], entropy) and dropped from the queue they were sent on to."""
        while len(self._pending) > lag:
            i, keys, sent = self._pending.popleft()
            done, logits = self.decisions.read(sent)
            ent = self._entropy(logits)
            if done is None:  # the last layer: everyone leaves
                done = np.ones(len(keys), dtype=bool)
            left = []
            for j, k in enumerate(keys):
                if k in self._dead:
                    self.wasted_rows += 1
                elif done[j]:
                    left.append(k)
                    yield k, i, logits[j], float(ent[j])
            self._dead.update(left)
            q = self._queues[i + 1] if self._queues is not None and left and i + 1 < self.L else None
            if q:
                keep = [t for t in q if t[0] not in self._dead]
                q.clear()
                q.extend(keep)

    # -- one static step ----------------------------------------------------------------------------
    def _run_step(self, i: int, take: list, lens: list) -> tuple:
        """Pad ``take`` into the static buffers of its buckets, run (or replay) the step -> (hidden
        [n, W, H] (a copy), logits [R, C] or None, done [R] / None / True, state (copies))."""
        n, w = len(take), max(lens)
        R, W = row_bucket(n, self.batch_size), length_bucket(w, self.max_length)
        flat = torch.cat([t[1] for t in take])  # [sum of lens, H]: one copy kernel, not one per row
        state = tuple(torch.stack([t[2][k] for t in take]) for k in range(len(take[0][2])))
        st = self.steps.get((i, R, W))
        if st is None:
            key = (R, W, flat.dtype)
            if key not in self._inputs:
                self._inputs[key] = _Inputs(R, W, flat.shape[-1], flat.dtype, state, self.device)
            st = self.steps[(i, R, W)] = _Step(self._inputs[key])
        mask = np.zeros((R, W), dtype=np.int64)
        mask[n:, 0] = 1  # a padded row attends to its first column only: finite, and dropped after the step
        for j, m in enumerate(lens):
            mask[j, :m] = 1
        # each real token's place in the [R * W] buffer; other places keep finite values of earlier steps,
        # which the mask keeps out of every real row (attention weight 0, mean pooling by the mask)
        where = np.flatnonzero(mask[:n].reshape(-1))
        st.hidden.view(R * W, -1).index_copy_(0, self._put(where), flat)
        st.mask.copy_(self._put(mask), non_blocking=True)
        for buf, s in zip(st.state, state):
            buf[:n].copy_(s)
        if self.graphs:
            if st.graph is None:
                self._capture(i, st)
            st.graph.replay()
        else:
            st.out = self._static_step(i, st)
        hidden, logits, done, new_state = st.out
        return hidden[:n].clone(), logits, done, tuple(s[:n].clone() for s in new_state)

    def _put(self, a: np.ndarray) -> torch.Tensor:
        """A host array -> the device, through pinned memory on CUDA (the copy does not block the host)."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _static_step(self, i: int, st: _Step) -> tuple:
        """What a step computes (and what a graph captures): the engine's one exit logic on the static buffers."""
        self.backend._mask_cache = None  # the mask buffer is the same tensor with new contents
        return self._decide(i, st.hidden, st.mask, st.state)

    def _capture(self, i: int, st: _Step) -> None:
        """Capture step i on ``st`` into a CUDA graph (two warm-up runs on a side stream first, as torch asks)."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                self._static_step(i, st)
        torch.cuda.current_stream().wait_stream(side)
        st.graph = torch.cuda.CUDAGraph()
        # one pool: graphs run one at a time on one stream, and each keeps its outputs alive (st.out)
        with torch.cuda.graph(st.graph, pool=self._pool), torch.no_grad():
            st.out = self._static_step(i, st)
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - t0

    def graph_report(self) -> dict:
        """How many static steps (CUDA graphs where captured) exist, and what their buffers hold: {steps,
        graphs, buffer_bytes, capture_seconds, wasted_rows, buckets: {(layer, rows, length)}}. A graph's
        private memory pool holds its intermediate activations too (about a few times its buffers)."""
        seen, total = set(), 0
        for st in self.steps.values():
            for t in st.tensors():
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return {"steps": len(self.steps), "graphs": sum(st.graph is not None for st in self.steps.values()),
                "buffer_bytes": total, "capture_seconds": round(self.capture_seconds, 3),
                "wasted_rows": self.wasted_rows, "buckets": sorted(self.steps)}


# ------------------------------------------------------------------------------------------------
# which engine on which device
# ------------------------------------------------------------------------------------------------
MEASURE_KEY = "gpu_measurement"  # deebert.json: {precision: {batch size: early exit / full depth texts/s}}


@dataclass
class Plan:
    engine: str  # shrink, refill or static
    full_depth: bool  # run every row to the last layer (early exit cannot pay here)
    note: str | None  # one line for the user, where the plan is not what they asked for


def plan_engine(meta: dict, device, batch_size: int, precision: str = "fp32") -> Plan:
    """The rule of ``--engine auto``. Not on CUDA: ``shrink`` (CPU behaviour and speed as before). On CUDA:
    the static engine (CUDA graphs, decisions read one step late, refill at B = ``batch_size``, which at
    batch 1 is the speculative batch-1 path), unless the checkpoint's stored one-off measurement
    (``deebert.json`` key ``gpu_measurement``: early exit's texts/s over full depth's, by precision and
    batch size; the nearest measured batch size counts) is below 1 for this precision: then every row
    runs to the last layer, and the one-line note says why."""
    if torch.device(device).type != "cuda":
        return Plan("shrink", False, None)
    got = (meta.get(MEASURE_KEY) or {}).get(precision) or {}
    if got:
        near = min(got, key=lambda b: (abs(np.log2(int(b)) - np.log2(batch_size)), int(b)))
        ratio = float(got[near])
        if ratio < 1.0:
            return Plan("static", True, f"early exit cannot pay for this model in {precision} at batch {batch_size} on "
                        f"this GPU (measured {ratio:.2f}x of full depth at batch {near}): every row runs to the last layer")
    return Plan("static", False, None)
