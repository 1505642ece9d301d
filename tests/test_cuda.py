"""The torch runtime on a CUDA GPU (marker ``cuda``; every test skips on a machine without CUDA).

Run them alone with ``pytest -m cuda``. What they hold to:

* every exit's logits on ``cuda`` equal the CPU's (fp32) within ``TOL`` of the largest CPU logit, for
  every family; bf16 and fp16 autocast within their own, looser, tolerance;
* batch 1 gives the same exits as batch 32 on the GPU (fp32), for every exit policy and both engines,
  and the serving core answers as predict does;
* the static engine with CUDA graphs captured (static shapes, decisions read a step late, refill at B)
  gives the CPU's labels and exit layers for every exit policy, at batch 1 and batch B, run after run,
  and ``--engine auto`` on cuda is that engine; bf16 mostly the fp32 answer;
* ``finetune`` and ``train-exits`` run on ``cuda`` with ``--precision bf16``, and the CLI commands that
  take ``--device`` (predict, analyze) run there.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from conftest import FAMILIES, make_data_dir, mixed_lines, tiny_classifier
from test_predict import all_exit_entropies, spread_threshold

from deebert_cli.cli.app import app
from deebert_cli.core.model.checkpoint import load_checkpoint
from deebert_cli.core.runtime.rules import ExitRule, LearnedRule, PatienceRule
from deebert_cli.core.runtime.stream import PredictStats, predict_stream

# the accelerator under test: cuda, or another torch device (DEEBERT_TEST_DEVICE=mps; =cpu checks the
# tests themselves on a machine without one)
DEV = os.environ.get("DEEBERT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

runner = CliRunner()

# largest |cuda - cpu| over every exit's logits, as a fraction of the largest |cpu logit|. fp32 matrix
# products on the GPU do not use TF32 (torch's default), so fp32 differs from the CPU by summation order
# only; bf16 keeps 8 bits of mantissa (relative error ~4e-3 per operation), fp16 11 bits.
TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2}
HALF = ["bf16", "fp16"] if DEV != "cpu" else ["bf16"]  # fp16 autocast needs an accelerator


def _all_exit_logits(model, ids, mask, device, precision):
    from deebert_cli.core.device import autocast

    model = model.to(device).eval()
    with torch.no_grad(), autocast(torch.device(device), precision):
        return model(ids.to(device), mask.to(device)).float().cpu()


@pytest.mark.parametrize("precision", ["fp32"] + HALF)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_exit_matches_the_cpu(family, precision):
    from deebert_cli.core.model.highway import HighwayModel

    torch.manual_seed(0)
    model = HighwayModel(tiny_classifier(family, layers=4))
    ids = torch.randint(5, 60, (6, 20))
    mask = torch.ones_like(ids)
    mask[3:, 12:] = 0  # padded rows: padding must not reach a real token on either device
    want = _all_exit_logits(model, ids, mask, "cpu", "fp32")  # [L, b, C]
    got = _all_exit_logits(model, ids, mask, DEV, precision)
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
    assert err < TOL[precision], f"{family} {precision}: relative error {err:.2e}"


# ------------------------------------------------------------------------------------------------
# the engines on the GPU
# ------------------------------------------------------------------------------------------------
def _run(ckpt, lines, rule, device=DEV, **kw):
    stats = PredictStats(ckpt.model.num_layers)
    return list(predict_stream(ckpt, iter(lines), rule, device, stats=stats, **kw)), stats


@pytest.fixture(scope="module")
def learned_cuda_ckpt(trained_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("learned-cuda") / "ckpt")
    r = runner.invoke(app, ["train-exits", "--checkpoint", trained_ckpt, "--output", out, "--learned-exits",
                            "--ramp-pooling", "cls", "--epochs", "10", "--lr", "3e-3", "--device", DEV])
    assert r.exit_code == 0, r.output
    return out


def _rules(ckpt, lines):
    """One rule of each policy, set so that exits fire at several layers."""
    from deebert_cli.core.data.encoding import encode
    from deebert_cli.core.model.policies import patience_exit
    from deebert_cli.core.runtime.passes import collect

    ent = all_exit_entropies(ckpt, lines)
    enc = encode(ckpt.tokenizer, lines, None, 128)
    logits = collect(ckpt.model, enc, ckpt.tokenizer.pad_token_id, 16, "cpu", pooled=False, all_logits=True)["logits"]
    n = max(range(1, ckpt.model.num_layers), key=lambda k: len(set(patience_exit(logits, k).tolist())))
    return {"entropy": ExitRule([spread_threshold(ent)] * ckpt.model.num_layers), "patience": PatienceRule(n)}


@pytest.mark.parametrize("policy", ["entropy", "patience", "learned"])
def test_batch_1_equals_batch_32_on_the_gpu(trained_ckpt, learned_cuda_ckpt, policy):
    path = learned_cuda_ckpt if policy == "learned" else trained_ckpt
    ckpt = load_checkpoint(path)
    lines = mixed_lines(200, seed=11)
    rule = LearnedRule(0.7) if policy == "learned" else _rules(ckpt, lines)[policy]
    one, s1 = _run(ckpt, lines, rule, batch_size=1, window=1)
    if policy != "learned":
        assert sum(c > 0 for c in s1.histogram) >= 2, f"exits must fire at several layers: {s1.histogram}"
    cpu, _ = _run(load_checkpoint(path), lines, rule, device="cpu", batch_size=32)
    assert [(a.label, a.exit_layer) for a in one] == [(b.label, b.exit_layer) for b in cpu]
    for kw in (dict(batch_size=32), dict(batch_size=32, engine="refill"), dict(batch_size=7, window=50, engine="refill")):
        many, _ = _run(ckpt, lines, rule, **kw)
        assert [r.index for r in many] == list(range(len(lines)))
        assert [(a.label, a.exit_layer) for a in one] == [(b.label, b.exit_layer) for b in many], kw
        assert max(abs(a.confidence - b.confidence) for a, b in zip(one, many)) < 1e-4


@pytest.mark.parametrize("policy", ["entropy", "patience", "learned"])
def test_static_engine_with_cuda_graphs_equals_the_cpu(trained_ckpt, learned_cuda_ckpt, policy):
    from deebert_cli.core.data.encoding import encode
    from deebert_cli.core.runtime.engine import EarlyExitEngine
    from deebert_cli.core.runtime.static_engine import StaticEngine

    path = learned_cuda_ckpt if policy == "learned" else trained_ckpt
    ckpt = load_checkpoint(path)
    lines = mixed_lines(200, seed=11)
    rule = LearnedRule(0.7) if policy == "learned" else _rules(ckpt, lines)[policy]
    ids = encode(ckpt.tokenizer, lines, None, 128).input_ids

    def answers(eng):
        layer, logits, _ = eng.run_rows(ids)
        return list(zip(logits.argmax(-1).tolist(), layer.tolist()))

    cpu = answers(EarlyExitEngine(load_checkpoint(path), rule, "cpu", 32))
    for B, lag in ((1, 1), (32, 1), (8, 0), (64, 2)):
        eng = StaticEngine(ckpt, rule, DEV, B, lag=lag)
        assert answers(eng) == cpu, (B, lag)
        assert answers(eng) == cpu, (B, lag, "replayed")  # the second run replays the captured graphs
        rep = eng.graph_report()
        if DEV == "cuda":
            assert rep["graphs"] == rep["steps"] > 0 and rep["capture_seconds"] > 0
    got, _ = _run(ckpt, lines, rule, batch_size=32, engine="auto")  # on cuda: the static engine
    assert [(r.label, r.exit_layer) for r in got] == [(l, e + 1) for l, e in cpu]  # Prediction: 1-based layers


def test_static_engine_in_bf16_on_the_gpu(trained_ckpt):
    ckpt = load_checkpoint(trained_ckpt)
    lines = mixed_lines(120, seed=4)
    rule = ExitRule([spread_threshold(all_exit_entropies(ckpt, lines))] * ckpt.model.num_layers)
    want, _ = _run(ckpt, lines, rule, batch_size=32)
    got, _ = _run(ckpt, lines, rule, batch_size=32, engine="static", precision="bf16")
    assert [r.index for r in got] == list(range(len(lines)))
    same = sum((a.label, a.exit_layer) == (b.label, b.exit_layer) for a, b in zip(got, want))
    assert same >= 0.9 * len(lines), f"bf16 static: {same}/{len(lines)} as fp32"


@pytest.mark.parametrize("precision", HALF)
def test_low_precision_predicts_on_the_gpu(trained_ckpt, precision):
    """Autocast on the GPU: both engines give one result per line, in order, mostly the fp32 answer."""
    ckpt = load_checkpoint(trained_ckpt)
    lines = mixed_lines(120, seed=4)
    rule = ExitRule([spread_threshold(all_exit_entropies(ckpt, lines))] * ckpt.model.num_layers)
    want, _ = _run(ckpt, lines, rule, batch_size=32)
    for engine in ("shrink", "refill"):
        got, _ = _run(ckpt, lines, rule, batch_size=32, engine=engine, precision=precision)
        assert [r.index for r in got] == list(range(len(lines)))
        same = sum((a.label, a.exit_layer) == (b.label, b.exit_layer) for a, b in zip(got, want))
        assert same >= 0.9 * len(lines), f"{precision} {engine}: {same}/{len(lines)} as fp32"


def test_serving_core_equals_predict_on_the_gpu(trained_ckpt):
    pytest.importorskip("starlette", reason="needs the serve extra: pip install 'deebert-cli[serve]'")
    from deebert_cli.core.serve.batching import BatchingServer

    ckpt = load_checkpoint(trained_ckpt)
    lines = mixed_lines(60, seed=5)
    rule = ExitRule([spread_threshold(all_exit_entropies(ckpt, lines))] * ckpt.model.num_layers)
    want, _ = _run(ckpt, lines, rule, batch_size=1, window=1)
    srv = BatchingServer(ckpt, rule, DEV, batch_size=4).start()
    try:
        reqs = [srv.submit(lines[k : k + 3]) for k in range(0, len(lines), 3)]
        got = [s.prediction for r in reqs for s in r.future.result(timeout=60)]
    finally:
        assert srv.drain(30)
    assert [(g.label, g.exit_layer) for g in got] == [(w.label, w.exit_layer) for w in want]


# ------------------------------------------------------------------------------------------------
# the commands with --device cuda
# ------------------------------------------------------------------------------------------------
def test_finetune_and_train_exits_on_cuda_bf16(tiny_backbone, tmp_path):
    from safetensors.torch import load_file

    data = make_data_dir(tmp_path, n_train=64, n_val=16)
    out = tmp_path / "ck"
    r = runner.invoke(app, ["finetune", "--model", tiny_backbone, "--dataset", data, "--output", str(out),
                            "--max-steps", 4, "--batch-size", 8, "--precision", "bf16", "--device", DEV])
    assert r.exit_code == 0, r.output
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in load_file(str(out / "model.safetensors")).values())
    r = runner.invoke(app, ["train-exits", "--checkpoint", str(out), "--epochs", 1, "--precision", "bf16",
                            "--device", DEV])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "deebert.json").read_text())["stage"] == "exits_trained"
    r = runner.invoke(app, ["predict", "--checkpoint", str(out), "--device", DEV, "--precision", HALF[-1],
                            "--format", "jsonl"], input="good fun\n\nbad dull plot\n")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["empty"] for x in r.stdout.splitlines()] == [False, True, False]


def test_analyze_on_cuda_equals_the_cpu(trained_ckpt, tmp_path):
    got = {}
    for device in ("cpu", DEV):
        out = tmp_path / f"{device}.json"
        r = runner.invoke(app, ["analyze", "--checkpoint", trained_ckpt, "--device", device, "--json", str(out),
                                "--timing-repeats", "1", "--examples", "0"])
        assert r.exit_code == 0, r.output
        got[device] = json.loads(out.read_text())
    acc = {d: [row.get("accuracy") for row in g["layers"]] for d, g in got.items()}
    # a near-tie may fall the other way on the GPU: at most one row of the 60 per layer
    assert acc["cpu"] == pytest.approx(acc[DEV], abs=1.5 / 60)
