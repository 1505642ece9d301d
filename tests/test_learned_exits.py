"""Learned exits (BERxiT): the decision, batch equivalence, and analyze's sweep against predict."""
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import RUNTIMES, export_copy, load_runtime, mixed_lines
from deebert_cli.cli.app import app
from deebert_cli.core.runtime.passes import exit_scores
from deebert_cli.core.model.checkpoint import load_checkpoint
from deebert_cli.core.data.encoding import encode
from deebert_cli.core.model.policies import LearnedPolicy, policy_exit
from deebert_cli.core.runtime.rules import LearnedRule
from deebert_cli.core.runtime.stream import PredictStats, predict_stream
from deebert_cli.core.runtime.passes import collect

runner = CliRunner()


@pytest.fixture(scope="module")
def learned_ckpt(trained_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("learned") / "ckpt")
    r = runner.invoke(app, ["train-exits", "--checkpoint", trained_ckpt, "--output", out, "--learned-exits", "--ramp-pooling", "cls",
                            "--epochs", "10", "--lr", "3e-3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "learned exits" in r.stdout
    return out


def test_learned_decision_by_hand():
    # 3 layers x 3 samples; scores for layers 1..2
    logits = torch.zeros(3, 3, 2)
    scores = torch.tensor([[0.95, 0.5, 0.2], [0.1, 0.91, 0.3]])
    assert policy_exit(LearnedPolicy(0.9), logits, scores).tolist() == [0, 1, 2]
    assert policy_exit(LearnedPolicy(0.4), logits, scores).tolist() == [0, 0, 2]
    # regression: exit when the predicted error is below the threshold
    assert policy_exit(LearnedPolicy(0.25, regression=True), logits, scores).tolist() == [1, 2, 0]


@pytest.fixture(scope="module")
def learned_export(learned_ckpt, tmp_path_factory):
    return export_copy(learned_ckpt, tmp_path_factory, "learned-onnx", quantize=None)


def _scores_and_logits(ckpt, lines):
    enc = encode(ckpt.tokenizer, lines, None, 128)
    got = collect(ckpt.model, enc, ckpt.tokenizer.pad_token_id, 16, "cpu", pooled=True, all_logits=True)
    return got["logits"], exit_scores(ckpt.model, got["pooled"])


def _gap_threshold(scores):
    vals = sorted(set(scores.flatten().tolist()))
    target = torch.quantile(scores[0], 0.5).item()
    best = None
    for a, b in zip(vals, vals[1:]):
        if b - a > 2e-3 and (best is None or abs((a + b) / 2 - target) < abs(best - target)):
            best = (a + b) / 2
    return best


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_learned_batched_equals_one_at_a_time(learned_ckpt, runtime, request):
    ref = load_checkpoint(learned_ckpt)
    ckpt = load_runtime(runtime, request, "learned_ckpt", "learned_export")
    assert ckpt.model.ramp_cfg.learned_exit and ckpt.meta["learned_exits"]
    lines = mixed_lines(160, seed=6)
    logits, scores = _scores_and_logits(ref, lines)
    thr = _gap_threshold(scores)
    rule = LearnedRule(thr)
    one = list(predict_stream(ckpt, iter(lines), rule, "cpu", batch_size=1, window=1))
    assert len({r.exit_layer for r in one}) >= 2, "exits must fire at several layers"
    assert [r.exit_layer - 1 for r in one] == policy_exit(LearnedPolicy(thr), logits, scores).tolist()
    for kw in (dict(batch_size=32, window=64), dict(batch_size=32, engine="refill"),
               dict(batch_size=7, window=50, engine="refill")):
        many = list(predict_stream(ckpt, iter(lines), rule, "cpu", stats=PredictStats(ckpt.model.num_layers), **kw))
        assert [r.index for r in many] == list(range(len(lines)))
        for a, b in zip(one, many):
            assert (a.label, a.exit_layer) == (b.label, b.exit_layer), (kw, a, b)


def test_learned_sweep_agrees_with_predict(learned_ckpt, learned_export, trained_ckpt, tmp_path):
    data_dir = json.load(open(f"{learned_ckpt}/deebert.json"))["data"]["dataset"]
    rows = [json.loads(l) for l in open(f"{data_dir}/validation.jsonl")]
    texts = [row["text"] for row in rows]
    ckpt = load_checkpoint(learned_ckpt)
    _, scores = _scores_and_logits(ckpt, texts)
    thr = round(_gap_threshold(scores), 6)
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    r = runner.invoke(app, ["analyze", "--checkpoint", learned_ckpt, "--learned-thresholds", f"0,{thr},1",
                            "--timing-repeats", "1", "--json", str(out), "--plot", str(png), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "learned-exit sweep" in r.stdout and "patience sweep" in r.stdout and "threshold sweep" in r.stdout
    a = json.loads(out.read_text())
    assert [s["threshold"] for s in a["learned_sweep"]] == [0.0, thr, 1.0]
    assert a["learned_sweep"][-1]["histogram"][-1] == len(rows)  # nobody's score exceeds 1
    s = a["learned_sweep"][1]
    for runtime, path in (("torch", learned_ckpt), ("onnx", learned_export)):
        p = runner.invoke(app, ["predict", "--checkpoint", path, "--exit-policy", "learned", "--threshold", str(thr),
                                "--format", "jsonl", "--device", "cpu", "--batch-size", "8", "--runtime", runtime],
                          input="\n".join(texts) + "\n")
        assert p.exit_code == 0, p.output
        preds = [json.loads(l) for l in p.stdout.splitlines()]
        hist = [0] * a["model"]["layers"]
        for x in preds:
            hist[x["exit_layer"] - 1] += 1
        assert hist == s["histogram"], runtime
        assert sum(x["label"] == row["label"] for x, row in zip(preds, rows)) / len(rows) == pytest.approx(s["accuracy"])
    # a checkpoint without learned exits says how to get them
    r = runner.invoke(app, ["predict", "--checkpoint", trained_ckpt, "--exit-policy", "learned", "--device", "cpu"],
                      input="good\n")
    assert r.exit_code == 2 and "--learned-exits" in r.output


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_policy_streams_and_loses_nothing(runtime, request):
    from deebert_cli.core.runtime.rules import ExitRule, PatienceRule

    ckpt = load_runtime(runtime, request, "learned_ckpt", "learned_export")
    L = ckpt.model.num_layers
    source = mixed_lines(50) + ["", "   "]
    consumed = 0

    def lines():
        nonlocal consumed
        for k in range(600):
            consumed += 1
            yield source[k % len(source)]

    for rule in (ExitRule([0.3] * L), PatienceRule(1), LearnedRule(0.6)):
        for engine in ("shrink", "refill"):
            consumed = 0
            got = predict_stream(ckpt, lines(), rule, "cpu", batch_size=16, window=64, engine=engine)
            for k, r in enumerate(got):
                assert r.index == k and r.empty == (not source[k % len(source)].strip())
                if k == 0:
                    assert consumed <= 64, (rule, engine)  # output starts after the first window
            assert k == 599
