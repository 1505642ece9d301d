"""Watching the stored guarantee on live traffic: the confidence sequence, the state machine, the shadow
rows of the engines and of the server, the watch log, and the server's /info and /metrics."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from conftest import RUNTIMES, load_runtime, mixed_lines
from deebert_cli.core.model.guarantee import Guarantee
from deebert_cli.core.model.watch import BettingCS, Sampler, Watch, kl_upper_bound, verdict_line
from deebert_cli.core.runtime.engine import EarlyExitEngine
from deebert_cli.core.runtime.rules import ExitRule


def guarantee(risk="disagreement", epsilon=0.05, delta=0.05, n=1000, rate=None) -> Guarantee:
    return Guarantee(risk, epsilon, delta, n, "entropy", 0.3, 0, 0.0, 0.01, 3.0, 0.25, 10, disagreement_rate=rate)


# ------------------------------------------------------------------------------------------------
# the confidence sequence
# ------------------------------------------------------------------------------------------------
def test_all_zeros_shrink_the_upper_bound_like_log_one_over_delta_over_n():
    """No disagreement in n rows: the upper bound lies between the exact one-shot bound (Clopper-Pearson,
    1 - delta^(1/n): no valid bound is below it) and 2 log(2/delta) / n (the betting sequence's rate)."""
    cs = BettingCS(0.05)
    uppers = []
    for t in range(1, 2001):
        cs.update(0)
        if t in (100, 500, 1000, 2000):
            lo, up = cs.bounds()
            assert lo == 0.0
            assert 1 - 0.05 ** (1 / t) <= up <= 2 * math.log(2 / 0.05) / t * 1.05
            uppers.append(up)
    assert uppers == sorted(uppers, reverse=True)


def test_the_bounds_cover_the_rate_at_every_time_in_simulation():
    """Anytime coverage: over 150 seeded streams of 200 bits the rate leaves [lower, upper] at some time in
    at most alpha of them (alpha 0.1 so that failures would show)."""
    rng = np.random.default_rng(7)
    misses = 0
    for _ in range(150):
        p = rng.uniform(0.01, 0.3)
        cs = BettingCS(0.1)
        for x in rng.random(200) < p:
            cs.update(x)
            lo, up = cs.bounds()
            if not lo <= p <= up:
                misses += 1
                break
    assert misses <= 0.1 * 150


def test_more_disagreements_move_both_bounds_up():
    rng = np.random.default_rng(3)
    order = rng.permutation(400)
    last = (-1.0, -1.0)
    for k in (0, 10, 40, 120, 400):
        bits = np.zeros(400)
        bits[order[:k]] = 1
        cs = BettingCS(0.05)
        for x in bits:
            cs.update(x)
        lo, up = cs.bounds()
        assert lo <= k / 400 <= up
        assert lo >= last[0] and up >= last[1]
        last = (lo, up)


def test_kl_bound_of_zero_losses_is_the_exact_one():
    assert kl_upper_bound(0, 1000, 0.05) == pytest.approx(1 - 0.05 ** (1 / 1000), rel=1e-6)
    assert kl_upper_bound(20, 1000, 0.05) > 0.02 and kl_upper_bound(20, 4000, 0.05) < kl_upper_bound(20, 1000, 0.05) + 1


# ------------------------------------------------------------------------------------------------
# the state machine
# ------------------------------------------------------------------------------------------------
def test_a_disagreement_guarantee_holds_on_agreement_and_is_exceeded_on_disagreement():
    changes = []
    w = Watch(guarantee(epsilon=0.05), on_change=lambda old, new, snap: changes.append((old, new, snap["n"])))
    assert w.state == "inconclusive"
    for _ in range(300):
        w.record(False)
    assert w.state == "holds" and changes[0][:2] == ("inconclusive", "holds")
    w2 = Watch(guarantee(epsilon=0.05))
    for k in range(200):
        w2.record(k % 3 == 0)  # a third disagree: far over 5%
    s = w2.snapshot()
    assert s["state"] == "exceeded" and s["lower"] > 0.05 and "deebert calibrate" in s["advice"]
    assert s["n"] == 200 and s["disagreements"] == 67 and "disagreement guarantee" in s["test"]
    assert "exceeded" in verdict_line(s)


def test_an_accuracy_drop_guarantee_watches_drift_from_the_calibration_rate():
    g = guarantee("accuracy_drop", epsilon=0.02, rate=0.05, n=2000)
    w = Watch(g)
    # delta/2 to the calibration bound; of the other delta/2, half to the cumulative sequence, half to the blocks
    assert w.alpha == pytest.approx(0.0125) and w.window_alpha == pytest.approx(0.0125) and 0.05 < w.drift_bound < 0.07
    assert Watch(g, window=0).alpha == pytest.approx(0.025)
    for k in range(300):
        w.record(k % 4 == 0)  # 25% disagree: far above the 5% measured at calibration
    assert w.state == "exceeded" and "drift" in w.test()
    # 5% as at calibration: no alarm, and disagreement above epsilon cannot say "holds"
    w = Watch(g)
    for k in range(600):
        w.record(k % 20 == 0)
    assert w.state == "inconclusive"
    # no calibration rate stored: no drift test, never exceeded
    w = Watch(guarantee("accuracy_drop", epsilon=0.02))
    for k in range(300):
        w.record(k % 2 == 0)
    assert w.state == "inconclusive" and "no drift test" in w.test()


# ------------------------------------------------------------------------------------------------
# the windowed sequence: bounded detection, still valid over unbounded time
# ------------------------------------------------------------------------------------------------
COARSE = np.linspace(0.0, 1.0, 201)  # a coarser grid than the server's: the same arithmetic, faster


def test_the_block_levels_sum_to_the_windows_share_and_blocks_restart():
    from deebert_cli.core.model.watch import block_alpha

    assert sum(block_alpha(0.025, k) for k in range(1, 200000)) == pytest.approx(0.025, rel=1e-4)
    w = Watch(guarantee(epsilon=0.05), window=10, grid=COARSE)
    for k in range(25):
        w.record(k < 10)  # block 1 all disagree, blocks 2 and 3 none
    win = w.snapshot()["window"]
    assert (win["block"], win["n"], win["disagreements"]) == (3, 5, 0)
    assert win["alpha"] == pytest.approx(0.025 * 6 / (math.pi ** 2 * 9))
    assert w.snapshot()["disagreements"] == 10 and Watch(guarantee(), window=0).snapshot()["window"] is None


def test_the_combined_rule_raises_false_alarms_at_most_delta_of_the_time_in_simulation():
    """Traffic exactly at the budget (the hardest in-budget case), short windows so that many blocks are
    read: over 100 seeded replays of 1,000 rows the state reads exceeded in at most delta of them. Each block
    at the windows' whole share instead of its 6/(pi^2 k^2) part would alarm far more often."""
    delta, eps = 0.2, 0.1
    g = guarantee(epsilon=eps, delta=delta)
    alarms = 0
    for seed in range(100):
        bits = np.random.default_rng(seed).random(1000) < eps
        w = Watch(g, window=25, grid=COARSE)
        for b in bits:
            if w.record(bool(b)) == "exceeded":
                alarms += 1
                break
    assert alarms / 100 <= delta  # measured: 3 of 150 (1,500 rows); with each block at 0.1: 105 of 150


def test_a_shift_after_a_long_history_is_caught_within_a_few_windows():
    """20,000 rows far within a 5% budget, then 20% disagreement: the windowed sequence says exceeded
    within two windows of the shift; the cumulative sequence alone (window 0) has not yet."""
    g = guarantee(epsilon=0.05)
    rng = np.random.default_rng(0)
    history, shifted = rng.random(20000) < 0.01, rng.random(1000) < 0.2
    seen = {}
    for window in (300, 0):
        w = Watch(g, window=window, grid=COARSE)
        for b in history:
            w.record(bool(b))
        assert w.state == "holds"
        seen[window] = next((i for i, b in enumerate(shifted) if w.record(bool(b)) == "exceeded"), None)
    assert seen[300] is not None and seen[300] < 600 and seen[0] is None


def test_without_a_guarantee_the_watch_measures_without_a_verdict():
    w = Watch(None, rate=0.5)
    for k in range(50):
        w.record(k % 5 == 0)
    s = w.snapshot()
    assert s["state"] == "unwatched" and s["epsilon"] is None and s["disagreements"] == 10
    assert "no verdict" in verdict_line(s)


def test_the_sampler_is_seeded_and_keeps_its_share():
    one, again = Sampler(0.05, seed=1), Sampler(0.05, seed=1)
    picks = [one() for _ in range(20000)]
    assert picks == [again() for _ in range(20000)]
    assert 0.04 < sum(picks) / len(picks) < 0.06
    assert not any(Sampler(0.0)() for _ in range(100)) and all(Sampler(1.0)() for _ in range(100))


# ------------------------------------------------------------------------------------------------
# the engines: shadow rows
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lines():
    return mixed_lines(40, seed=11)


def _rule(trained_ckpt, lines, L):
    from test_predict import all_exit_entropies, spread_threshold
    from deebert_cli.core.model.checkpoint import load_checkpoint

    return ExitRule([spread_threshold(all_exit_entropies(load_checkpoint(trained_ckpt), lines))] * L)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_refill_answers_the_same_and_first_then_continues_watched_rows(trained_ckpt, runtime, request, lines):
    """Watching every row: the same answers in the same order; each row's answer is yielded before its
    watch record; the watch's final logits are the full-depth ones (a rule that never exits early)."""
    ckpt = load_runtime(runtime, request)
    L = ckpt.model.num_layers
    rule = _rule(trained_ckpt, lines, L)
    enc = ckpt.tokenizer(lines, truncation=True, max_length=128)
    rows = [(k, enc["input_ids"][k], enc["token_type_ids"][k]) for k in range(len(lines))]
    plain = {k: (l, lg) for k, l, lg, _ in EarlyExitEngine(ckpt, rule, "cpu", 8).run_refill(iter(rows))}
    events, records = [], {}

    def on_watched(key, layer, exit_logits, final_logits):
        events.append(("watch", key))
        records[key] = (layer, np.asarray(exit_logits), np.asarray(final_logits))

    got = {}
    for k, l, lg, _ in EarlyExitEngine(ckpt, rule, "cpu", 8).run_refill(iter(rows), watch=lambda key: True,
                                                                        on_watched=on_watched):
        events.append(("answer", k))
        got[k] = (l, lg)
    assert sorted(got) == sorted(plain) and all(got[k][0] == plain[k][0] for k in got)
    for k in got:  # a layer step may hold other rows (the watched ones riding along): the same numbers
        np.testing.assert_allclose(got[k][1], plain[k][1], atol=1e-5)
    assert sorted(records) == list(range(len(lines)))
    assert any(layer < L - 1 for layer, _, _ in records.values())  # some rows really continued
    for k in records:
        assert events.index(("answer", k)) < events.index(("watch", k))
    full = EarlyExitEngine(ckpt, ExitRule([0.0] * L), "cpu", 8)
    for k, layer, lg, _ in full.run_refill(iter(rows)):
        assert layer == L - 1
        np.testing.assert_allclose(records[k][2], lg, atol=1e-4)
    answers = got
    for k, (layer, exit_logits, _) in records.items():
        assert layer == answers[k][0]
        np.testing.assert_allclose(exit_logits, answers[k][1], atol=1e-6)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_shrink_batch_keeps_its_results_and_reports_watched_rows(trained_ckpt, runtime, request, lines):
    ckpt = load_runtime(runtime, request)
    L = ckpt.model.num_layers
    rule = _rule(trained_ckpt, lines, L)
    ids = ckpt.tokenizer(lines[:16], truncation=True, max_length=128)["input_ids"]
    eng = EarlyExitEngine(ckpt, rule, "cpu", 16)
    layer, logits, ent = eng.run_rows(ids)
    seen = {}
    watch = np.arange(16) % 2 == 0
    layer2, logits2, ent2 = eng.run_rows(ids, watch=watch, on_watched=lambda r, *rest: seen.__setitem__(r, rest))
    np.testing.assert_array_equal(layer, layer2)
    np.testing.assert_allclose(logits, logits2, atol=1e-6)
    assert sorted(seen) == list(range(0, 16, 2))
    _, full, _ = EarlyExitEngine(ckpt, ExitRule([0.0] * L), "cpu", 16).run_rows(ids)
    for r, (lay, exit_logits, final) in seen.items():
        assert lay == layer[r]
        np.testing.assert_allclose(final, full[r], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# the server core
# ------------------------------------------------------------------------------------------------
class Recorder:
    """An Observer logging the order of answers and watch records."""

    def __init__(self):
        self.events = []

    def step(self, layer, rows):
        pass

    def load(self, rows_waiting, requests):
        pass

    def request_done(self, seconds, exit_layers):
        self.events.append(("answer", len(exit_layers)))

    def watched(self, disagreed, snapshot):
        self.events.append(("watch", snapshot["n"]))


@pytest.mark.parametrize("batching", [True, False])
def test_a_watched_request_is_answered_as_an_unwatched_one_and_first(trained_ckpt, batching, lines, tmp_path,
                                                                     monkeypatch):
    from deebert_cli.core.model.checkpoint import load_checkpoint
    from deebert_cli.core.serve.batching import BatchingServer

    monkeypatch.chdir(tmp_path)
    ckpt = load_checkpoint(trained_ckpt)
    rule = _rule(trained_ckpt, lines, ckpt.model.num_layers)

    def run(rule, **watching):
        rec = Recorder()
        srv = BatchingServer(ckpt, rule, "cpu", batch_size=4, batching=batching, observer=rec, **watching).start()
        try:
            out = []
            for k in range(0, len(lines), 4):  # one request at a time: its answer, then its watch records
                out.append([(s.prediction.label, s.prediction.exit_layer, np.asarray(s.logits))
                            for s in srv.submit(lines[k: k + 4]).future.result(timeout=60)])
        finally:
            assert srv.drain(30)
        return out, rec.events

    plain, _ = run(rule)
    watch = Watch(guarantee(epsilon=0.5), rate=1.0)
    watched, events = run(rule, watch=watch, sampler=Sampler(1.0))
    assert [[r[:2] for r in q] for q in watched] == [[r[:2] for r in q] for q in plain]
    np.testing.assert_allclose(np.stack([r[2] for q in watched for r in q]), np.stack([r[2] for q in plain for r in q]),
                               atol=1e-5)
    assert watch.n == len(lines)
    assert [e for e in events if e[0] == "watch"] == [("watch", n) for n in range(1, len(lines) + 1)]
    # every row leaves at layer 1: each request's answer must go out before any of its rows' watch records
    _, events = run(ExitRule([1.0] * ckpt.model.num_layers), watch=Watch(None), sampler=Sampler(1.0))
    for k, pos in enumerate(i for i, e in enumerate(events) if e[0] == "answer"):
        assert sum(e[0] == "watch" for e in events[:pos]) <= 4 * k
    assert list(tmp_path.iterdir()) == []  # no --watch-log: nothing written anywhere


# ------------------------------------------------------------------------------------------------
# the watch log
# ------------------------------------------------------------------------------------------------
def test_the_watch_log_rotates_and_never_passes_its_caps(tmp_path):
    from deebert_cli.core.data.examples import DataSpec, read_unlabeled
    from deebert_cli.core.serve.watchlog import WatchLog

    folder = tmp_path / "recent"
    (tmp_path / "recent").mkdir()
    (folder / "notes.txt").write_text("mine\n")  # not the log's: never touched
    (folder / "watch-notes.jsonl").write_text('{"text": "mine"}\n')  # the log's pattern, not a name it gives
    log = WatchLog(str(folder), lines=4, files=3, interval=0)
    texts = [f"text {k}\nwith a line break" for k in range(25)]
    for t in texts:
        log.add(t)
    log.close()
    assert (folder / "watch-notes.jsonl").read_text() == '{"text": "mine"}\n'
    logs = sorted(p for p in folder.glob("watch-*.jsonl") if p.name != "watch-notes.jsonl")
    assert len(logs) == 3 and (folder / "notes.txt").read_text() == "mine\n"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    kept = [json.loads(line)["text"] for p in logs for line in p.read_text().splitlines()]
    assert all(len(p.read_text().splitlines()) <= 4 for p in logs)
    assert kept == texts[-len(kept):] and len(kept) >= 9
    read, pairs = read_unlabeled(str(logs[-1]), DataSpec())
    assert read == [json.loads(line)["text"] for line in logs[-1].read_text().splitlines()] and pairs is None


def test_the_watch_log_refuses_a_file_and_the_config_checks_its_values(tmp_path):
    from deebert_cli.core.errors import UserError
    from deebert_cli.core.serve.config import ServeConfig
    from deebert_cli.core.serve.watchlog import WatchLog

    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="--watch-log"):
        WatchLog(str(tmp_path / "f"))
    for bad in (dict(watch_rate=1.5), dict(watch_rate=-0.1), dict(watch_delta=0.0), dict(watch_log_lines=0),
                dict(watch_log="x", watch_rate=0.0), dict(watch_window=-1)):
        with pytest.raises(ValueError, match="watch"):
            ServeConfig(**bad)
    assert ServeConfig().watch_rate == 0.01


# ------------------------------------------------------------------------------------------------
# over HTTP: /info, /metrics, the state-change log line, the log folder
# ------------------------------------------------------------------------------------------------
def test_info_metrics_and_the_state_change_line_of_a_served_guarantee(trained_ckpt, tmp_path):
    pytest.importorskip("starlette")
    pytest.importorskip("prometheus_client")
    from test_serve import ServerProcess, get, post

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_ckpt, ckpt)
    meta = json.loads((ckpt / "deebert.json").read_text())
    meta["guarantee"] = guarantee(epsilon=0.99).to_dict()
    (ckpt / "deebert.json").write_text(json.dumps(meta))
    s = ServerProcess(str(ckpt), "--threshold", "0.5", "--watch-rate", "1", "--watch-log", str(tmp_path / "log"),
                      "--watch-window", "7", "--no-access-log")
    try:
        for k in range(0, 30, 3):
            assert post(s.url, {"inputs": mixed_lines(30)[k: k + 3]})[0] == 200
        for _ in range(100):
            info = json.loads(get(s.url + "/info")[1])["watch"]
            if info["n"] == 30:
                break
        assert info["n"] == 30 and info["rate"] == 1.0 and info["state"] == "holds" and info["epsilon"] == 0.99
        assert {"disagreements", "lower", "upper", "test", "advice"} <= set(info)
        assert info["window"]["size"] == 7 and info["window"]["block"] == 5 and info["window"]["n"] == 2
        assert 0 <= info["window"]["lower"] <= info["window"]["upper"] <= 1
        assert s.metric("deebert_watch_window_upper_bound") == pytest.approx(info["window"]["upper"])
        assert s.metric("deebert_watch_rows_total") == 30
        assert s.metric('deebert_watch_state{deebert_watch_state="holds"}') == 1
        assert s.metric("deebert_watch_upper_bound") <= 0.99
        assert not math.isnan(s.metric("deebert_watch_disagreements_total"))
    finally:
        s.stop()
    assert s.wait(30) == 0
    err = s.stderr()
    assert "watch: 100% of requests" in err and "inconclusive -> holds" in err
    kept = [json.loads(line)["text"] for p in sorted((tmp_path / "log").glob("watch-*.jsonl"))
            for line in p.read_text().splitlines()]
    assert sorted(kept) == sorted(mixed_lines(30))


# ------------------------------------------------------------------------------------------------
# predict-dataset
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["shrink", "refill"])
def test_the_predictor_marks_watched_rows_and_predicts_the_same(trained_ckpt, engine, lines):
    pytest.importorskip("pyarrow")
    import pyarrow as pa

    from deebert_cli.core.model.checkpoint import load_checkpoint
    from deebert_cli.core.model.watch import disagrees
    from deebert_cli.core.ray_data.predictor import DeeBertPredictor

    texts = lines + [None]
    thr = _rule(trained_ckpt, lines, 2).thresholds[0]
    plain = DeeBertPredictor(trained_ckpt, threshold=thr, device="cpu", batch_size=4, engine=engine)(pa.table({"text": texts}))
    watched = DeeBertPredictor(trained_ckpt, threshold=thr, device="cpu", batch_size=4, engine=engine,
                               watch_rate=1.0)(pa.table({"text": texts}))
    assert "watch_disagreed" not in plain.column_names
    for name in plain.column_names:
        assert watched.column(name).to_pylist()[:-1] == pytest.approx(plain.column(name).to_pylist()[:-1]) \
            if name in ("confidence", "entropy") else watched.column(name).to_pylist() == plain.column(name).to_pylist()
    bits = watched.column("watch_disagreed").to_pylist()
    assert bits[-1] is None and None not in bits[:-1]  # the empty row is not watched, every other one is
    ckpt = load_checkpoint(trained_ckpt)
    full = EarlyExitEngine(ckpt, ExitRule([0.0] * ckpt.model.num_layers), "cpu", 4)
    ids = ckpt.tokenizer(lines, truncation=True, max_length=128)["input_ids"]
    _, final, _ = full.run_rows(ids)
    labels = watched.column("label").to_pylist()
    assert bits[:-1] == [ckpt.label_names[int(final[k].argmax())] != labels[k] for k in range(len(lines))]
    assert not disagrees([0.1, 0.9], [0.2, 0.8])


def test_predict_dataset_ends_with_the_guarantee_on_the_corpus(trained_ckpt, tmp_path):
    ray = pytest.importorskip("ray")
    from typer.testing import CliRunner

    from deebert_cli.cli.app import app

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_ckpt, ckpt)
    meta = json.loads((ckpt / "deebert.json").read_text())
    meta["guarantee"] = guarantee(epsilon=0.999).to_dict()
    (ckpt / "deebert.json").write_text(json.dumps(meta))
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(mixed_lines(60)) + "\n")
    try:
        res = CliRunner().invoke(app, ["predict-dataset", "--checkpoint", str(ckpt), "--input", str(src), "--output",
                                       str(tmp_path / "out"), "--format", "jsonl", "--threshold", "0.5", "--device",
                                       "cpu", "--concurrency", "1", "--local-cpus", "1", "--watch-rate", "1"])
    finally:
        ray.shutdown()
    assert res.exit_code == 0, res.output
    assert "watch: the stored guarantee holds on these texts: disagreement" in res.output and "/60" in res.output
    rows = [json.loads(l) for p in (tmp_path / "out").glob("*.json*") for l in p.read_text().splitlines()]
    assert len(rows) == 60 and all(r["watch_disagreed"] in (True, False) for r in rows)
