"""The HTTP API of `deebert serve` (Starlette + uvicorn, Prometheus metrics): the `[serve]` extra.

Compatible with Hugging Face text-embeddings-inference (TEI): ``POST /predict`` takes ``{"inputs": ...,
"truncate": bool, "raw_scores": bool}`` and answers with TEI's shape (every label with its score, best
first; a list of such lists for a batch), each entry carrying deebert's ``exit_layer``, ``entropy`` and
``truncated``. Errors are ``{"error", "error_type"}`` with TEI's status codes. Imported only by
`deebert serve` (see :func:`.batching.check_serve_extra`)."""
from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..config import ServeConfig
from ..device import check_precision, resolve_device
from ..errors import UserError
from ..runtime.rules import resolve_rule
from .batching import BatchingServer, Draining, InputError, Observer, Overloaded, load_model

RULE_FIELDS = ("threshold", "thresholds", "exit_policy", "patience", "entropy")
PAGE = Path(__file__).with_name("page.html")
INLINE_BODY = 4096  # bytes: a request this small is tokenised on the event loop (tens of microseconds)


class PrometheusObserver(Observer):
    """The worker's hooks as Prometheus metrics, in a registry of their own."""

    def __init__(self, num_layers: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("deebert_requests", "HTTP /predict requests by status code", ["status"], registry=r)
        self.examples = Counter("deebert_examples", "Inputs predicted", registry=r)
        self.exit_layer = Histogram("deebert_exit_layer", "Exit layer (1-based) of each input",
                                    buckets=list(range(1, num_layers + 1)), registry=r)
        self.latency = Histogram("deebert_request_duration_seconds", "Time from admission to result",
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.batch = Histogram("deebert_batch_size", "Rows per layer step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue = Gauge("deebert_queue_rows", "Rows waiting to enter the model", registry=r)
        self.in_progress = Gauge("deebert_requests_in_progress", "Requests admitted and not finished", registry=r)

    def step(self, layer: int, rows: int) -> None:
        self.batch.observe(rows)

    def request_done(self, seconds: float, exit_layers: list) -> None:
        self.latency.observe(seconds)
        self.examples.inc(len(exit_layers))
        for layer in exit_layers:
            self.exit_layer.observe(layer)

    def load(self, rows_waiting: int, requests: int) -> None:
        self.queue.set(rows_waiting)
        self.in_progress.set(requests)


def error(status: int, message: str, error_type: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------------
# request parsing
# ------------------------------------------------------------------------------------------------
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
        raise InputError("`inputs` cannot be empty")
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
    if len(items) > cfg.max_client_batch_size:
        raise InputError(f"batch size {len(items)} > maximum allowed batch size {cfg.max_client_batch_size}", 413)
    for k, x in enumerate(items):
        for t in (x if isinstance(x, tuple) else (x,)):
            if not t.strip():
                raise InputError(f"input {k} is empty")
            if len(t.encode("utf-8")) > cfg.max_input_bytes:
                raise InputError(f"input {k} is longer than {cfg.max_input_bytes} bytes (--max-input-bytes)", 413)


def check_rule_overrides(payload: dict, cfg: ServeConfig) -> None:
    """The engine runs one exit rule for every row it batches: a request may restate it, not change it."""
    server_rule = {"threshold": cfg.threshold, "thresholds": cfg.thresholds, "exit_policy": cfg.exit_policy,
                   "patience": cfg.patience, "entropy": cfg.entropy}
    for name in RULE_FIELDS:
        if name in payload and payload[name] != server_rule[name]:
            raise InputError(f"`{name}` cannot be set per request: the server batches rows of every request "
                             f"under one exit rule (start it with --{name.replace('_', '-')})")


def parse_request(body: bytes, cfg: ServeConfig, pairs: bool) -> tuple:
    """Raw body -> (inputs, single, truncate, raw_scores); InputError for anything malformed."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"invalid JSON: {e}") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise InputError("the body must be a JSON object with `inputs`")
    items, single = parse_inputs(payload["inputs"], pairs)
    check_sizes(items, cfg)
    truncate = payload.get("truncate")
    truncate = cfg.auto_truncate if truncate is None else truncate
    raw = payload.get("raw_scores", False)
    if not isinstance(truncate, bool) or not isinstance(raw, bool):
        raise InputError("`truncate` and `raw_scores` must be true or false")
    check_rule_overrides(payload, cfg)
    return items, single, truncate, raw


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


# ------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------
async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client goes away (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(server: BatchingServer, cfg: ServeConfig, info: dict, metrics: PrometheusObserver,
              on_stop=lambda: None) -> Starlette:
    names = server.ckpt.label_names
    max_body = cfg.max_client_batch_size * (6 * cfg.max_input_bytes + 16) + 4096  # JSON escapes grow text

    async def predict(request: HttpRequest):
        resp = await _predict(request)
        metrics.requests.labels(str(resp.status_code)).inc()
        return resp

    async def _predict(request: HttpRequest):
        try:
            body = await request.body()
            if len(body) > max_body:
                raise InputError(f"request body of {len(body)} bytes is too large", 413)
            items, single, truncate, raw = parse_request(body, cfg, server.pairs)
            if len(body) <= INLINE_BODY:  # tokenising a few short texts costs less than a thread hop
                req = server.submit(items, truncate)
            else:  # a large batch: tokenise off the event loop
                req = await run_in_threadpool(server.submit, items, truncate)
        except InputError as e:
            return error(e.status, str(e), e.error_type)
        except Overloaded as e:
            return error(429, str(e), "overloaded", retry_after=1)
        except Draining as e:
            return error(503, str(e), "unhealthy", retry_after=5)
        fut = asyncio.wrap_future(req.future)
        watcher = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({fut, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not fut.done():  # the client went away: drop its rows
            server.cancel(req)
            return Response(status_code=499)
        watcher.cancel()
        try:
            results = fut.result()
        except Exception as e:  # the worker failed (a bug or a device error)
            return error(500, f"inference failed: {e}", "backend")
        answers = [render(s, names, raw) for s in results]
        return JSONResponse(answers[0] if single else answers)

    async def health(request: HttpRequest):
        return JSONResponse({}) if server.alive else error(503, "not serving", "unhealthy", retry_after=5)

    async def info_route(request: HttpRequest):
        return JSONResponse(info)

    async def prometheus(request: HttpRequest):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def page(request: HttpRequest):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(server.drain)  # uvicorn has finished the accepted requests by now
        on_stop()

    async def root(request: HttpRequest):  # TEI answers POST / as its model's route: /predict here
        return await predict(request) if request.method == "POST" else await page(request)

    routes = [Route("/predict", predict, methods=["POST"]), Route("/health", health), Route("/info", info_route),
              Route("/metrics", prometheus), Route("/", root, methods=["GET", "POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on --host {host} --port {port}: {e.strerror}") from None


def serve(cfg: ServeConfig, announce=lambda message: None) -> None:
    """Load the model, start the worker and serve HTTP until SIGINT/SIGTERM (then drain and return)."""
    _check_port(cfg.host, cfg.port)
    device = "cpu" if cfg.runtime == "onnx" else resolve_device(cfg.device)
    if cfg.runtime == "torch":
        check_precision(cfg.precision, device)
    ckpt = load_model(cfg.checkpoint, device, cfg.runtime, cfg.onnx_precision)
    rule, source = resolve_rule(ckpt, cfg.threshold, cfg.thresholds, cfg.entropy, policy=cfg.exit_policy,
                                patience=cfg.patience, tolerance=cfg.tolerance)
    metrics = PrometheusObserver(ckpt.model.num_layers)
    server = BatchingServer(ckpt, rule, device, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens,
                            max_concurrent_requests=cfg.max_concurrent_requests, max_wait_ms=cfg.max_wait_ms,
                            batching=cfg.batching, max_length=cfg.max_length, precision=cfg.precision,
                            observer=metrics, max_lag=cfg.max_lag).start()
    info = {
        "model_id": str(cfg.checkpoint), "model_type": {"classifier": {"id2label": dict(enumerate(ckpt.label_names))}},
        "max_concurrent_requests": cfg.max_concurrent_requests, "max_input_length": server.max_length,
        "max_batch_tokens": cfg.max_batch_tokens, "max_client_batch_size": cfg.max_client_batch_size,
        "auto_truncate": cfg.auto_truncate, "num_layers": server.num_layers, "task": ckpt.task,
        "exit_rule": rule.describe(), "exit_rule_source": source, "batching": cfg.batching,
        "rows_per_step": server.engine.batch_size, "max_lag": server.max_lag, "device": str(device), "runtime": cfg.runtime, "config": vars(cfg),
    }
    announce(f"deebert serve: {rule.describe()} ({source}); {server.num_layers} layers; device {device}; "
             f"{'batching across requests' if cfg.batching else 'each request alone'}, up to "
             f"{server.engine.batch_size} rows per step")
    announce(f"listening on http://{cfg.host}:{cfg.port} (POST /predict, GET /, /health, /info, /metrics)")
    app = build_app(server, cfg, info, metrics, on_stop=lambda: announce("deebert serve: stopped (accepted requests finished)"))
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run()  # on SIGTERM/SIGINT: stop listening, finish requests, lifespan shutdown
    server.drain()
