"""The rows bench_gpu.py times: each is a callable ``run(texts, batch_size) -> (labels, exit layers or
None)`` in input order that tokenises, length-sorts and batches inside the timing, and keeps what it
builds (CUDA graphs, engines) across calls, so the warm-up pass captures and the timed passes replay.

* :class:`Eager`: the plain transformers classifier (its own attention, SDPA by default);
* :class:`FullGraphs`: the same classifier on bucketed static shapes (the static engine's buckets), one
  CUDA graph per bucket on CUDA, or ``torch.compile(mode="reduce-overhead")`` with ``compile=True``
  (eager on the CPU): the fastest full-depth baseline a GPU user would run;
* :class:`Deebert`: a deebert engine driven as ``predict_stream`` drives it (one window: rows sorted by
  length; ``shrink`` in batches of B, ``static`` as one refill stream), optionally with scripted exits
  (:class:`~deebert_cli.core.model.policies.ScriptedPolicy`: every decision is computed, the script wins).
"""
from __future__ import annotations

import time
from collections import deque
from types import SimpleNamespace

import numpy as np
import torch

from deebert_cli.core.data.encoding import encode
from deebert_cli.core.device import autocast
from deebert_cli.core.runtime.engine import EarlyExitEngine, pad_rows
from deebert_cli.core.runtime.rules import ExitRule
from deebert_cli.core.runtime.static_engine import StaticEngine, length_bucket, row_bucket

MAX_LEN = 128


def sorted_encoding(tok, texts: list) -> tuple:
    """-> (Encoded, indices sorted by (length, index)): the order every row runs its texts in."""
    enc = encode(tok, texts, None, MAX_LEN)
    return enc, sorted(range(len(texts)), key=lambda i: (len(enc.input_ids[i]), i))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Eager:
    """The plain classifier: tokenise, length-sort, pad each batch to its longest row, one forward."""

    def __init__(self, hf, tok, device, precision):
        self.model, self.tok, self.device, self.precision = hf.to(device).eval(), tok, device, precision

    @torch.no_grad()
    def __call__(self, texts, bs) -> tuple:
        enc, order = sorted_encoding(self.tok, texts)
        pred = [0] * len(texts)
        for s in range(0, len(order), bs):
            part = order[s : s + bs]
            a, m, _ = pad_rows([enc.input_ids[i] for i in part], self.tok.pad_token_id)
            with autocast(self.device, self.precision):
                logits = self.model(input_ids=torch.from_numpy(a).to(self.device),
                                    attention_mask=torch.from_numpy(m).to(self.device)).logits
            for i, p in zip(part, logits.argmax(-1).tolist()):
                pred[i] = p
        return pred, None


class FullGraphs:
    """The plain classifier on static shapes: each batch padded to (row bucket, length bucket) in static
    buffers; on CUDA one CUDA graph per bucket (captured on first use, then replayed) or, with
    ``compile``, torch.compile(mode="reduce-overhead") on the same padded shapes; eager elsewhere."""

    def __init__(self, hf, tok, device, precision, compile: bool = False):
        self.model, self.tok, self.device, self.precision = hf.to(device).eval(), tok, device, precision
        self.graphs = device.type == "cuda" and not compile
        self.fn = torch.compile(self.model, mode="reduce-overhead", dynamic=False) if compile else self.model
        self.buckets: dict = {}  # (rows, length) -> (ids, mask, graph or None, logits)
        self.capture_seconds = 0.0
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def _forward(self, ids, mask):
        with autocast(self.device, self.precision, cache=not self.graphs):
            return self.fn(input_ids=ids, attention_mask=mask).logits

    def _bucket(self, R: int, W: int) -> list:
        b = self.buckets.get((R, W))
        if b is None:
            ids = torch.full((R, W), self.tok.pad_token_id, dtype=torch.int64, device=self.device)
            mask = torch.zeros(R, W, dtype=torch.int64, device=self.device)
            b = self.buckets[(R, W)] = [ids, mask, None, None]
        return b

    def _capture(self, b: list) -> None:
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(b[0], b[1])
        torch.cuda.current_stream().wait_stream(side)
        b[2] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(b[2], pool=self.pool):
            b[3] = self._forward(b[0], b[1])
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - t0

    @torch.no_grad()
    def __call__(self, texts, bs) -> tuple:
        enc, order = sorted_encoding(self.tok, texts)
        pred = [0] * len(texts)
        for s in range(0, len(order), bs):
            part = order[s : s + bs]
            a, m, _ = pad_rows([enc.input_ids[i] for i in part], self.tok.pad_token_id)
            n, w = a.shape
            R, W = row_bucket(n, bs), length_bucket(w, MAX_LEN)
            ids, mask = np.full((R, W), self.tok.pad_token_id, dtype=np.int64), np.zeros((R, W), dtype=np.int64)
            ids[:n, :w], mask[:n, :w], mask[n:, 0] = a, m, 1
            b = self._bucket(R, W)
            b[0].copy_(torch.from_numpy(ids), non_blocking=True)
            b[1].copy_(torch.from_numpy(mask), non_blocking=True)
            if self.graphs:
                if b[2] is None:
                    self._capture(b)
                b[2].replay()
                logits = b[3]
            else:
                logits = self._forward(b[0], b[1])
            for i, p in zip(part, logits[:n].argmax(-1).tolist()):
                pred[i] = p
        return pred, None

    def report(self) -> dict:
        return {"buckets": len(self.buckets), "graphs": sum(b[2] is not None for b in self.buckets.values()),
                "capture_seconds": round(self.capture_seconds, 3)}


def as_checkpoint(model, tok) -> SimpleNamespace:
    """What the engines read of a checkpoint, for a model that is none (the BERT-base shape)."""
    return SimpleNamespace(model=model, tokenizer=tok, task="classification", meta={"max_length": MAX_LEN},
                           label_names=["0", "1"], path="(random weights)")


class Deebert:
    """A deebert engine (``shrink``: the old engine; ``static``: the new one) at threshold ``thr``, one
    engine per batch size kept across calls. ``script``: an exit layer per text (scripted exits)."""

    def __init__(self, ckpt, device, precision, thr: float, engine: str = "shrink", script: list | None = None):
        self.ckpt, self.device, self.precision, self.thr = ckpt, device, precision, thr
        self.kind, self.script = engine, script
        self.engines: dict = {}
        self.queue: deque = deque()

    def engine(self, bs: int):
        eng = self.engines.get(bs)
        if eng is None:
            rule = ExitRule([self.thr] * self.ckpt.model.num_layers)
            cls = StaticEngine if self.kind == "static" else EarlyExitEngine
            kw = {"max_length": MAX_LEN} if self.kind == "static" else {}
            eng = self.engines[bs] = cls(self.ckpt, rule, self.device, bs, precision=self.precision, **kw)
            if self.script is not None:
                from deebert_cli.core.model.policies import ScriptedPolicy

                eng.policy = ScriptedPolicy(eng.policy, self.queue)
        return eng

    def __call__(self, texts, bs) -> tuple:
        enc, order = sorted_encoding(self.ckpt.tokenizer, texts)
        eng = self.engine(bs)
        if self.script is not None:  # rows take their scripted layers in the order they enter the engine
            self.queue.clear()
            self.queue.extend(self.script[k] for k in order)
        pred, exits = [0] * len(texts), [0] * len(texts)
        if self.kind == "static":
            for k, layer, logits, _ in eng.run_refill(((k, enc.input_ids[k], None) for k in order), len(order)):
                pred[k], exits[k] = int(np.argmax(logits)), int(layer)
            return pred, exits
        for s in range(0, len(order), bs):
            part = order[s : s + bs]
            layer, logits, _ = eng.run_rows([enc.input_ids[i] for i in part])
            for j, i in enumerate(part):
                pred[i], exits[i] = int(np.argmax(logits[j])), int(layer[j])
        return pred, exits

    def report(self, bs: int) -> dict | None:
        eng = self.engines.get(bs)
        if not isinstance(eng, StaticEngine):
            return None
        rep = eng.graph_report()
        rep["buckets"] = len(rep["buckets"])
        return rep


def stretch(exits: list, layers_from: int, layers_to: int, seed: int = 0) -> list:
    """Exit layers (0-based) of an L-layer model -> the same spread over ``layers_to`` layers: layer e
    becomes a layer drawn uniformly from the ones e's share of the depth covers."""
    rng = np.random.default_rng(seed)
    scale = layers_to / layers_from
    return [min(layers_to - 1, int((e + rng.random()) * scale)) for e in exits]
