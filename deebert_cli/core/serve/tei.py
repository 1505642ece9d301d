"""The request and the answer of ``POST /predict``, as text-embeddings-inference (TEI) shapes them.

A body is ``{"inputs": ..., "truncate": bool, "truncation_direction": "left"|"right", "raw_scores":
bool}``; anything malformed (JSON, fields, types, sizes, encodings) is an :class:`~.batching.InputError`
carrying TEI's status and ``error_type``: 400 ``empty``, 413 or 422 ``validation``. Other fields are
ignored, as TEI ignores them (clients such as ``huggingface_hub`` send ``parameters``)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from .config import ServeConfig
from .batching import InputError, Request

RULE_FIELDS = ("threshold", "thresholds", "exit_policy", "patience", "entropy")
# TEI's spellings (serde aliases): left keeps a long text's end, right (the default) its start
DIRECTIONS = {"left": "left", "Left": "left", "right": "right", "Right": "right"}


@dataclass
class Parsed:
    items: list  # texts, or (text, text_pair) tuples
    single: bool  # answer with one flat list (one input sent as a string / one pair)
    truncate: bool
    raw_scores: bool
    direction: str | None  # "left", "right", or None: the tokenizer's own side (as predict)


def parse_inputs(inputs, pairs: bool) -> tuple:
    """TEI's ``inputs`` -> (list of texts or (a, b) pairs, single: answer with one flat list).

    A string is one input. A list of lists is a batch (each inner list one text or a pair). A flat list
    of strings is, on a pair checkpoint, one input as TEI reads it (``[a]`` or ``[a, b]``); on a
    single-text checkpoint a batch of texts."""
    if isinstance(inputs, str):
        return [inputs], True
    if not isinstance(inputs, list):
        raise InputError("`inputs` must be a string, a list of strings or a list of [text] / [text, text_pair]")
    if not inputs:
        raise InputError("`inputs` cannot be empty", 400, "empty")
    if all(isinstance(x, str) for x in inputs):
        if not pairs:
            return list(inputs), False
        if len(inputs) > 2:
            raise InputError("a pair is [text, text_pair]; send a batch as [[a, b], [c, d], ...]")
        return [inputs[0] if len(inputs) == 1 else (inputs[0], inputs[1])], True
    out = []
    for k, x in enumerate(inputs):
        if not (isinstance(x, list) and len(x) in (1, 2) and all(isinstance(t, str) for t in x)):
            raise InputError(f"inputs[{k}] must be [text] or [text, text_pair] (strings)")
        out.append(x[0] if len(x) == 1 else (x[0], x[1]))
    return out, False


def check_sizes(items: list, cfg: ServeConfig) -> None:
    """Batch size and bytes per text (413), empty texts (400, TEI's ``empty``), texts that are not
    Unicode (a lone surrogate such as ``"\\ud800"`` is valid JSON, but no text: 422)."""
    if len(items) > cfg.max_client_batch_size:
        raise InputError(f"batch size {len(items)} > maximum allowed batch size {cfg.max_client_batch_size}", 413)
    for k, x in enumerate(items):
        for t in (x if isinstance(x, tuple) else (x,)):
            try:
                size = len(t.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise InputError(f"input {k} is not valid Unicode: a lone surrogate "
                                 f"{t[e.start]!a} at character {e.start}") from None
            if not t.strip():
                raise InputError(f"input {k} is empty", 400, "empty")
            if size > cfg.max_input_bytes:
                raise InputError(f"input {k} is longer than {cfg.max_input_bytes} bytes (--max-input-bytes)", 413)


def check_rule_overrides(payload: dict, cfg: ServeConfig) -> None:
    """The engine runs one exit rule for every row it batches: a request may restate it, not change it."""
    server_rule = {"threshold": cfg.threshold, "thresholds": cfg.thresholds, "exit_policy": cfg.exit_policy,
                   "patience": cfg.patience, "entropy": cfg.entropy}
    for name in RULE_FIELDS:
        if name in payload and payload[name] != server_rule[name]:
            raise InputError(f"`{name}` cannot be set per request: the server batches rows of every request "
                             f"under one exit rule (start it with --{name.replace('_', '-')})")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json would read NaN, Infinity and -Infinity


def load_json(body: bytes):
    """Body -> JSON value; InputError (422) for anything that is not JSON, nested too deep included."""
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise InputError("invalid JSON: nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError too (a body that is not UTF-8, -16 or -32)
        raise InputError(f"invalid JSON: {e}") from None


def parse_request(body: bytes, cfg: ServeConfig, pairs: bool) -> Parsed:
    """Raw body -> :class:`Parsed`; InputError for anything malformed."""
    payload = load_json(body)
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise InputError("the body must be a JSON object with `inputs`")
    items, single = parse_inputs(payload["inputs"], pairs)
    check_sizes(items, cfg)
    truncate = payload.get("truncate")
    truncate = cfg.auto_truncate if truncate is None else truncate
    raw = payload.get("raw_scores", False)
    if not isinstance(truncate, bool) or not isinstance(raw, bool):
        raise InputError("`truncate` and `raw_scores` must be true or false")
    direction = None
    if "truncation_direction" in payload:
        value = payload["truncation_direction"]
        if not isinstance(value, str) or value not in DIRECTIONS:
            got = ascii(value[:40]) if isinstance(value, str) else ("null" if value is None else type(value).__name__)
            raise InputError(f'`truncation_direction` must be "left" or "right" (or Left, Right), got {got}')
        direction = DIRECTIONS[value]
    check_rule_overrides(payload, cfg)
    return Parsed(items, single, truncate, raw, direction)


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (413) once it is known to pass ``limit`` bytes: by its Content-Length
    before reading, or while reading (chunked bodies). A body up to 4 x ``limit`` is read to its end
    first and dropped, so that a client still sending it gets the 413 rather than a broken pipe; a
    larger one is refused at once."""
    declared = request.headers.get("content-length", "")
    linger = 4 * limit
    stream = request.stream()
    if declared.isdigit() and int(declared) > limit:
        if int(declared) <= linger:
            await _discard(stream, linger)
        raise InputError(f"request body of {declared} bytes is larger than {limit} bytes", 413)
    body, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await _discard(stream, linger - size)
            raise InputError(f"request body is larger than {limit} bytes", 413)
        body.append(chunk)
    return b"".join(body)


async def _discard(stream, budget: int) -> None:
    """Read and drop the rest of a body, up to ``budget`` bytes."""
    async for chunk in stream:
        budget -= len(chunk)
        if budget < 0:
            return


def render(served, names: list, raw_scores: bool) -> list:
    """One input's TEI answer: every label with its score, best first, plus deebert's fields."""
    p = served.prediction
    extra = {"exit_layer": p.exit_layer, "entropy": None if math.isnan(p.entropy) else p.entropy,
             "truncated": served.truncated}
    if p.probs is None:  # regression: the value, as TEI answers a one-output model
        return [{"label": names[0], "score": p.value, **extra}]
    scores = served.logits if raw_scores else p.probs
    out = [{"label": n, "score": s, **extra} for n, s in zip(names, scores)]
    out.sort(key=lambda d: d["score"], reverse=True)
    return out


def tei_headers(req: Request, parsed: Parsed, start: float) -> dict:
    """TEI's headers of a prediction: whole milliseconds from the request's arrival (``start``) and in
    each stage, characters and tokens computed."""
    t = req.timings()
    ms = lambda seconds: str(int(seconds * 1000))  # noqa: E731
    chars = sum(len(t) for x in parsed.items for t in (x if isinstance(x, tuple) else (x,)))
    return {"x-compute-characters": str(chars), "x-compute-tokens": str(req.tokens),
            "x-total-time": ms(time.perf_counter() - start), "x-tokenization-time": ms(t["tokenization"]),
            "x-queue-time": ms(t["queue"]), "x-inference-time": ms(t["inference"])}
