import json
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import RUNTIMES, load_runtime, mixed_lines
from deebert_cli.cli.app import app
from deebert_cli.core.model.checkpoint import load_checkpoint
from deebert_cli.core.data.encoding import encode
from deebert_cli.core.model.policies import normalized_entropy
from deebert_cli.core.runtime.engine import width_groups
from deebert_cli.core.runtime.rules import ExitRule
from deebert_cli.core.runtime.stream import PredictStats, predict_stream
from deebert_cli.core.runtime.passes import collect

runner = CliRunner()


def all_exit_entropies(ckpt, lines):
    enc = encode(ckpt.tokenizer, lines, None, 128)
    logits = collect(ckpt.model, enc, ckpt.tokenizer.pad_token_id, 16, "cpu", pooled=False, all_logits=True)["logits"]
    return normalized_entropy(logits)  # [L, n]


def spread_threshold(ent):
    """A threshold that sends samples out at several layers and sits far (> 1e-3) from every entropy, so
    float noise from padding can't flip a decision."""
    vals = sorted(set(ent[:-1].flatten().tolist()))
    target = torch.quantile(ent[0], 0.4).item()
    best = None
    for a, b in zip(vals, vals[1:]):
        if b - a > 2e-3:
            mid = (a + b) / 2
            if best is None or abs(mid - target) < abs(best - target):
                best = mid
    return best


def run(ckpt, lines, rule, **kw):
    stats = PredictStats(ckpt.model.num_layers)
    return list(predict_stream(ckpt, iter(lines), rule, "cpu", stats=stats, **kw)), stats


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_batched_early_exit_equals_one_at_a_time(trained_ckpt, runtime, request):
    ref = load_checkpoint(trained_ckpt)
    ckpt = load_runtime(runtime, request)
    lines = mixed_lines(240)
    thr = spread_threshold(all_exit_entropies(ref, lines))
    rule = ExitRule([thr] * ckpt.model.num_layers)
    one, s1 = run(ckpt, lines, rule, batch_size=1, window=1)
    assert sum(c > 0 for c in s1.histogram) >= 3, f"exits must fire at several layers: {s1.histogram}"
    if runtime == "onnx":  # the same answers as the torch runtime
        want, _ = run(ref, lines, rule, batch_size=1, window=1)
        assert [(a.label, a.exit_layer) for a in one] == [(b.label, b.exit_layer) for b in want]
        assert max(abs(a.confidence - b.confidence) for a, b in zip(one, want)) < 1e-4
    for kw in (dict(batch_size=32, window=64), dict(batch_size=32, window=1024),
               dict(batch_size=32, engine="refill"), dict(batch_size=7, window=50, engine="refill")):
        many, _ = run(ckpt, lines, rule, **kw)
        assert [r.index for r in many] == list(range(len(lines)))
        for a, b in zip(one, many):
            assert (a.label, a.exit_layer) == (b.label, b.exit_layer), (kw, a, b)
            assert abs(a.confidence - b.confidence) < 1e-4 and abs(a.entropy - b.entropy) < 1e-4


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exit_layers_match_the_all_exits_pass(trained_ckpt, runtime, request):
    ckpt = load_runtime(runtime, request)
    lines = mixed_lines(100, seed=9)
    ent = all_exit_entropies(load_checkpoint(trained_ckpt), lines)
    thr = spread_threshold(ent)
    fires = ent < thr
    fires[-1] = True
    expected = (fires.int().argmax(0) + 1).tolist()
    got, _ = run(ckpt, lines, ExitRule([thr] * ckpt.model.num_layers), batch_size=16)
    assert [r.exit_layer for r in got] == expected


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_threshold_extremes(runtime, request):
    ckpt = load_runtime(runtime, request)
    L = ckpt.model.num_layers
    lines = mixed_lines(50)
    zero, s0 = run(ckpt, lines, ExitRule([0.0] * L))
    assert s0.histogram == [0] * (L - 1) + [50]
    top, s1 = run(ckpt, lines, ExitRule([1.0] * L))
    assert s1.histogram == [50] + [0] * (L - 1)
    raw, s2 = run(ckpt, lines, ExitRule([5.0] * L, entropy="raw"))  # above ln 2
    assert s2.histogram[0] == 50
    assert s0.layer_saving == 0 and s1.layer_saving == pytest.approx(1 - 1 / L)


def test_layers_nobody_may_leave_skip_their_off_ramp_and_a_batch_builds_its_mask_once(trained_ckpt, monkeypatch):
    """At threshold 0 (and at the zero entries of --thresholds) the off-ramp's output is never read: the
    engine must not compute it. The prepared attention mask is built once per batch, not per layer."""
    ckpt = load_checkpoint(trained_ckpt)
    m, L = ckpt.model, ckpt.model.num_layers
    calls = {"exit": [], "mask": 0}
    exit_logits, prepare_mask = m.exit_logits, m.prepare_mask
    monkeypatch.setattr(m, "exit_logits", lambda i, *a: calls["exit"].append(i) or exit_logits(i, *a))
    monkeypatch.setattr(m, "prepare_mask", lambda *a: calls.__setitem__("mask", calls["mask"] + 1) or prepare_mask(*a))
    lines = mixed_lines(40)
    want, _ = run(load_checkpoint(trained_ckpt), lines, ExitRule([0.0] * L), batch_size=8)
    got, _ = run(ckpt, lines, ExitRule([0.0] * L), batch_size=8)
    assert set(calls["exit"]) == {L - 1} and calls["mask"] == 40 // 8
    assert [(a.label, a.confidence) for a in got] == [(b.label, b.confidence) for b in want]
    calls["exit"].clear()
    run(ckpt, lines, ExitRule([0.0, 1.0] + [0.0] * (L - 2)), batch_size=8)  # everyone leaves at layer 2
    assert set(calls["exit"]) == {1}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_nothing_lost_cli(runtime, request):
    trained_ckpt = request.getfixturevalue("trained_ckpt" if runtime == "torch" else "exported_ckpt")
    on = ["--runtime", runtime]
    long_line = " ".join(["good film"] * 400)
    raw = (b"good great film\n\n   \nbad awful boring\r\nnot so good\n\xff\xfe bad \xc3\n" + long_line.encode() + b"\nthe end")
    r = runner.invoke(app, ["predict", "--checkpoint", trained_ckpt, "--format", "jsonl", "--device", "cpu", *on], input=raw)
    assert r.exit_code == 0, r.output
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(rows) == 8
    assert [row["empty"] for row in rows] == [False, True, True, False, False, False, False, False]
    assert rows[0]["label"] == "positive" and rows[3]["label"] == "negative"
    assert all(1 <= row["exit_layer"] <= 4 for row in rows if not row["empty"])
    assert r.stderr.count("not UTF-8") == 1
    assert "1 line(s) were longer than 128 tokens" in r.stderr
    # text and tsv keep one line per input too (tsv adds one header line)
    for fmt, extra in (("text", 0), ("tsv", 1)):
        r = runner.invoke(app, ["predict", "--checkpoint", trained_ckpt, "--format", fmt, "--device", "cpu", *on], input=raw)
        assert r.exit_code == 0 and len(r.stdout.splitlines()) == 8 + extra
    r = runner.invoke(app, ["predict", "--checkpoint", trained_ckpt, "--device", "cpu", *on], input=b"")
    assert r.exit_code == 0 and r.stdout == ""


def test_input_output_files_and_all_probs(trained_ckpt, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("good film\nbad film\n")
    outp = tmp_path / "out.tsv"
    r = runner.invoke(app, ["predict", "--checkpoint", trained_ckpt, "--input", inp, "--output", outp, "--format", "tsv",
                            "--all-probs", "--threshold", "0.2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    header, *rows = outp.read_text().splitlines()
    assert header.split("\t") == ["label", "confidence", "exit_layer", "entropy_normalized", "empty", "prob_negative", "prob_positive"]
    assert len(rows) == 2
    for row in rows:
        cells = row.split("\t")
        assert abs(float(cells[5]) + float(cells[6]) - 1) < 1e-5
        assert float(cells[1]) == pytest.approx(max(float(cells[5]), float(cells[6])), abs=1e-6)
    assert "summary" in r.stderr and "mean exit layer" in r.stderr


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_streaming_is_lazy_and_bounded(runtime, request):
    ckpt = load_runtime(runtime, request)
    consumed = 0
    source = mixed_lines(300)

    def lines():
        nonlocal consumed
        for k in range(20000):
            consumed += 1
            yield source[k % len(source)]

    rule = ExitRule([0.5] * ckpt.model.num_layers)
    for engine in ("shrink", "refill"):
        consumed = 0
        worst = 0
        for k, r in enumerate(predict_stream(ckpt, lines(), rule, "cpu", batch_size=32, window=256, engine=engine), 1):
            assert r.index == k - 1
            worst = max(worst, consumed - k)  # lines read but not yet written
            if k == 1:
                assert consumed <= 256  # output starts after the first window, not the whole input
        assert k == 20000
        # memory stays flat: at most the window being read plus, for refill, rows a window behind
        bound = 256 if engine == "shrink" else 2 * 256 + 32 * ckpt.model.num_layers
        assert worst <= bound, (engine, worst)


def test_output_begins_before_input_ends(trained_ckpt):
    proc = subprocess.Popen([sys.executable, "-m", "deebert_cli", "predict", "--checkpoint", trained_ckpt,
                             "--window", "64", "--device", "cpu", "--no-summary"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        proc.stdin.write(("good film\n" * 200).encode())
        proc.stdin.flush()
        first = proc.stdout.readline()  # would block forever if output waited for end of input
        assert first.startswith(b"positive")
    finally:
        proc.stdin.close()
        rest = proc.stdout.read()
        proc.wait(timeout=60)
    assert len(rest.splitlines()) == 199


def test_bad_inputs(trained_ckpt, stage1_ckpt, tmp_path):
    def err(*args):
        r = runner.invoke(app, ["predict", *map(str, args), "--device", "cpu"], input="good\n")
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output
        return r.output

    assert "no checkpoint" in err("--checkpoint", tmp_path / "none")
    out = err("--checkpoint", stage1_ckpt, "--threshold", "0.3")
    assert "deebert train-exits" in out and "--threshold 0" in out
    assert "out of range" in err("--checkpoint", trained_ckpt, "--threshold", "1.5")
    assert ">= 0" in err("--checkpoint", trained_ckpt, "--threshold", "-0.1")
    assert "needs 3 values" in err("--checkpoint", trained_ckpt, "--thresholds", "0.1,0.2")
    assert "does not exist" in err("--checkpoint", trained_ckpt, "--input", tmp_path / "nope.txt")
    # a stage-1 checkpoint still predicts at full depth with --threshold 0
    r = runner.invoke(app, ["predict", "--checkpoint", stage1_ckpt, "--threshold", "0", "--device", "cpu"], input="good\n")
    assert r.exit_code == 0 and "exit 4/4" in r.stdout


def test_per_layer_thresholds(trained_ckpt):
    ckpt = load_checkpoint(trained_ckpt)
    lines = mixed_lines(60)
    # layers 1-2 never exit, layer 3 takes everyone
    r = runner.invoke(app, ["predict", "--checkpoint", trained_ckpt, "--thresholds", "0,0,1", "--format", "jsonl",
                            "--device", "cpu"], input="\n".join(lines) + "\n")
    assert r.exit_code == 0, r.output
    assert {json.loads(l)["exit_layer"] for l in r.stdout.splitlines()} == {3}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_patience_batched_equals_one_at_a_time(trained_ckpt, runtime, request):
    from deebert_cli.core.model.policies import patience_exit
    from deebert_cli.core.runtime.rules import PatienceRule

    ref = load_checkpoint(trained_ckpt)
    ckpt = load_runtime(runtime, request)
    lines = mixed_lines(160, seed=3)
    enc = encode(ref.tokenizer, lines, None, 128)
    logits = collect(ref.model, enc, ref.tokenizer.pad_token_id, 16, "cpu", pooled=False, all_logits=True)["logits"]
    # pick the patience whose exits spread over the most layers
    N = max(range(1, ckpt.model.num_layers), key=lambda n: len(set(patience_exit(logits, n).tolist())))
    rule = PatienceRule(N)
    one, s1 = run(ckpt, lines, rule, batch_size=1, window=1)
    assert sum(c > 0 for c in s1.histogram) >= 2, f"exits must fire at several layers: {s1.histogram}"
    assert [r.exit_layer - 1 for r in one] == patience_exit(logits, N).tolist()
    for kw in (dict(batch_size=32, window=64), dict(batch_size=32, engine="refill"),
               dict(batch_size=7, window=50, engine="refill")):
        many, _ = run(ckpt, lines, rule, **kw)
        assert [r.index for r in many] == list(range(len(lines)))
        for a, b in zip(one, many):
            assert (a.label, a.exit_layer) == (b.label, b.exit_layer), (kw, a, b)
    # through the CLI, and thresholds are refused with the patience policy
    path = request.getfixturevalue("trained_ckpt" if runtime == "torch" else "exported_ckpt")
    r = runner.invoke(app, ["predict", "--checkpoint", path, "--exit-policy", "patience", "--patience", str(N),
                            "--format", "jsonl", "--device", "cpu", "--runtime", runtime], input="\n".join(lines) + "\n")
    assert r.exit_code == 0, r.output
    assert [json.loads(l)["exit_layer"] for l in r.stdout.splitlines()] == [x.exit_layer for x in one]
    assert "patience" in r.stderr
    r = runner.invoke(app, ["predict", "--checkpoint", trained_ckpt, "--exit-policy", "patience", "--threshold", "0.2",
                            "--device", "cpu"], input="good\n")
    assert r.exit_code == 2 and "--patience" in r.output


def test_width_groups_split_a_refill_step_by_length_at_least_cost():
    """The sub-batches of a refill step partition its rows, each padded to its own longest, and cost no
    more (call_tokens per call + padded tokens) than the best of every contiguous split of the sorted
    lengths, found here by brute force."""
    import itertools
    import random

    def cost(groups, lens, c):
        return sum(c + len(g) * max(lens[j] for j in g) for g in groups)

    assert width_groups([20] * 12, 8) == [sorted(range(12))]  # nothing to gain: one call
    two = width_groups([3, 60] * 6, 8)
    assert [sorted(g) for g in two] == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
    assert width_groups([3, 60] * 6, 10_000) == [[0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]]  # calls dear: one
    rng = random.Random(0)
    for _ in range(200):
        lens = [rng.randint(1, 64) for _ in range(rng.randint(1, 9))]
        c = rng.choice([0, 4, 16, 64])
        got = width_groups(lens, c)
        assert sorted(j for g in got for j in g) == list(range(len(lens)))
        assert all([lens[j] for j in g] == sorted(lens[j] for j in g) for g in got)
        order = sorted(range(len(lens)), key=lens.__getitem__)
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(lens)))], lens, c)
                   for r in range(len(lens)) for cuts in itertools.combinations(range(1, len(lens)), r))
        assert cost(got, lens, c) == best
