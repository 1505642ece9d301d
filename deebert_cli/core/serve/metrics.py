"""The Prometheus metrics of `deebert serve` (the `[serve]` extra): the worker's hooks, and every HTTP
response counted by status (:mod:`.context` counts them)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

from ..model.watch import STATES
from .batching import Observer


class PrometheusObserver(Observer):
    """The worker's hooks as Prometheus metrics, in a registry of their own."""

    def __init__(self, num_layers: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("deebert_requests", "HTTP /predict requests by status code (every answer, errors too)",
                                ["status"], registry=r)
        self.responses = Counter("deebert_http_responses", "HTTP responses by route (unknown paths: unmatched) and "
                                 "status code", ["path", "status"], registry=r)
        self.examples = Counter("deebert_examples", "Inputs predicted", registry=r)
        self.exit_layer = Histogram("deebert_exit_layer", "Exit layer (1-based) of each input",
                                    buckets=list(range(1, num_layers + 1)), registry=r)
        self.latency = Histogram("deebert_request_duration_seconds", "Time from admission to result",
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.batch = Histogram("deebert_batch_size", "Rows per layer step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue = Gauge("deebert_queue_rows", "Rows waiting to enter the model", registry=r)
        self.in_progress = Gauge("deebert_requests_in_progress", "Requests admitted and not finished", registry=r)
        # the watch (--watch-rate): sampled rows also run to the last layer, and the verdict on the guarantee
        self.watch_rows = Counter("deebert_watch_rows", "Watched rows (also run to the last layer)", registry=r)
        self.watch_disagreements = Counter("deebert_watch_disagreements",
                                           "Watched rows whose exit's answer differed from the last layer's", registry=r)
        self.watch_rate = Gauge("deebert_watch_disagreement_rate", "Disagreement of the watched rows", registry=r)
        self.watch_lower = Gauge("deebert_watch_lower_bound", "Lower bound of the disagreement rate (anytime-valid)",
                                 registry=r)
        self.watch_upper = Gauge("deebert_watch_upper_bound", "Upper bound of the disagreement rate (anytime-valid)",
                                 registry=r)
        self.watch_window_lower = Gauge("deebert_watch_window_lower_bound", "Lower bound of the disagreement rate "
                                        "over the current window block (anytime-valid, restarted)", registry=r)
        self.watch_window_upper = Gauge("deebert_watch_window_upper_bound", "Upper bound of the disagreement rate "
                                        "over the current window block (anytime-valid, restarted)", registry=r)
        self.watch_epsilon = Gauge("deebert_watch_epsilon", "The stored guarantee's budget (NaN: none)", registry=r)
        self.watch_state = Enum("deebert_watch_state", "The stored guarantee on the watched traffic",
                                states=list(STATES), registry=r)

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

    def watch_started(self, snapshot: dict) -> None:
        """The watch's first state and budget, before any row is watched."""
        eps = snapshot["epsilon"]
        self.watch_epsilon.set(float("nan") if eps is None else eps)
        self.watch_state.state(snapshot["state"])
        self.watch_lower.set(snapshot["lower"])
        self.watch_upper.set(snapshot["upper"])
        window = snapshot.get("window") or {}
        self.watch_window_lower.set(window.get("lower", 0.0) if window.get("n") else 0.0)
        self.watch_window_upper.set(window.get("upper", 1.0) if window.get("n") else 1.0)

    def watched(self, disagreed: bool, snapshot: dict) -> None:
        self.watch_rows.inc()
        if disagreed:
            self.watch_disagreements.inc()
        self.watch_rate.set(snapshot["disagreement"])
        self.watch_lower.set(snapshot["lower"])
        self.watch_upper.set(snapshot["upper"])
        window = snapshot.get("window") or {}
        self.watch_window_lower.set(window.get("lower", 0.0) if window.get("n") else 0.0)
        self.watch_window_upper.set(window.get("upper", 1.0) if window.get("n") else 1.0)
        self.watch_state.state(snapshot["state"])

    def response(self, path: str, status: int, predict: bool) -> None:
        """One HTTP response: ``path`` a route's path or "unmatched"; ``predict``: it answered a prediction
        request (``POST /predict`` or ``POST /``)."""
        self.responses.labels(path, str(status)).inc()
        if predict:
            self.requests.labels(str(status)).inc()
