"""Nothing lost, nothing silent: per-layer thresholds, exports of models that take no token type ids,
and the CLI's output to files and pipes (and on Ctrl-C), each through the CLI."""
import json
import shutil

import pytest

from conftest import invoke, one_line_error
from deebert_cli.cli.app import app





# 6. per-layer thresholds: exactly L-1, never one dropped unseen --------------------------------------
def test_thresholds_for_every_layer_are_refused_not_cut(trained_ckpt):
    """A 4-layer model takes 3 thresholds (layers 1..3; the last always exits): a 4th was dropped
    silently, and is now refused in one line that says why."""
    r = invoke("predict", "--checkpoint", trained_ckpt, "--thresholds", "0,0,1,0.5", "--device", "cpu", input="good film\n")
    one_line_error(r, "--thresholds", "needs 3 values", "got 4", "the last layer always exits")
    r = invoke("predict", "--checkpoint", trained_ckpt, "--thresholds", "0,0,1", "--format", "jsonl", "--device", "cpu",
               input="good film\n")
    assert r.exit_code == 0 and json.loads(r.stdout)["exit_layer"] == 3


def test_stored_thresholds_follow_the_same_rule(trained_ckpt, tmp_path):
    """Thresholds stored in deebert.json are read by the same rule: a wrong count (here one for every
    layer) is one error line naming the file, not a value dropped (or a layer padded with 0)."""
    from deebert_cli.core.errors import UserError
    from deebert_cli.core.model.checkpoint import load_checkpoint
    from deebert_cli.core.runtime.rules import resolve_rule

    ck = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ck)
    meta = json.loads((ck / "deebert.json").read_text())
    meta["thresholds"] = {"entropy": "normalized", "values": [0.0, 0.0, 1.0]}
    (ck / "deebert.json").write_text(json.dumps(meta))
    rule, src = resolve_rule(load_checkpoint(ck), None, None, "normalized")
    assert rule.thresholds == [0.0, 0.0, 1.0, 0.0] and "stored" in src
    for values in ([0.0, 0.0, 1.0, 0.5], [0.0, 1.0]):
        meta["thresholds"]["values"] = values
        (ck / "deebert.json").write_text(json.dumps(meta))
        r = invoke("predict", "--checkpoint", ck, "--device", "cpu", input="good film\n")
        one_line_error(r, "deebert.json", "needs 3 values", f"got {len(values)}")
    # what analyze times (and then stores) goes through it too
    from deebert_cli.core.runtime.rules import per_layer_thresholds

    assert per_layer_thresholds([0.1, 0.2, 0.3], 4) == [0.1, 0.2, 0.3, 0.0]
    with pytest.raises(UserError, match="needs 3 values"):
        per_layer_thresholds([0.1, 0.2, 0.3, 0.4], 4)


# 8. models that take no token type ids, with tokenizers that emit them, export and predict ------------
@pytest.mark.parametrize("family", ["deberta-v2", "distilbert"])
def test_export_and_predict_a_model_without_token_type_ids(family, tmp_path):
    """DeBERTa-v3 style (type_vocab_size 0, its tokenizer emits token type ids) and DistilBERT saved with a
    BERT tokenizer: `deebert export` failed with ONNX Runtime's "Invalid input name: token_type_ids"
    traceback. Now the graph takes what the model reads, and the onnx runtime predicts as torch does, pairs
    included."""
    pytest.importorskip("onnxruntime", reason="the onnx runtime needs pip install 'deebert-cli[onnx]'")
    pytest.importorskip("onnx", reason="deebert export needs pip install 'deebert-cli[onnx]'")
    from conftest import make_data_dir, make_family_backbone, mixed_lines

    bb = make_family_backbone(tmp_path, family)
    assert "token_type_ids" in json.loads((tmp_path / f"tiny-{family}" / "tokenizer_config.json").read_text()).get(
        "model_input_names", ["token_type_ids"])
    ck = tmp_path / "ck"
    r = invoke("finetune", "--model", bb, "--dataset", make_data_dir(tmp_path, 48, 16), "--output", ck,
               "--max-steps", 2, "--batch-size", 16, "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = invoke("export", "--checkpoint", ck)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert json.loads((ck / "onnx" / "manifest.json").read_text())["inputs"] == {"token_type_ids": False}
    lines = "\n".join(mixed_lines(12, seed=5) + ["good film\tbad awful dull", "bad plot\tgreat cast"]) + "\n"
    got = {}
    for runtime in ("torch", "onnx"):
        r = invoke("predict", "--checkpoint", ck, "--runtime", runtime, "--threshold", 0, "--format", "jsonl",
                   "--all-probs", input=lines)
        assert r.exit_code == 0, r.output
        got[runtime] = [json.loads(l) for l in r.stdout.splitlines()]
    assert [g["label"] for g in got["onnx"]] == [g["label"] for g in got["torch"]]
    for a, b in zip(got["onnx"], got["torch"]):
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4)


# 16. analyze's time in words; output to files and pipes; Ctrl-C in finetune ------------------------
@pytest.fixture(scope="module")
def slower_analyze(trained_ckpt):
    """`deebert analyze --per-layer` whose early-exit timed runs took 1.4927x as long as full depth (a
    loaded machine), printed to CliRunner's stdout: a pipe, not a terminal."""
    import deebert_cli.core.analysis.report as report

    real = report.time_runs

    def slower(*args):
        seconds, acc, spread = real(*args)
        return ({k: (v if k == 0.0 else seconds[0.0] * 1.4927) for k, v in seconds.items()}, acc,
                {k: 0.0 for k in spread})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "time_runs", slower)
        r = invoke("analyze", "--checkpoint", trained_ckpt, "--per-layer", "--timing-repeats", 1, "--device", "cpu")
    assert r.exit_code == 0, r.output
    return r.stdout


def test_analyze_says_more_time_when_it_got_slower(slower_analyze):
    lines = [l for l in slower_analyze.splitlines() if "time (measured" in l]
    assert len(lines) == 2 and all("49.27% more time" in l for l in lines), lines
    assert "-49.27%" not in " ".join(lines) and "less time" not in " ".join(lines)


def test_tables_keep_whole_headers_in_a_pipe(slower_analyze):
    """At rich's default 80 columns a file or pipe got "thres…" and "accur…" headers."""
    assert "…" not in slower_analyze
    header = next(l for l in slower_analyze.splitlines() if "threshold" in l and "┃" in l)
    for name in ("threshold", "accuracy", "Δ points", "mean exit", "layer saving", "wall saving", "exits at layers 1..L"):
        assert name in header, header
    # and sentences are not broken at column 80
    assert any(l.startswith("recommended threshold") and l.rstrip().endswith("runtime)") for l in slower_analyze.splitlines())


def test_progress_to_a_pipe_is_a_line_per_start_and_end(capsys, monkeypatch):
    """Not on a terminal, rich drew the bars of every earlier task again at each stop (train-exits tries
    several recipes): now one line when a task starts and one when it ends, no bars."""
    from deebert_cli.cli.common import RichProgress

    monkeypatch.delenv("DEEBERT_NO_PROGRESS", raising=False)
    p = RichProgress()
    for name, n in (("stage 2: off-ramps (cls)", 3), ("stage 2: off-ramps (mean+norm)", 2)):
        p.start(name, n)
        for _ in range(n):
            p.update(1, loss=0.5, ex_s=100.0)
        p.stop()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and not any("━" in l or "…" in l for l in lines), lines
    assert lines[0] == "stage 2: off-ramps (cls): 3 steps"
    assert lines[1].startswith("stage 2: off-ramps (cls): 3/3 steps, loss 0.5000, 100 ex/s, ")
    assert lines[2] == "stage 2: off-ramps (mean+norm): 2 steps"
    monkeypatch.setenv("DEEBERT_NO_PROGRESS", "1")  # and nothing at all when asked
    p.start("quiet", 1), p.update(1), p.stop()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("save_every", [None, "2"])
def test_finetune_interrupted_says_what_a_rerun_does(save_every, tiny_backbone, tmp_path, monkeypatch):
    """Ctrl-C in finetune: with --save-every state the line says that rerunning the same command resumes,
    and from which step; without it, that a rerun starts over, and which flag makes a run resumable."""
    from conftest import make_data_dir
    from deebert_cli.cli.common import RichProgress

    real = RichProgress.update

    def ctrl_c_at_step_3(self, advance=1, **fields):
        real(self, advance, **fields)
        self.steps = getattr(self, "steps", 0) + ("loss" in fields)
        if self.steps == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(RichProgress, "update", ctrl_c_at_step_3)
    out = tmp_path / "ck"
    args = ["finetune", "--model", tiny_backbone, "--dataset", make_data_dir(tmp_path), "--output", out, "--epochs", 1,
            "--batch-size", 16, "--device", "cpu"] + (["--save-every", save_every] if save_every else [])
    r = invoke(*args)
    assert r.exit_code == 130 and "Traceback" not in r.output, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("interrupted: no new checkpoint was written") and not out.exists()
    if save_every:
        assert "rerun the same command to resume from step 2" in last, last
        monkeypatch.setattr(RichProgress, "update", real)
        r = invoke(*args)  # and it does
        assert r.exit_code == 0 and "resumed from step 2" in r.output, r.output
    else:
        assert "no training state was saved, so rerunning starts over" in last and "--save-every" in last, last
