"""The static engine (issue 29: static shapes, late decisions, refill at B), run eagerly on the CPU: the
same labels and exit layers as the default engine for every exit policy, batch size and decision lag;
scripted exits; the bucket rules; the rule of ``--engine auto``; and the GPU benchmark at tiny size.
The same checks with CUDA graphs captured are in tests/test_cuda.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import mixed_lines
from test_predict import all_exit_entropies, spread_threshold

from deebert_cli.cli.app import app
from deebert_cli.core.data.encoding import encode
from deebert_cli.core.model.checkpoint import load_checkpoint
from deebert_cli.core.runtime.engine import EarlyExitEngine
from deebert_cli.core.runtime.rules import ExitRule, LearnedRule, PatienceRule
from deebert_cli.core.runtime.static_engine import StaticEngine, length_bucket, plan_engine, row_bucket
from deebert_cli.core.runtime.stream import predict_stream

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def learned_ckpt(trained_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("learned-static") / "ckpt")
    r = runner.invoke(app, ["train-exits", "--checkpoint", trained_ckpt, "--output", out, "--learned-exits",
                            "--ramp-pooling", "cls", "--epochs", "10", "--lr", "3e-3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return out


def rules(ckpt, lines) -> dict:
    """One rule of each policy, set so that exits fire at several layers."""
    from deebert_cli.core.model.policies import patience_exit
    from deebert_cli.core.runtime.passes import collect

    ent = all_exit_entropies(ckpt, lines)
    enc = encode(ckpt.tokenizer, lines, None, 128)
    logits = collect(ckpt.model, enc, ckpt.tokenizer.pad_token_id, 16, "cpu", pooled=False, all_logits=True)["logits"]
    n = max(range(1, ckpt.model.num_layers), key=lambda k: len(set(patience_exit(logits, k).tolist())))
    return {"entropy": ExitRule([spread_threshold(ent)] * ckpt.model.num_layers), "patience": PatienceRule(n)}


def answers(eng, ids) -> list:
    """(label, exit layer) per row of ``ids`` through ``eng`` as one batch."""
    layer, logits, _ = eng.run_rows(ids)
    return list(zip(logits.argmax(-1).tolist(), layer.tolist()))


def test_buckets():
    assert [row_bucket(n, 32) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert row_bucket(20, 24) == 24  # B itself is the top bucket when it is no power of two
    assert [length_bucket(w, 128) for w in (1, 8, 9, 33, 64, 65, 128)] == [8, 8, 16, 64, 64, 128, 128]
    assert length_bucket(100, 96) == 100  # never shorter than the row
    assert length_bucket(70, 512) == 128 and length_bucket(130, 512) == 192


@pytest.mark.parametrize("policy", ["entropy", "patience", "learned"])
def test_static_engine_gives_the_default_engines_answers(trained_ckpt, learned_ckpt, policy):
    """Buckets, static buffers, late decisions (lag 0, 1, 2) and refill at B (1, 8, 32): the labels and exit
    layers of the default (shrink) engine, for every policy; with a lag, rows are computed past their exit."""
    path = learned_ckpt if policy == "learned" else trained_ckpt
    ckpt = load_checkpoint(path)
    lines = mixed_lines(120, seed=11)
    rule = LearnedRule(0.7) if policy == "learned" else rules(ckpt, lines)[policy]
    ids = encode(ckpt.tokenizer, lines, None, 128).input_ids
    want = answers(EarlyExitEngine(ckpt, rule, "cpu", 32), ids)
    if policy != "learned":
        assert len({layer for _, layer in want}) >= 2, "exits must fire at several layers"
    for B, lag in ((1, 0), (1, 1), (8, 0), (8, 1), (32, 2)):
        eng = StaticEngine(ckpt, rule, "cpu", B, lag=lag)
        assert answers(eng, ids) == want, (B, lag)
        rep = eng.graph_report()
        assert rep["graphs"] == 0 and rep["steps"] >= ckpt.model.num_layers and rep["buffer_bytes"] > 0
        assert all(r <= B and (r & (r - 1) == 0) for _, r, _ in rep["buckets"])
        if lag and any(layer < ckpt.model.num_layers - 1 for _, layer in want):
            assert rep["wasted_rows"] > 0  # decisions did arrive late, and the answers did not change


# what a CUDA graph capture refuses: a tensor made from host values, a value read back to the host
UNCAPTURABLE = ("aten.lift_fresh", "aten._local_scalar_dense")  # (on the CPU, SDPA and dtype casts make
# scalar_tensor and _to_copy ops a CUDA capture takes)


@pytest.mark.parametrize("policy", ["entropy", "patience", "learned"])
def test_a_static_step_does_nothing_a_cuda_graph_capture_refuses(trained_ckpt, learned_ckpt, policy, monkeypatch):
    """Checked on the CPU: every op of every static step (layer, mask, off-ramp, entropy, decision), as
    transformers runs it under a capture (no mask-skipping test of the data), is capturable."""
    import transformers.utils.import_utils as iu
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    ckpt = load_checkpoint(learned_ckpt if policy == "learned" else trained_ckpt)
    lines = mixed_lines(24, seed=11)
    rule = LearnedRule(0.7) if policy == "learned" else rules(ckpt, lines)[policy]
    eng = StaticEngine(ckpt, rule, "cpu", 8)
    eng.run_rows(encode(ckpt.tokenizer, lines, None, 128).input_ids)
    monkeypatch.setattr(iu, "is_cuda_stream_capturing", lambda: True)
    for (i, _, _), st in eng.steps.items():
        with torch.no_grad(), Ops() as ops:
            eng._static_step(i, st)
        bad = [op for op in ops.seen if op.startswith(UNCAPTURABLE)]
        assert not bad, (i, bad)


def test_padding_rows_and_columns_never_change_an_answer(trained_ckpt):
    """A row alone (bucket 1 x its own length bucket) == the same row among others of other lengths."""
    ckpt = load_checkpoint(trained_ckpt)
    lines = mixed_lines(40, seed=3)
    rule = ExitRule([spread_threshold(all_exit_entropies(ckpt, lines))] * ckpt.model.num_layers)
    ids = encode(ckpt.tokenizer, lines, None, 128).input_ids
    together = StaticEngine(ckpt, rule, "cpu", 16).run_rows(ids)
    alone = [StaticEngine(ckpt, rule, "cpu", 1).run_rows([r]) for r in ids[:8]]
    for j, (layer, logits, _) in enumerate(alone):
        assert layer[0] == together[0][j]
        np.testing.assert_allclose(logits[0], together[1][j], atol=1e-5)


def test_predict_stream_with_the_static_engine(trained_ckpt):
    ckpt = load_checkpoint(trained_ckpt)
    lines = mixed_lines(60, seed=7)
    lines[5] = ""
    rule = ExitRule([spread_threshold(all_exit_entropies(ckpt, [x for x in lines if x]))] * ckpt.model.num_layers)
    want = list(predict_stream(ckpt, lines, rule, "cpu", batch_size=8))
    got = list(predict_stream(ckpt, lines, rule, "cpu", batch_size=8, engine="static"))
    assert [r.index for r in got] == list(range(len(lines))) and got[5].empty
    assert [(a.label, a.exit_layer) for a in got] == [(b.label, b.exit_layer) for b in want]
    auto = list(predict_stream(ckpt, lines, rule, "cpu", batch_size=8, engine="auto"))  # the CPU: shrink
    assert [(a.label, a.exit_layer) for a in auto] == [(b.label, b.exit_layer) for b in want]


def test_scripted_exits_force_the_exit_layers(trained_ckpt):
    """ScriptedPolicy (the benchmark's timing mode) in both engines: each row leaves at its scripted layer."""
    from collections import deque

    from deebert_cli.core.model.policies import ScriptedPolicy

    ckpt = load_checkpoint(trained_ckpt)
    L = ckpt.model.num_layers
    ids = encode(ckpt.tokenizer, mixed_lines(30, seed=2), None, 128).input_ids
    script = [k % L for k in range(len(ids))]
    rule = ExitRule([1e-9] * L)  # every check runs, nobody would leave
    for eng in (EarlyExitEngine(ckpt, rule, "cpu", 8), StaticEngine(ckpt, rule, "cpu", 8, lag=0),
                StaticEngine(ckpt, rule, "cpu", 8, lag=1)):
        eng.policy = ScriptedPolicy(eng.policy, deque(script))
        layer, _, _ = eng.run_rows(ids)
        assert layer.tolist() == script


def test_the_rule_of_engine_auto():
    assert plan_engine({}, "cpu", 32).engine == "shrink"
    plan = plan_engine({}, torch.device("cuda"), 32)
    assert (plan.engine, plan.full_depth, plan.note) == ("static", False, None)
    meta = {"gpu_measurement": {"fp32": {"1": 1.4, "32": 0.8, "256": 1.1}}}
    assert not plan_engine(meta, "cuda", 1).full_depth
    slow = plan_engine(meta, "cuda", 40)  # the nearest measured batch size is 32
    assert slow.full_depth and "cannot pay" in slow.note and "\n" not in slow.note
    assert not plan_engine(meta, "cuda", 40, "bf16").full_depth  # nothing measured for bf16


def test_the_gpu_benchmark_runs_on_the_cpu(trained_ckpt, tmp_path):
    """bench_gpu.py --device cpu --quick: every row of both models, the graph report and the step profile."""
    data = tmp_path / "data"
    data.mkdir()
    ckpt = load_checkpoint(trained_ckpt)
    rows = [{"text": t, "label": ckpt.label_names[k % 2]} for k, t in enumerate(mixed_lines(24, seed=1))]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--checkpoint", trained_ckpt,
                        "--data", str(data), "--device", "cpu", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    for model in ("checkpoint", "bert-base shape, scripted exits"):
        rows = got["models"][model]["results"]["fp32 b4"]
        assert {"eager", "full graphs", "threshold 0", "static, threshold 0", "static engine", "old engine"} <= set(rows)
        assert rows["static engine"]["exit_layers_differ"] == 0
    assert got["models"]["checkpoint"]["graphs"]["fp32 b4"]["steps"] > 0
    assert "profile" in got and "layer step" in r.stdout
    assert set(got["gpu_measurement"]["fp32"]) == {"1", "4"}  # what --engine auto reads, by batch size


def test_predict_engine_auto_and_static_on_the_cpu(trained_ckpt):
    """--engine auto on a CPU is shrink, as before; --engine static gives the same lines."""
    got = {}
    for engine in ("shrink", "auto", "static"):
        r = runner.invoke(app, ["predict", "--checkpoint", trained_ckpt, "--device", "cpu", "--engine", engine,
                                "--format", "jsonl", "--batch-size", "4"], input="good fun\n\nbad dull plot\nfine\n")
        assert r.exit_code == 0, r.output
        got[engine] = r.stdout
    assert got["auto"] == got["shrink"] == got["static"]
