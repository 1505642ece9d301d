"""`deebert serve`: the refill engine's idle hook, and a real server process spoken to over HTTP
(loopback only): equality with `deebert predict`, batching across requests, 4xx, 429, client
disconnects, SIGTERM drain, and the page in a real browser."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import RUNTIMES, load_runtime, mixed_lines
from test_predict import all_exit_entropies, spread_threshold

from deebert_cli.cli.app import app
from deebert_cli.core.model.checkpoint import load_checkpoint
from deebert_cli.core.runtime.engine import EarlyExitEngine
from deebert_cli.core.runtime.rules import ExitRule
from deebert_cli.core.runtime.stream import PredictStats, predict_stream

pytest.importorskip("starlette", reason="needs the serve extra: pip install 'deebert-cli[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'deebert-cli[serve]'")
pytest.importorskip("prometheus_client", reason="needs the serve extra: pip install 'deebert-cli[serve]'")

runner = CliRunner()


# ------------------------------------------------------------------------------------------------
# the serving core without HTTP
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batching, max_lag", [(True, None), (True, 1), (False, None)])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_server_core_equals_predict_on_every_runtime(trained_ckpt, runtime, batching, max_lag, request):
    """BatchingServer answers as predict does, batching across requests (rows waiting their default
    lag, or moved on as soon as one newer row passes them) or each request alone."""
    from deebert_cli.core.serve.batching import BatchingServer

    ckpt = load_runtime(runtime, request)
    lines = mixed_lines(60, seed=5)
    rule = ExitRule([spread_threshold(all_exit_entropies(load_checkpoint(trained_ckpt), lines))] * ckpt.model.num_layers)
    want = list(predict_stream(ckpt, iter(lines), rule, "cpu", batch_size=1, window=1))
    srv = BatchingServer(ckpt, rule, "cpu", batch_size=4, batching=batching, max_lag=max_lag).start()
    try:
        reqs = [srv.submit(lines[k : k + 3]) for k in range(0, len(lines), 3)]
        got = [s.prediction for r in reqs for s in r.future.result(timeout=60)]
    finally:
        assert srv.drain(30)
    assert [(g.label, g.exit_layer) for g in got] == [(w.label, w.exit_layer) for w in want]
    assert max(abs(g.confidence - w.confidence) for g, w in zip(got, want)) < 1e-4


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_server_core_truncates_on_either_side(trained_ckpt, runtime, request):
    """direction "left" keeps a long text's end, special tokens kept (transformers' tokenizer on torch,
    the tokenizers library on onnx): it answers as the text's last max_length - 2 tokens would."""
    from deebert_cli.core.serve.batching import BatchingServer, InputError

    ckpt = load_runtime(runtime, request)
    rule = ExitRule([0.3] * ckpt.model.num_layers)
    srv = BatchingServer(ckpt, rule, "cpu", batch_size=4).start()
    try:
        long_text = "bad " * 200 + "good " * 126  # one token a word; max_length 128 = [CLS] + 126 + [SEP]
        got = {d: srv.submit([long_text], direction=d).future.result(timeout=60)[0] for d in ("left", "right", None)}
        end, start = (srv.submit([t]).future.result(timeout=60)[0] for t in ("good " * 126, "bad " * 126))
        with pytest.raises(InputError, match="left"):
            srv.submit([long_text], direction="up")
    finally:
        assert srv.drain(30)
    assert all(s.truncated for s in got.values()) and not end.truncated
    assert got["left"].logits == end.logits and got["right"].logits == got[None].logits == start.logits
    assert end.logits != start.logits


# ------------------------------------------------------------------------------------------------
# the engine hook: rows may yield None ("no new input right now")
# ------------------------------------------------------------------------------------------------
def test_refill_advances_part_full_batches_when_input_pauses(trained_ckpt):
    ckpt = load_checkpoint(trained_ckpt)
    L = ckpt.model.num_layers
    lines = mixed_lines(60, seed=3)
    rule = ExitRule([spread_threshold(all_exit_entropies(ckpt, lines))] * L)
    want = list(predict_stream(ckpt, iter(lines), rule, "cpu", batch_size=1, window=1))
    ids = ckpt.tokenizer(lines, truncation=True, max_length=128)
    eng = EarlyExitEngine(ckpt, rule, "cpu", batch_size=8)
    done: dict = {}

    def rows():
        """Groups of 1..5 rows, each followed by Nones until that group is finished: the engine must
        finish them without new input (a part-full batch), never wait for more."""
        k = 0
        while k < len(lines):
            group = list(range(k, min(len(lines), k + 1 + k % 5)))
            for j in group:
                yield j, ids["input_ids"][j], ids["token_type_ids"][j]
            waits = 0
            while not all(j in done for j in group):
                waits += 1
                assert waits <= 4 * L, "the engine did not advance in-flight rows on None"
                yield None
            k = group[-1] + 1

    for key, layer, logits, ent in eng.run_refill(rows()):
        done[key] = (layer, logits, ent)
    assert sorted(done) == list(range(len(lines)))
    for r in want:
        layer, logits, ent = done[r.index]
        assert layer + 1 == r.exit_layer and int(logits.argmax()) == r.label
        assert abs(float(ent) - r.entropy) < 1e-4


# ------------------------------------------------------------------------------------------------
# a real server process
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`deebert serve` in a subprocess on a free loopback port."""

    def __init__(self, ckpt: str, *args: str, port: int | None = None):
        self.port = free_port() if port is None else port
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "deebert_cli", "serve", "--checkpoint", ckpt, "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        # stderr is read as it comes (the access log would otherwise fill the pipe and block the server)
        self.lines: list = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise RuntimeError(f"server exited: {self.stderr()}")
            if self.port == 0:  # --port 0: the port the server announces
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.stderr())
                if not m:
                    time.sleep(0.2)
                    continue
                self.port = int(m.group(1))
            self.url = f"http://127.0.0.1:{self.port}"
            try:
                if get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not come up in 120 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stderr(self) -> str:
        return "".join(list(self.lines))

    def wait(self, timeout: float) -> int:
        """The exit status once the process has ended (its stderr read to the end)."""
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def metric(self, name: str) -> float:
        text = get(self.url + "/metrics")[1]
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else float("nan")


def get(url: str) -> tuple:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, r.read().decode()


def post(url: str, payload, raw: bytes | None = None, headers: dict | None = None) -> tuple:
    """-> (status, parsed JSON body or None, headers)."""
    data = raw if raw is not None else json.dumps(payload).encode()
    return call(url, "POST", "/predict", data, headers)


def call(url: str, method: str, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple:
    """Any request -> (status, the body as JSON, else its text, else None; headers)."""
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, body, hdrs = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, body, hdrs = e.code, e.read(), e.headers
    try:
        return status, json.loads(body) if body else None, hdrs
    except ValueError:
        return status, body.decode(errors="replace"), hdrs


@pytest.fixture(scope="module")
def threshold(trained_ckpt) -> float:
    ckpt = load_checkpoint(trained_ckpt)
    return spread_threshold(all_exit_entropies(ckpt, mixed_lines(240)))


@pytest.fixture(scope="module")
def server(trained_ckpt, threshold):
    # --max-wait-ms: rows that arrive together wait a little for company, so steps really mix requests
    s = ServerProcess(trained_ckpt, "--threshold", str(threshold), "--max-wait-ms", "20", "--batch-size", "16")
    yield s
    s.stop()


def test_results_equal_predict_over_many_concurrent_requests(server, trained_ckpt, threshold):
    lines = mixed_lines(240)
    r = runner.invoke(app, ["predict", "--checkpoint", trained_ckpt, "--device", "cpu", "--threshold", str(threshold),
                            "--format", "jsonl", "--all-probs", "--no-summary"], input="\n".join(lines) + "\n")
    assert r.exit_code == 0, r.output
    want = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(want) == len(lines) and len({w["exit_layer"] for w in want}) >= 3
    chunks, k = [], 0
    while k < len(lines):  # requests of 1..8 texts; a single string for some of the 1-text ones
        n = 1 + (k * 7) % 8
        chunks.append((k, lines[k : k + n]))
        k += n
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda c: post(server.url, {"inputs": c[1][0] if len(c[1]) == 1 and c[0] % 2 else c[1]}), chunks))
    got = []
    for (start, texts), (status, body, _) in zip(chunks, answers):
        assert status == 200, body
        got += [body] if isinstance(body[0], dict) else body
    assert len(got) == len(want)
    for g, w in zip(got, want):
        best = g[0]
        assert (best["label"], best["exit_layer"]) == (w["label"], w["exit_layer"])
        assert abs(best["score"] - w["confidence"]) < 1e-4 and abs(best["entropy"] - w["entropy"]) < 1e-4
        scores = {d["label"]: d["score"] for d in g}  # every label, each within the same 1e-4 as above
        assert scores.keys() == w["probs"].keys() and all(abs(scores[k] - v) < 1e-4 for k, v in w["probs"].items())
        assert [d["score"] for d in g] == sorted((d["score"] for d in g), reverse=True)
    # rows of different requests shared layer steps: requests hold at most 8 texts
    text = get(server.url + "/metrics")[1]
    le8 = float(re.search(r'^deebert_batch_size_bucket\{le="8.0"\} (\S+)$', text, re.M).group(1))
    total = float(re.search(r"^deebert_batch_size_count (\S+)$", text, re.M).group(1))
    assert total > le8, "no layer step ever held more rows than one request has"
    assert server.metric("deebert_examples_total") >= len(lines)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    long_text = " ".join(["good"] * 400)
    cases = [
        (None, b"{not json", 422),
        ({"text": "no inputs key"}, None, 422),
        ({"inputs": 42}, None, 422),
        ({"inputs": [["a", "b", "c"]]}, None, 422),
        ({"inputs": ["good", 3]}, None, 422),
        ({"inputs": [["good film", "a pair"]]}, None, 422),  # pair on a single-text checkpoint
        ({"inputs": "good", "threshold": 0.99}, None, 422),  # the exit rule is the server's
        ({"inputs": "good", "truncate": "yes"}, None, 422),
        ({"inputs": ["good"] * 33}, None, 413),  # --max-client-batch-size 32
        ({"inputs": "good " * 5000}, None, 413),  # --max-input-bytes 16384
        ({"inputs": long_text, "truncate": False}, None, 413),
    ]
    for payload, raw, code in cases:
        status, body, _ = post(server.url, payload, raw)
        assert status == code, (payload, raw, status, body)
        assert set(body) == {"error", "error_type"} and body["error"], body
    for payload in ({"inputs": ""}, {"inputs": "   "}, {"inputs": []}, {"inputs": ["good", ""]}):
        status, body, _ = post(server.url, payload)  # TEI: an empty input is 400, error_type "empty"
        assert (status, body["error_type"]) == (400, "empty"), (payload, status, body)
    status, body, _ = post(server.url, {"inputs": long_text})  # truncated as predict does, and reported
    assert status == 200 and body[0]["truncated"] is True
    status, body, _ = post(server.url, {"inputs": "good great film", "raw_scores": True})
    assert status == 200 and len(body) == 2 and any(d["score"] < 0 or d["score"] > 1 for d in body)
    assert server.metric('deebert_requests_total{status="422"}') >= 8
    info = json.loads(get(server.url + "/info")[1])
    assert info["num_layers"] == 4 and info["model_type"]["classifier"]["id2label"] == {"0": "negative", "1": "positive"}
    assert get(server.url + "/health")[0] == 200


def raw_exchange(port: int, head: bytes, body: bytes = b"", hang_up: bool = False, timeout: float = 30) -> bytes:
    """Send a hand-made request (loopback); -> the raw answer, or b"" when ``hang_up`` closes it unanswered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        if hang_up:
            return b""
        out = b""
        while True:  # until the answer's head and its Content-Length of body are in (or the server closes)
            end = out.find(b"\r\n\r\n")
            size = re.search(rb"(?i)\r\ncontent-length: *(\d+)", out[:end]) if end >= 0 else None
            if size and len(out) >= end + 4 + int(size.group(1)):
                return out
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_hostile_requests_get_4xx_json_never_a_500(server):
    """Every malformed body, field, type, size, encoding, header, path or method: a 4xx with TEI's JSON
    error body, counted by status in the metrics; the server logs no traceback and keeps serving."""
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # 200 KB, valid JSON, 100,000 deep
    max_body = 32 * (6 * 16384 + 16) + 4096
    J = {"Content-Type": "application/json"}
    cases = [  # (method, path, body, headers, status, error_type)
        ("POST", "/predict", b'{"inputs": "x\\ud800"}', J, 422, "validation"),  # a lone surrogate
        ("POST", "/predict", b'{"inputs": ["good", "\\udfff"]}', J, 422, "validation"),
        ("POST", "/predict", deep, J, 422, "validation"),
        ("POST", "/predict", b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": "good", "extra": NaN}', J, 422, "validation"),  # not JSON
        ("POST", "/predict", b'{"inputs": "good"} trailing', J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": "\xff\xfe good"}', J, 422, "validation"),  # not UTF-8
        ("POST", "/predict", b"", J, 422, "validation"),
        ("POST", "/predict", b'"good"', J, 422, "validation"),
        ("POST", "/predict", b"null", J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": {"text": "good"}}', J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": [[["good"]]]}', J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": [[]]}', J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": "good", "threshold": 1' + b"0" * 5000 + b"}", J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": "good", "threshold": "0.3"}', J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": "good", "truncate": 1}', J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": "good", "raw_scores": null}', J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": "good", "truncation_direction": "sideways"}', J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": "good", "truncation_direction": null}', J, 422, "validation"),
        ("POST", "/predict", b'{"inputs": "good", "truncation_direction": "\\ud800"}', J, 422, "validation"),
        ("POST", "/predict", b" " * (max_body + 1), J, 413, "validation"),
        ("POST", "/predict", b'{"inputs": "good"}', {**J, "X-Request-Id": "two words"}, 400, "validation"),
        ("POST", "/predict", b'{"inputs": "good"}', {**J, "X-Request-Id": "x" * 300}, 400, "validation"),
        ("GET", "/nope", None, {}, 404, "not_found"),
        ("POST", "/predict/../info", b"{}", J, 404, "not_found"),
        ("GET", "/predict", None, {}, 405, "method_not_allowed"),
        ("DELETE", "/health", None, {}, 405, "method_not_allowed"),
        ("POST", "/info", b"{}", J, 405, "method_not_allowed"),
    ]
    for method, path, body, headers, code, kind in cases:
        status, answer, hdrs = call(server.url, method, path, body, headers)
        shown = (method, path, (body or b"")[:60], status, answer)
        assert status == code, shown
        assert isinstance(answer, dict) and set(answer) == {"error", "error_type"} and answer["error"], shown
        assert answer["error_type"] == kind, shown
        assert hdrs.get("x-request-id"), shown
    status, _, hdrs = call(server.url, "GET", "/predict")
    assert status == 405 and "POST" in hdrs["Allow"]
    # a body announced far over the limit is refused at once, without reading it
    answer = raw_exchange(server.port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 1000000000\r\n\r\n", timeout=20)
    assert answer.startswith(b"HTTP/1.1 413") and b'"error_type":"validation"' in answer, answer[:300]
    # a client that hangs up halfway through its body: nothing to answer, nothing to log as an error
    raw_exchange(server.port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 1000\r\n\r\n", b'{"inputs": "go', hang_up=True)
    # counted by status, on every path
    wait_for(lambda: server.metric('deebert_http_responses_total{path="unmatched",status="404"}') >= 2)
    assert server.metric('deebert_http_responses_total{path="/predict",status="405"}') >= 2
    assert server.metric('deebert_http_responses_total{path="/health",status="405"}') >= 1
    assert server.metric('deebert_requests_total{status="413"}') >= 2
    assert server.metric('deebert_requests_total{status="400"}') >= 2
    assert post(server.url, {"inputs": "good"})[0] == 200 and get(server.url + "/health")[0] == 200
    log = server.stderr()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def test_an_unexpected_error_is_a_counted_json_500_logged_with_its_request_id(caplog):
    """A bug in a route: TEI's JSON error body (not Starlette's text), counted under 500, and one error
    log carrying the request id and the traceback (not uvicorn's anonymous one)."""
    pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from deebert_cli.core.serve.context import make_app
    from deebert_cli.core.serve.metrics import PrometheusObserver

    async def boom(request):
        raise RuntimeError("a bug")

    metrics = PrometheusObserver(4)
    client = TestClient(make_app([Route("/predict", boom, methods=["POST"])], metrics), raise_server_exceptions=False)
    with caplog.at_level("INFO", logger="deebert.serve"):
        r = client.post("/predict", json={"inputs": "good"}, headers={"X-Request-Id": "req-42"})
    assert r.status_code == 500 and r.json()["error_type"] == "backend" and "req-42" in r.json()["error"]
    assert r.headers["x-request-id"] == "req-42"
    assert metrics.registry.get_sample_value("deebert_requests_total", {"status": "500"}) == 1
    assert metrics.registry.get_sample_value("deebert_http_responses_total", {"path": "/predict", "status": "500"}) == 1
    errors = [rec for rec in caplog.records if rec.levelname == "ERROR"]
    assert len(errors) == 1 and "req-42" in caplog.text and "RuntimeError: a bug" in caplog.text


def test_truncation_direction_left_keeps_the_end(server):
    """TEI's `truncation_direction`: "left" keeps a long text's end (special tokens kept), "right" (the
    default) its start; TEI's spellings Left/Right too."""
    long_text = "bad " * 200 + "good " * 126  # one token a word; max_length 128 = [CLS] + 126 + [SEP]
    ref_end = post(server.url, {"inputs": "good " * 126})[1]
    ref_start = post(server.url, {"inputs": "bad " * 126})[1]
    assert ref_end[0]["truncated"] is False and ref_end != ref_start

    def strip(answer):
        return [{k: v for k, v in d.items() if k != "truncated"} for d in answer]

    for direction, want in (("left", ref_end), ("Left", ref_end), ("right", ref_start), ("Right", ref_start), (None, ref_start)):
        payload = {"inputs": long_text} if direction is None else {"inputs": long_text, "truncation_direction": direction}
        status, body, _ = post(server.url, payload)
        assert status == 200 and body[0]["truncated"] is True, (direction, body)
        assert strip(body) == strip(want), direction
    status, body, _ = post(server.url, {"inputs": long_text, "truncation_direction": "sideways"})
    assert status == 422 and "truncation_direction" in body["error"]


def test_tei_response_headers_request_id_and_access_log(server):
    status, _, h = post(server.url, {"inputs": ["good", "a bad film"]}, headers={"X-Request-Id": "abc-123"})
    assert status == 200 and h["x-request-id"] == "abc-123"
    times = {k: int(h[f"x-{k}-time"]) for k in ("total", "tokenization", "queue", "inference")}  # TEI: whole ms
    assert all(v >= 0 for v in times.values()) and times["total"] >= max(times.values()), times
    assert int(h["x-compute-tokens"]) > 4 and int(h["x-compute-characters"]) == len("good") + len("a bad film")
    ids = {post(server.url, {"inputs": "good"})[2]["x-request-id"] for _ in range(2)}  # made up when absent
    assert len(ids) == 2 and all(ids)
    status, _, h = post(server.url, {"inputs": 3}, headers={"X-Request-Id": "bad-req-7"})
    assert status == 422 and h["x-request-id"] == "bad-req-7" and "x-total-time" not in h
    wait_for(lambda: "bad-req-7" in server.stderr())
    lines = server.stderr().splitlines()
    assert any("abc-123" in x and '"POST /predict HTTP/1.1" 200' in x for x in lines), lines[-5:]
    assert any("bad-req-7" in x and '"POST /predict HTTP/1.1" 422' in x for x in lines), lines[-5:]
    assert all(x in server.stderr() for x in ids)


def test_info_has_tei_fields(server, trained_ckpt):
    import hashlib

    import deebert_cli

    info = json.loads(get(server.url + "/info")[1])
    assert info["version"] == deebert_cli.__version__
    assert info["max_batch_requests"] == info["rows_per_step"] == 16  # --batch-size 16: rows of at most 16 requests
    h = hashlib.sha256()
    for name in ("highway.safetensors", "model.safetensors"):
        h.update(name.encode() + b"\0" + (Path(trained_ckpt) / name).read_bytes())
    assert info["model_sha"] == h.hexdigest()


def test_model_sha_hashes_the_weights_served(trained_ckpt, exported_ckpt):
    """/info's model_sha: the safetensors on torch, the graphs of the precision served on onnx."""
    from deebert_cli.core.serve.http import weights_sha

    torch_sha = weights_sha(trained_ckpt, "torch", "fp32")
    fp32, int8 = (weights_sha(exported_ckpt, "onnx", p) for p in ("fp32", "int8"))
    assert len({torch_sha, fp32, int8}) == 3 and all(re.fullmatch("[0-9a-f]{64}", x) for x in (torch_sha, fp32, int8))
    assert weights_sha(exported_ckpt, "torch", "fp32") == torch_sha  # the same weights, copied
    assert weights_sha(str(Path(trained_ckpt).parent), "torch", "fp32") is None  # no weights files there

def test_a_tei_client_works_unchanged(server, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # loopback only: the test server
    out = hub.InferenceClient(server.url).text_classification("a good great superb film")
    status, want, _ = post(server.url, {"inputs": "a good great superb film"})
    # huggingface_hub reads a single input's answer as the HF API's [[...]] and keeps element [0]: on a
    # TEI endpoint (and this one, same shape) that is the best label, with deebert's fields as attributes
    assert (out.label, round(out.score, 5), out.exit_layer) == (want[0]["label"], round(want[0]["score"], 5), want[0]["exit_layer"])


def test_full_queue_gets_429_and_a_disconnected_client_is_dropped(trained_ckpt):
    s = ServerProcess(trained_ckpt, "--threshold", "0", "--no-batching", "--batch-size", "1",
                      "--max-concurrent-requests", "2", "--max-client-batch-size", "512")
    try:
        big = [" ".join(line.split() * 3) for line in mixed_lines(300, seed=11)]
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, s.url, {"inputs": big})
            wait_for(lambda: s.metric("deebert_requests_in_progress") == 1)
            # a second big request whose client hangs up while it waits in the queue
            sock = socket.create_connection(("127.0.0.1", s.port))
            body = json.dumps({"inputs": big}).encode()
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(lambda: s.metric("deebert_requests_in_progress") == 2)
            status, err, headers = post(s.url, {"inputs": "good"})
            assert status == 429 and err["error_type"] == "overloaded" and int(headers["Retry-After"]) >= 1
            assert first.running(), "the first request finished too early for this test to mean anything"
            sock.close()
            status, body, _ = first.result(timeout=120)
        assert status == 200 and len(body) == len(big)
        wait_for(lambda: s.metric("deebert_requests_in_progress") == 0)
        assert s.metric("deebert_examples_total") == len(big), "the disconnected request's rows ran"
        assert post(s.url, {"inputs": "good"})[0] == 200
    finally:
        s.stop()


def test_sigterm_drains_with_the_listener_open_then_exits_0(trained_ckpt):
    """SIGTERM: accepted requests finish; meanwhile the port still answers, new requests and /health get
    503 with Retry-After (a load balancer takes the server out); then exit status 0 (a clean stop)."""
    s = ServerProcess(trained_ckpt, "--threshold", "0", "--no-batching", "--batch-size", "1",
                      "--max-client-batch-size", "512")
    texts = [" ".join(line.split() * 3) for line in mixed_lines(200, seed=12)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, s.url, {"inputs": texts}) for _ in range(4)]
        wait_for(lambda: s.metric("deebert_requests_in_progress") == 4)
        s.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: call(s.url, "GET", "/health")[0] == 503, timeout=10)
        status, body, headers = post(s.url, {"inputs": "good"})
        assert not all(f.done() for f in futures), "the accepted requests finished too early for this test"
        assert status == 503 and body["error_type"] == "unhealthy" and int(headers["Retry-After"]) >= 1
        answers = [f.result(timeout=120) for f in futures]
    assert [a[0] for a in answers] == [200] * 4 and all(len(a[1]) == len(texts) for a in answers)
    assert s.wait(60) == 0
    err = s.stderr()
    assert "Traceback" not in err and "draining" in err and "stopped (accepted requests finished)" in err


def test_port_0_and_a_max_length_past_the_model(trained_ckpt):
    """--port 0 announces the port it got; --max-length past the position embeddings is capped with a
    warning (as predict does), so a long input cannot break the worker."""
    s = ServerProcess(trained_ckpt, "--max-length", "100000", port=0)
    try:
        assert s.port != 0 and "warning: --max-length 100000" in s.stderr()
        info = json.loads(get(s.url + "/info")[1])
        limit = info["max_input_length"]
        assert limit == load_checkpoint(trained_ckpt).model.max_tokens
        status, body, _ = post(s.url, {"inputs": "good " * 600})
        assert status == 200 and body[0]["truncated"] is True
        assert post(s.url, {"inputs": "good " * 600, "truncate": False})[0] == 413
    finally:
        s.stop()


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------
# the page, in a real browser
# ------------------------------------------------------------------------------------------------
def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_the_page_is_served_at_the_root(server):
    """GET / answers the page shipped beside the HTTP app (package data: core/serve/page.html)."""
    status, html = get(server.url + "/")
    assert status == 200 and 'id="text"' in html and 'id="submit"' in html


def test_page_in_a_real_browser(server):
    browser_path = find_browser()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install 'deebert-cli[test]')")
    text = "a good great superb film"
    status, want, _ = post(server.url, {"inputs": text})
    assert status == 200
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#text", text)
            page.click("#submit")
            page.wait_for_selector("#result:not([hidden])", timeout=30000)
            assert page.inner_text("#label") == want[0]["label"]
            assert page.inner_text("#confidence") == f"{want[0]['score']:.4f}"
            assert page.inner_text("#exit-layer") == f"{want[0]['exit_layer']} of 4"
            page.fill("#text", "")
            page.click("#submit")
            page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30000)
            assert "empty" in page.inner_text("#error")
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------------
# CLI errors (no server process)
# ------------------------------------------------------------------------------------------------
def test_missing_extra_is_one_line_naming_the_pip_command(trained_ckpt, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    r = runner.invoke(app, ["serve", "--checkpoint", trained_ckpt, "--port", str(free_port())])
    assert r.exit_code == 2
    assert "pip install 'deebert-cli[serve]'" in r.output and "Traceback" not in r.output


def test_port_in_use_and_bad_options_are_user_errors(trained_ckpt):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = runner.invoke(app, ["serve", "--checkpoint", trained_ckpt, "--port", str(busy.getsockname()[1])])
        assert r.exit_code == 2 and "--port" in r.output
    r = runner.invoke(app, ["serve", "--checkpoint", trained_ckpt, "--max-concurrent-requests", "0"])
    assert r.exit_code == 2 and "--max-concurrent-requests" in r.output
    r = runner.invoke(app, ["serve", "--checkpoint", trained_ckpt, "--max-lag", "0"])
    assert r.exit_code == 2 and "--max-lag" in r.output and len(r.output.strip().splitlines()) == 1
    # --runtime onnx reaches the onnx loader: a checkpoint without an export names `deebert export`
    pytest.importorskip("onnxruntime", reason="the onnx runtime needs pip install 'deebert-cli[onnx]'")
    r = runner.invoke(app, ["serve", "--checkpoint", trained_ckpt, "--runtime", "onnx", "--port", "0"])
    assert r.exit_code == 2 and "deebert export" in r.output


def test_config_file_values_of_the_wrong_type_are_one_line(trained_ckpt, tmp_path, monkeypatch):
    """A --config file can hold a string, a list or a boolean where a number or a flag is meant: one line
    naming the flag, never a traceback or a silently different setting (`batching: "no"` is truthy). Text
    that reads as the number meant ('"32"') is taken as that number, as every command's --config does."""
    import deebert_cli.core.serve.http as http

    def started(*a, **k):
        raise AssertionError("a server started with this config")

    monkeypatch.setattr(http, "serve", started)
    for text, flag in (('batching: "no"', "--batching"), ("host: 1234", "--host"), ('batch_size: "many"', "--batch-size"),
                       ("auto_truncate: 0", "--auto-truncate"), ("max_client_batch_size: 2.5", "--max-client-batch-size"),
                       ("max_lag: true", "--max-lag"), ("access_log: maybe", "--access-log")):
        path = tmp_path / "serve.yaml"
        path.write_text(text + "\n")
        r = runner.invoke(app, ["serve", "--checkpoint", trained_ckpt, "--config", str(path), "--port", str(free_port())])
        assert r.exit_code == 2 and flag in r.output and "Traceback" not in r.output, (text, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
