"""Regression checkpoints end to end: finetune --task regression, train-exits, predict (patience), analyze."""
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_data_dir, make_tiny_backbone, mixed_lines
from deebert_cli.cli.app import app
from deebert_cli.core.model.checkpoint import load_checkpoint
from deebert_cli.core.data.encoding import encode
from deebert_cli.core.model.policies import patience_exit
from deebert_cli.core.runtime.rules import PatienceRule
from deebert_cli.core.runtime.stream import PredictStats, predict_stream
from deebert_cli.core.metrics import pearson, ranks, spearman
from deebert_cli.core.runtime.passes import collect

runner = CliRunner()


@pytest.fixture(scope="module")
def reg_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regression")
    backbone, data, out = make_tiny_backbone(tmp), make_data_dir(tmp), str(tmp / "ckpt")
    r = runner.invoke(app, ["finetune", "--model", backbone, "--dataset", data, "--label-column", "score", "--task",
                            "regression", "--epochs", "8", "--lr", "3e-3", "--batch-size", "16", "--output", out,
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "Pearson" in r.stdout
    r = runner.invoke(app, ["train-exits", "--checkpoint", out, "--epochs", "10", "--lr", "3e-3", "--learned-exits",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return out


def test_metrics_by_hand():
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) != pearson([1, 1, 1], [1, 2, 3])  # nan: constant side


def _all_values(ckpt, lines):
    enc = encode(ckpt.tokenizer, lines, None, 128)
    return collect(ckpt.model, enc, ckpt.tokenizer.pad_token_id, 16, "cpu", pooled=False, all_logits=True)["logits"]


def _tolerance_in_a_gap(values):
    """A tolerance far (> 1e-3) from every consecutive-layer difference, near their median."""
    diffs = sorted((values[1:, :, 0] - values[:-1, :, 0]).abs().flatten().tolist())
    target = diffs[len(diffs) // 2]
    best = None
    for a, b in zip(diffs, diffs[1:]):
        if b - a > 2e-3 and (best is None or abs((a + b) / 2 - target) < abs(best - target)):
            best = (a + b) / 2
    return best


def test_regression_end_to_end(reg_ckpt, tmp_path):
    meta = json.load(open(f"{reg_ckpt}/deebert.json"))
    assert meta["task"] == "regression" and meta["stage"] == "exits_trained"
    cfg = json.load(open(f"{reg_ckpt}/config.json"))
    assert len(cfg["id2label"]) == 1 and cfg["problem_type"] == "regression"
    ckpt = load_checkpoint(reg_ckpt)
    layers = meta["metrics"]["train_exits"]["layers"]
    assert {"mse", "pearson", "spearman"} <= set(layers[-1]) and layers[-1]["pearson"] > 0.5
    # no recipe option: [CLS] and mean+norm were compared by the off-ramps' mean MSE; no entropy threshold stored
    rows = meta["recipes"]["candidates"]
    assert [r["recipe"] for r in rows] == ["cls", "mean+norm"] and "thresholds" not in meta
    kept = min(rows, key=lambda r: r["mean_ramp_mse"])
    assert meta["recipes"]["chosen"] == kept["recipe"] and meta["ramp"]["pooling"] == kept["pooling"]
    assert [l["mse"] for l in layers] == pytest.approx(kept["layer_mse"])
    # entropy is refused, naming the policy that works
    r = runner.invoke(app, ["predict", "--checkpoint", reg_ckpt, "--device", "cpu"], input="good film\n")
    assert r.exit_code == 2 and "--exit-policy patience" in r.output and "--exit-policy learned" in r.output
    assert "Traceback" not in r.output
    # patience: value and exit layer, one line per input
    data_dir = meta["data"]["dataset"]
    rows = [json.loads(l) for l in open(f"{data_dir}/validation.jsonl")]
    texts = [row["text"] for row in rows]
    tol = _tolerance_in_a_gap(_all_values(ckpt, texts))
    r = runner.invoke(app, ["predict", "--checkpoint", reg_ckpt, "--exit-policy", "patience", "--patience", "1",
                            "--tolerance", str(tol), "--format", "jsonl", "--device", "cpu"],
                      input="\n".join(texts[:3]) + "\n\n")
    assert r.exit_code == 0, r.output
    got = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(got) == 4 and got[3]["empty"] and all(isinstance(g["value"], float) for g in got[:3])
    # analyze: per-layer MSE / correlation, and its patience sweep agrees with predict
    out = tmp_path / "a.json"
    png = tmp_path / "a.png"
    r = runner.invoke(app, ["analyze", "--checkpoint", reg_ckpt, "--patience", "1,2", "--tolerance", str(tol),
                            "--json", str(out), "--plot", str(png), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "Spearman" in r.stdout and png.read_bytes()[:4] == b"\x89PNG"
    a = json.loads(out.read_text())
    assert a["task"] == "regression" and {"mse", "pearson", "spearman"} <= set(a["layers"][0])
    assert len(a["learned_sweep"]) > 0 and "learned-exit sweep" in r.stdout
    for s in a["patience_sweep"]:
        p = runner.invoke(app, ["predict", "--checkpoint", reg_ckpt, "--exit-policy", "patience", "--patience",
                                str(s["patience"]), "--tolerance", str(tol), "--format", "jsonl", "--device", "cpu",
                                "--batch-size", "8"], input="\n".join(texts) + "\n")
        preds = [json.loads(l) for l in p.stdout.splitlines()]
        hist = [0] * a["model"]["layers"]
        for x in preds:
            hist[x["exit_layer"] - 1] += 1
        assert hist == s["histogram"], s
        err = sum((x["value"] - row["score"]) ** 2 for x, row in zip(preds, rows)) / len(rows)
        assert err == pytest.approx(s["mse"], rel=1e-4, abs=1e-6)


def test_regression_patience_batched_equals_one_at_a_time(reg_ckpt):
    ckpt = load_checkpoint(reg_ckpt)
    lines = mixed_lines(120, seed=4)
    values = _all_values(ckpt, lines)
    tol = _tolerance_in_a_gap(values)
    N = max(range(1, ckpt.model.num_layers), key=lambda n: len(set(patience_exit(values, n, tol).tolist())))
    rule = PatienceRule(N, tol)

    def run(**kw):
        return list(predict_stream(ckpt, iter(lines), rule, "cpu", stats=PredictStats(ckpt.model.num_layers), **kw))

    one = run(batch_size=1, window=1)
    assert len({r.exit_layer for r in one}) >= 2, "exits must fire at several layers"
    assert [r.exit_layer - 1 for r in one] == patience_exit(values, N, tol).tolist()
    for kw in (dict(batch_size=32, window=64), dict(batch_size=32, engine="refill"),
               dict(batch_size=7, window=50, engine="refill")):
        many = run(**kw)
        assert [r.index for r in many] == list(range(len(lines)))
        for a, b in zip(one, many):
            assert a.exit_layer == b.exit_layer and abs(a.value - b.value) < 1e-4, (kw, a, b)


def test_regression_learned_exits_predict(reg_ckpt):
    r = runner.invoke(app, ["predict", "--checkpoint", reg_ckpt, "--exit-policy", "learned", "--threshold", "0.5",
                            "--format", "tsv", "--device", "cpu"], input="good film\nbad awful\n")
    assert r.exit_code == 0, r.output
    header, *rows = r.stdout.splitlines()
    assert header.split("\t") == ["value", "exit_layer", "empty"] and len(rows) == 2


def test_regression_calibrate_patience_and_learned(reg_ckpt, tmp_path):
    """A regression checkpoint's guarantee: error increase (labelled) or disagreement (unlabelled), for
    the patience and learned policies; entropy is refused."""
    import json
    import shutil

    from conftest import make_sentiment_rows, write_jsonl

    from deebert_cli.core.model.guarantee import stored_guarantee

    ck = str(tmp_path / "ck")
    shutil.copytree(reg_ckpt, ck)
    data = write_jsonl(tmp_path / "cal.jsonl", make_sentiment_rows(300, 21))
    r = runner.invoke(app, ["calibrate", "--checkpoint", ck, "--dataset", data, "--label-column", "score",
                            "--exit-policy", "patience", "--max-drop", "20", "--tolerance", "1.0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    g = stored_guarantee(json.loads((tmp_path / "ck" / "deebert.json").read_text()))
    got = " ".join(r.stdout.split())
    if g is not None:
        assert g.risk == "error_increase" and g.policy == "patience" and g.tolerance == 1.0
    else:
        assert "nothing certified" in got
    txt = tmp_path / "t.txt"
    txt.write_text("".join(row["text"] + "\n" for row in make_sentiment_rows(300, 22)))
    r = runner.invoke(app, ["calibrate", "--checkpoint", ck, "--unlabeled", str(txt), "--exit-policy", "learned",
                            "--max-disagreement", "0.3", "--tolerance", "1.0", "--device", "cpu", "--check"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["calibrate", "--checkpoint", ck, "--unlabeled", str(txt), "--device", "cpu"])
    assert r.exit_code == 2 and "regression checkpoint" in r.output
