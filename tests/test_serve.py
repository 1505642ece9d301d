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

    def __init__(self, ckpt: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "deebert_cli", "serve", "--checkpoint", ckpt, "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
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

    def metric(self, name: str) -> float:
        text = get(self.url + "/metrics")[1]
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else float("nan")


def get(url: str) -> tuple:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, r.read().decode()


def post(url: str, payload, raw: bytes | None = None) -> tuple:
    """-> (status, parsed JSON body or None, headers)."""
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url + "/predict", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body else None, e.headers


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
        ({"inputs": []}, None, 422),
        ({"inputs": [["a", "b", "c"]]}, None, 422),
        ({"inputs": ["good", 3]}, None, 422),
        ({"inputs": "   "}, None, 422),
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
    status, body, _ = post(server.url, {"inputs": long_text})  # truncated as predict does, and reported
    assert status == 200 and body[0]["truncated"] is True
    status, body, _ = post(server.url, {"inputs": "good great film", "raw_scores": True})
    assert status == 200 and len(body) == 2 and any(d["score"] < 0 or d["score"] > 1 for d in body)
    assert server.metric('deebert_requests_total{status="422"}') >= 10
    info = json.loads(get(server.url + "/info")[1])
    assert info["num_layers"] == 4 and info["model_type"]["classifier"]["id2label"] == {"0": "negative", "1": "positive"}
    assert get(server.url + "/health")[0] == 200


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


def test_sigterm_finishes_accepted_requests(trained_ckpt):
    s = ServerProcess(trained_ckpt, "--threshold", "0", "--no-batching", "--batch-size", "1",
                      "--max-client-batch-size", "512")
    texts = [" ".join(line.split() * 3) for line in mixed_lines(100, seed=12)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, s.url, {"inputs": texts}) for _ in range(4)]
        wait_for(lambda: s.metric("deebert_requests_in_progress") == 4)
        s.proc.send_signal(signal.SIGTERM)
        answers = [f.result(timeout=120) for f in futures]
    assert [a[0] for a in answers] == [200] * 4 and all(len(a[1]) == len(texts) for a in answers)
    assert s.proc.wait(60) in (0, -signal.SIGTERM)
    err = s.proc.stderr.read()
    assert "Traceback" not in err and "stopped (accepted requests finished)" in err


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
    naming the flag, never a traceback or a silently different setting (`batching: "no"` is truthy)."""
    import deebert_cli.core.serve.http as http

    def started(*a, **k):
        raise AssertionError("a server started with this config")

    monkeypatch.setattr(http, "serve", started)
    for text, flag in (('batching: "no"', "--batching"), ("host: 1234", "--host"), ('batch_size: "32"', "--batch-size"),
                       ("auto_truncate: 0", "--auto-truncate"), ("max_client_batch_size: 2.5", "--max-client-batch-size"),
                       ("max_lag: true", "--max-lag")):
        path = tmp_path / "serve.yaml"
        path.write_text(text + "\n")
        r = runner.invoke(app, ["serve", "--checkpoint", trained_ckpt, "--config", str(path), "--port", str(free_port())])
        assert r.exit_code == 2 and flag in r.output and "Traceback" not in r.output, (text, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
