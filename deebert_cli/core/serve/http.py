"""The HTTP API of `deebert serve` (Starlette + uvicorn, Prometheus metrics): the `[serve]` extra.

Compatible with Hugging Face text-embeddings-inference (TEI): ``POST /predict`` takes ``{"inputs": ...,
"truncate": bool, "truncation_direction": "left"|"right", "raw_scores": bool}`` and answers with TEI's
shape (every label with its score, best first; a list of such lists for a batch), each entry carrying
deebert's ``exit_layer``, ``entropy`` and ``truncated``, and TEI's ``x-*-time`` headers. Errors are
``{"error", "error_type"}`` with TEI's status codes (:mod:`.tei` reads requests, :mod:`.context` gives
every request an id, a log line, a metric and JSON errors). Imported only by `deebert serve` (see
:func:`.batching.check_serve_extra`)."""
from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .config import ServeConfig
from ..device import check_precision, resolve_device
from ..errors import UserError
from ..runtime.rules import resolve_rule
from .batching import BatchingServer, Draining, InputError, Overloaded, load_model
from .context import error, log_error, make_app, setup_logging
from .metrics import PrometheusObserver
from .tei import parse_request, read_body, render, tei_headers

PAGE = Path(__file__).with_name("page.html")
INLINE_BODY = 4096  # bytes: a request this small is tokenised on the event loop (tens of microseconds)
RETRY_AFTER_DRAINING = 5  # seconds


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client goes away (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def draining(message: str = "the server is shutting down") -> JSONResponse:
    """503 while draining: try again (elsewhere) later, and do not keep this connection."""
    return error(503, message, "unhealthy", retry_after=RETRY_AFTER_DRAINING, headers={"Connection": "close"})


def build_app(server: BatchingServer, cfg: ServeConfig, info: dict, metrics: PrometheusObserver,
              on_stop=lambda: None) -> Starlette:
    names = server.ckpt.label_names
    max_body = cfg.max_client_batch_size * (6 * cfg.max_input_bytes + 16) + 4096  # JSON escapes grow text

    async def predict(request: HttpRequest):
        start = time.perf_counter()
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # read as JSON, a compressed body was "invalid JSON" (422)
            return error(415, f"Content-Encoding '{encoding}' is not accepted: send the JSON body uncompressed",
                         "validation", headers={"Accept-Encoding": "identity"})
        try:
            body = await read_body(request, max_body)
            parsed = parse_request(body, cfg, server.pairs)
            submit = partial(server.submit, parsed.items, parsed.truncate, parsed.direction)
            # a few short texts cost less to tokenise than a thread hop; a large batch goes off the event loop
            req = submit() if len(body) <= INLINE_BODY else await run_in_threadpool(submit)
        except ClientDisconnect:  # the client went away before its body was in: nobody to answer
            return Response(status_code=499)
        except InputError as e:
            return error(e.status, str(e), e.error_type)
        except Overloaded as e:
            return error(429, str(e), "overloaded", retry_after=1)
        except Draining as e:
            return draining(str(e))
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
            log_error("inference failed: %r", e)
            return error(500, f"inference failed: {e}", "backend")
        answers = [render(s, names, parsed.raw_scores) for s in results]
        return JSONResponse(answers[0] if parsed.single else answers, headers=tei_headers(req, parsed, start))

    async def health(request: HttpRequest):
        return JSONResponse({}) if server.alive else draining("not serving")

    async def info_route(request: HttpRequest):
        watch = server.watch.snapshot() if server.watch is not None else {"rate": 0.0, "state": "off"}
        return JSONResponse({**info, "watch": watch})

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
    return make_app(routes, metrics, lifespan=lifespan)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before its shutdown. The first SIGTERM or SIGINT stops admitting
    requests while the port stays open: new requests and /health answer 503 with Retry-After (so a load
    balancer takes the server out instead of meeting a refused connection), admitted requests finish.
    Then uvicorn's own shutdown (stop listening, close connections, lifespan). Signals are not re-raised
    (uvicorn's habit, which made a clean SIGTERM exit 143): :attr:`stop_signal` tells the caller which
    came. A second signal goes straight to uvicorn's shutdown; a third Ctrl-C forces it."""

    def __init__(self, config: uvicorn.Config, server: BatchingServer, announce, on_started=lambda: None):
        super().__init__(config)
        self._batching, self._announce, self._on_started = server, announce, on_started
        self.stop_signal: int | None = None
        self._drain: asyncio.Future | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = sig  # on_tick starts the drain: a signal handler must not wait on locks
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def startup(self, sockets=None) -> None:
        """uvicorn's startup (lifespan, then the sockets accept connections), then ``on_started``: an
        address announced before this point refused the clients that came at once."""
        await super().startup(sockets)
        if self.started:
            self._on_started()

    async def on_tick(self, counter: int) -> bool:
        if self.stop_signal is not None and self._drain is None:
            self._announce(f"deebert serve: draining ({signal.Signals(self.stop_signal).name}): finishing the "
                           "admitted requests; new ones get 503 with Retry-After")
            self._drain = asyncio.ensure_future(run_in_threadpool(self._batching.drain))
        if self._drain is not None and self._drain.done():
            self.should_exit = True
        return await super().on_tick(counter)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so --port 0 is known and no other process takes it meanwhile)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise UserError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}") from None
    return s


def weights_sha(path: str, runtime: str, onnx_precision: str) -> str | None:
    """sha256 over the weights files the server loads (each file's name, a NUL byte, its bytes; in name
    order): the safetensors files, or the ONNX graphs of the precision served. None when there are none."""
    folder = Path(path)
    if runtime == "onnx":
        from ..runtime.onnx_backend import find_export

        folder = find_export(folder)[0] / onnx_precision
        files = sorted(f for f in folder.glob("model.onnx*") if f.is_file())
    else:
        files = sorted(f for f in folder.glob("*.safetensors") if f.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def server_info(cfg: ServeConfig, server: BatchingServer, rule, source: str, device, version: str | None) -> dict:
    """GET /info: TEI's fields (model_id, model_sha, version, limits) and deebert's (exit rule, layers)."""
    ckpt = server.ckpt
    return {
        "model_id": str(cfg.checkpoint), "model_sha": weights_sha(cfg.checkpoint, cfg.runtime, cfg.onnx_precision),
        "model_type": {"classifier": {"id2label": dict(enumerate(ckpt.label_names))}}, "version": version,
        "max_concurrent_requests": cfg.max_concurrent_requests, "max_input_length": server.max_length,
        "max_batch_tokens": cfg.max_batch_tokens, "max_client_batch_size": cfg.max_client_batch_size,
        # rows of at most this many requests share a layer step (each request brings at least one row)
        "max_batch_requests": server.engine.batch_size if cfg.batching else 1,
        "auto_truncate": cfg.auto_truncate, "num_layers": server.num_layers, "task": ckpt.task,
        "exit_rule": rule.describe(), "exit_rule_source": source, "batching": cfg.batching,
        "rows_per_step": server.engine.batch_size, "max_lag": server.max_lag, "device": str(device),
        "runtime": cfg.runtime, "config": vars(cfg),
    }


def watch_parts(cfg: ServeConfig, ckpt) -> tuple:
    """(Watch or None, sampler or None, WatchLog or None) of ``cfg.watch_rate`` / ``cfg.watch_log``: the
    guarantee stored in ``ckpt`` watched on a sampled share of the requests; a state change is one log line."""
    if cfg.watch_rate <= 0:
        return None, None, None
    from ..model.guarantee import stored_guarantee
    from ..model.watch import Sampler, Watch
    from .context import LOG

    def changed(old: str, new: str, snap: dict) -> None:
        LOG.warning("watch: the stored guarantee %s -> %s after %d watched rows: disagreement %d/%d, bounds "
                    "[%.4f, %.4f], epsilon %s; %s", old, new, snap["n"], snap["disagreements"], snap["n"],
                    snap["lower"], snap["upper"], snap["epsilon"], snap["advice"])

    watch = Watch(stored_guarantee(ckpt.meta), cfg.watch_delta, cfg.watch_rate, on_change=changed,
                  window=cfg.watch_window)
    log = None
    if cfg.watch_log:
        from .watchlog import WatchLog

        data = ckpt.meta.get("data", {})
        log = WatchLog(cfg.watch_log, cfg.watch_log_lines, cfg.watch_log_files, data.get("text_column") or "text",
                       data.get("text_pair_column"))
    return watch, Sampler(cfg.watch_rate), log


def watch_line(cfg: ServeConfig, watch) -> str:
    """The startup line about watching."""
    if watch is None:
        return "watch: off (--watch-rate 0)"
    kept = f"; texts kept in {cfg.watch_log}/" if cfg.watch_log else ""
    return f"watch: {100 * cfg.watch_rate:g}% of requests also run to the last layer; {watch.test()}{kept}"


def serve(cfg: ServeConfig, announce=lambda message: None, version: str | None = None) -> None:
    """Load the model, start the worker and serve HTTP until SIGINT/SIGTERM (then drain and return;
    after SIGINT raise KeyboardInterrupt, once every admitted request is answered)."""
    sock = _listen(cfg.host, cfg.port)
    try:
        device = "cpu" if cfg.runtime == "onnx" else resolve_device(cfg.device)
        if cfg.runtime == "torch":
            check_precision(cfg.precision, device)
        ckpt = load_model(cfg.checkpoint, device, cfg.runtime, cfg.onnx_precision)
        rule, source = resolve_rule(ckpt, cfg.threshold, cfg.thresholds, cfg.entropy, policy=cfg.exit_policy,
                                    patience=cfg.patience, tolerance=cfg.tolerance)
        metrics = PrometheusObserver(ckpt.model.num_layers)
        watch, sampler, wlog = watch_parts(cfg, ckpt)
        server = BatchingServer(ckpt, rule, device, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens,
                                max_concurrent_requests=cfg.max_concurrent_requests, max_wait_ms=cfg.max_wait_ms,
                                batching=cfg.batching, max_length=cfg.max_length, precision=cfg.precision,
                                observer=metrics, max_lag=cfg.max_lag, watch=watch, sampler=sampler, watch_log=wlog)
        if watch is not None:
            metrics.watch_started(watch.snapshot())
        info = server_info(cfg, server, rule, source, device, version)
    except BaseException:
        sock.close()
        raise
    if cfg.max_length and server.max_length < cfg.max_length:
        announce(f"warning: --max-length {cfg.max_length} is more than this model takes ({server.max_length} tokens, "
                 f"its position embeddings); using {server.max_length}")
    announce(f"deebert serve: {rule.describe()} ({source}); {server.num_layers} layers; device {device}; "
             f"{'batching across requests' if cfg.batching else 'each request alone'}, up to "
             f"{server.engine.batch_size} rows per step")
    announce(watch_line(cfg, watch))
    host, port = sock.getsockname()[:2]  # the bound port: --port 0 names a free one
    listening = (f"listening on http://{f'[{host}]' if ':' in host else host}:{port} "
                 "(POST /predict, GET /, /health, /info, /metrics)")
    setup_logging(cfg.access_log)
    app = build_app(server.start(), cfg, info, metrics,
                    on_stop=lambda: announce("deebert serve: stopped (accepted requests finished)"))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    userver = DrainingServer(config, server, announce, on_started=lambda: announce(listening))
    userver.run(sockets=[sock])  # on SIGTERM/SIGINT: drain (port open, 503s), then uvicorn's shutdown
    server.drain()
    if wlog is not None:
        wlog.close()
    if userver.stop_signal == signal.SIGINT:
        raise KeyboardInterrupt  # Ctrl-C: the CLI's "interrupted" line and status 130; SIGTERM returns (0)
