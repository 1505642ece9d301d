import json
import sys

import pytest
from typer.testing import CliRunner

from deebert_cli.cli.app import app
from deebert_cli.core.analysis.sweep import SweepRow, recommend

runner = CliRunner()


def predicted_histogram_and_accuracy(ckpt, rows, layers, *options):
    """Run `deebert predict OPTIONS` on the rows' texts -> (exit-layer histogram, accuracy)."""
    texts = "\n".join(row["text"] for row in rows) + "\n"
    p = runner.invoke(app, ["predict", "--checkpoint", ckpt, *options, "--format", "jsonl", "--device", "cpu",
                            "--batch-size", "8"], input=texts)
    assert p.exit_code == 0, p.output
    preds = [json.loads(l) for l in p.stdout.splitlines()]
    hist = [0] * layers
    for x in preds:
        hist[x["exit_layer"] - 1] += 1
    return hist, sum(x["label"] == row["label"] for x, row in zip(preds, rows)) / len(rows)


def _jsonl(path):
    return [json.loads(l) for l in open(path) if l.strip()]


def test_sweep_agrees_with_predict_at_the_same_thresholds(trained_ckpt, tmp_path):
    data_dir = json.load(open(f"{trained_ckpt}/deebert.json"))["data"]["dataset"]
    rows = _jsonl(f"{data_dir}/validation.jsonl")
    thresholds = [0.0, 0.05, 0.2, 0.5, 0.8, 1.0]
    out = tmp_path / "a.json"
    r = runner.invoke(app, ["analyze", "--checkpoint", trained_ckpt, "--thresholds", ",".join(map(str, thresholds)),
                            "--json", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    a = json.loads(out.read_text())
    assert a["dataset"]["n"] == len(rows)
    for s in a["sweep"]:
        hist, acc = predicted_histogram_and_accuracy(trained_ckpt, rows, a["model"]["layers"],
                                                     "--threshold", str(s["threshold"]))
        assert hist == s["histogram"], s["threshold"]
        assert acc == pytest.approx(s["accuracy"], abs=1e-9), s["threshold"]
    # the sweep is not degenerate: some threshold exits samples at several layers
    assert any(sum(c > 0 for c in s["histogram"]) >= 2 for s in a["sweep"])


def test_analyze_reports_every_figure(trained_ckpt, tmp_path):
    out = tmp_path / "a.json"
    png = tmp_path / "a.png"
    r = runner.invoke(app, ["analyze", "--checkpoint", trained_ckpt, "--max-drop", "1", "--json", str(out),
                            "--plot", str(png), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    a = json.loads(out.read_text())
    L = a["model"]["layers"]
    assert [l["layer"] for l in a["layers"]] == list(range(1, L + 1))
    full = a["layers"][-1]["accuracy"]
    rec = a["recommendation"]
    assert rec is not None and -rec["accuracy_change"] <= 1.0 + 1e-9
    # the recommendation has the largest layer saving among thresholds within budget
    ok = [s for s in a["sweep"] if -s["accuracy_change"] <= 1.0 + 1e-9]
    assert rec["layer_saving"] == max(s["layer_saving"] for s in ok)
    assert rec["measured_seconds"] > 0 and rec["wall_saving"] is not None
    zero = next(s for s in a["sweep"] if s["threshold"] == 0)
    assert zero["accuracy"] == pytest.approx(full) and zero["histogram"][-1] == a["dataset"]["n"]
    assert a["test"]["split"] == "test" and a["test"]["at_recommended"]["threshold"] == rec["threshold"]
    assert {"rarely_exited_layers", "accuracy_saturates_at_layer", "accuracy_falls_at_layers"} <= set(a["dead_weight"])
    assert a["model"]["off_ramp_parameters"] > 0 and a["dataset"]["evaluated_on"] == "split 'validation'"
    assert sum(len(v) for v in a["examples"].values()) > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "recommended threshold" in r.stdout and "dead weight" in r.stdout


def test_recommend_picks_largest_saving_within_budget():
    def row(t, change, saving):
        return SweepRow(t, 0.9 + change / 100, 0.0, change, 1.0, saving, [])

    rows = [row(0, 0, 0), row(0.1, -0.2, 0.2), row(0.2, -0.4, 0.35), row(0.3, -0.6, 0.5)]
    assert recommend(rows, 0.5).threshold == 0.2
    assert recommend(rows, 1.0).threshold == 0.3
    assert recommend(rows, 0.0).threshold == 0
    assert recommend([row(0.1, -2, 0.5)], 0.5) is None


def test_analyze_bad_inputs(trained_ckpt, stage1_ckpt, monkeypatch):
    r = runner.invoke(app, ["analyze", "--checkpoint", stage1_ckpt, "--device", "cpu"])
    assert r.exit_code == 2 and "train-exits" in r.output
    r = runner.invoke(app, ["analyze", "--checkpoint", trained_ckpt, "--thresholds", "0.1,2", "--device", "cpu"])
    assert r.exit_code == 2 and "out of range" in r.output
    r = runner.invoke(app, ["analyze", "--checkpoint", trained_ckpt, "--split", "nope", "--device", "cpu"])
    assert r.exit_code == 2 and "split 'nope' not found" in r.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    r = runner.invoke(app, ["analyze", "--checkpoint", trained_ckpt, "--plot", "x.png", "--device", "cpu"])
    assert r.exit_code == 2 and "needs matplotlib" in r.output and "Traceback" not in r.output


def test_patience_sweep_agrees_with_predict(trained_ckpt, tmp_path):
    data_dir = json.load(open(f"{trained_ckpt}/deebert.json"))["data"]["dataset"]
    rows = _jsonl(f"{data_dir}/validation.jsonl")
    out = tmp_path / "a.json"
    r = runner.invoke(app, ["analyze", "--checkpoint", trained_ckpt, "--patience", "0,1,2,3", "--timing-repeats", "1",
                            "--json", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "patience sweep" in r.stdout
    a = json.loads(out.read_text())
    assert [s["patience"] for s in a["patience_sweep"]] == [0, 1, 2, 3]
    assert a["patience_sweep"][0]["histogram"][0] == len(rows)  # patience 0: everyone at layer 1
    for s in a["patience_sweep"][1:]:
        hist, acc = predicted_histogram_and_accuracy(trained_ckpt, rows, a["model"]["layers"],
                                                     "--exit-policy", "patience", "--patience", str(s["patience"]))
        assert hist == s["histogram"], s["patience"]
        assert acc == pytest.approx(s["accuracy"], abs=1e-9), s["patience"]


def test_exit_policy_selects_the_policies_compared(trained_ckpt, tmp_path):
    out = tmp_path / "a.json"
    r = runner.invoke(app, ["analyze", "--checkpoint", trained_ckpt, "--exit-policy", "patience", "--timing-repeats", "1",
                            "--json", str(out), "--plot", str(tmp_path / "a.png"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    a = json.loads(out.read_text())
    assert a["sweep"] == [] and a["recommendation"] is None and len(a["patience_sweep"]) == a["model"]["layers"]
    assert "patience sweep" in r.stdout and "threshold sweep" not in r.stdout
    r = runner.invoke(app, ["analyze", "--checkpoint", trained_ckpt, "--exit-policy", "learned", "--device", "cpu"])
    assert r.exit_code == 2 and "--learned-exits" in r.output
    r = runner.invoke(app, ["analyze", "--checkpoint", trained_ckpt, "--exit-policy", "nope", "--device", "cpu"])
    assert r.exit_code == 2 and "--exit-policy must be among" in r.output
