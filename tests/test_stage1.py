"""Stage 1 for long runs: per-epoch evaluation and the best epoch kept, resume after SIGKILL (same final
weights), gradient accumulation, TensorBoard logging, early stopping."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import make_data_dir, make_tiny_backbone
from deebert_cli.cli.app import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]

# Runs a deebert command, SIGKILLing itself right after its KILL_AFTER_SAVES-th saved training state
# (KILL_IN_SAVE: in the middle of writing that state instead, after its model file).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import deebert_cli.core.train.stage1 as stage1
    import deebert_cli.core.train.state as train_state

    limit, in_save, count = int(os.environ["KILL_AFTER_SAVES"]), bool(os.environ.get("KILL_IN_SAVE")), [0]
    save_state, save_file = stage1.save_state, train_state.save_file

    def counting(*args, **kwargs):
        count[0] += 1
        path = save_state(*args, **kwargs)
        if count[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def half_written(tensors, path, *args, **kwargs):
        save_file(tensors, path, *args, **kwargs)
        if count[0] >= limit and path.endswith("model.safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)

    stage1.save_state = counting
    if in_save:
        train_state.save_file = half_written
    from deebert_cli.cli.app import main
    sys.argv = ["deebert", *sys.argv[1:]]
    main()
""")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def env(**extra):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", DEEBERT_NO_PROGRESS="1",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)


def weights(ckpt) -> dict:
    return load_file(str(Path(ckpt) / "model.safetensors"))


def epochs_of(ckpt) -> list:
    rows = json.loads((Path(ckpt) / "deebert.json").read_text())["metrics"]["finetune_epochs"]
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage1")
    return tmp, make_tiny_backbone(tmp), make_data_dir(tmp, n_train=120, n_val=40)


# 4 epochs of 8 updates (120 rows, batch 16), dropout on, length-grouped batches, warmup
RUN = ["--epochs", 4, "--lr", 3e-3, "--batch-size", 16, "--device", "cpu"]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    tmp, bb, data = setup
    out = tmp / "straight"
    r = invoke("finetune", "--model", bb, "--dataset", data, "--output", out, *RUN)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("every,saves,in_save", [("3", 2, False), ("1 epoch", 2, False), ("5", 2, True)],
                         ids=["steps", "epochs", "killed-while-saving"])
def test_sigkill_then_resume_gives_the_same_weights(setup, uninterrupted, every, saves, in_save):
    tmp, bb, data = setup
    out = tmp / f"killed-{every.replace(' ', '')}-{in_save}"
    args = ["finetune", "--model", bb, "--dataset", data, "--output", out, *RUN, "--save-every", every]
    killer = tmp / "killer.py"
    killer.write_text(KILLER)
    extra = dict(KILL_AFTER_SAVES=str(saves), **({"KILL_IN_SAVE": "1"} if in_save else {}))
    r = subprocess.run([sys.executable, str(killer), *map(str, args)], env=env(**extra), capture_output=True,
                       text=True, timeout=300, cwd=tmp)
    assert r.returncode == -9, r.stdout + r.stderr  # really killed
    assert not out.exists()  # no checkpoint yet
    state = Path(f"{out}.train-state")
    done = sorted(p.name for p in state.iterdir() if p.name.startswith("step-"))
    assert len(done) == 1  # the newest complete state; older ones removed
    if in_save:  # the half-written second state is not taken for a complete one
        assert any(p.name.startswith(".tmp-") for p in state.iterdir()) and done == ["step-000000005"]

    r = invoke(*args)  # same options: resumes by itself and says so
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.output and "resumed from step" in r.output
    assert not state.exists()  # a finished run leaves no state behind
    a, b = weights(uninterrupted), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert epochs_of(uninterrupted) == epochs_of(out)


def test_resume_with_other_options_is_refused(setup):
    tmp, bb, data = setup
    out = tmp / "other-options"
    killer = tmp / "killer.py"
    killer.write_text(KILLER)
    args = ["finetune", "--model", bb, "--dataset", data, "--output", out, *RUN, "--save-every", "2"]
    r = subprocess.run([sys.executable, str(killer), *map(str, args)], env=env(KILL_AFTER_SAVES="1"),
                       capture_output=True, text=True, timeout=300, cwd=tmp)
    assert r.returncode == -9
    r = invoke(*args, "--lr", 1e-3, "--grad-accum", 2)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("error:")
    assert "--lr" in r.output and "--grad-accum" in r.output and "train-state" in r.output
    assert Path(f"{out}.train-state").is_dir()  # nothing lost


def no_dropout_backbone(tmp) -> str:
    bb = make_tiny_backbone(tmp, name="nodrop")
    cfg_path = Path(bb) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg_path.write_text(json.dumps(cfg))
    return bb


def test_grad_accum_2x8_equals_batch_16_first_update(tmp_path):
    bb = no_dropout_backbone(tmp_path)  # dropout masks would differ between one pass of 16 and two of 8
    data = make_data_dir(tmp_path, n_train=120, n_val=20)
    got = {}
    for name, flags in {"b16": ["--batch-size", 16], "b8x2": ["--batch-size", 8, "--grad-accum", 2],
                        "b8": ["--batch-size", 8]}.items():
        out = tmp_path / name
        r = invoke("finetune", "--model", bb, "--dataset", data, "--output", out, "--max-steps", 1,
                   "--warmup-ratio", 0, "--lr", 1e-2, "--device", "cpu", *flags)
        assert r.exit_code == 0, r.output
        got[name] = weights(out)
    from transformers import AutoModelForSequenceClassification

    init = AutoModelForSequenceClassification.from_pretrained(bb).state_dict()
    moved = [k for k in got["b16"] if k in init and not torch.equal(init[k], got["b16"][k])]
    assert len(moved) > 10  # the update really changed the encoder
    # Adam's first step is lr * g / (|g| + eps): summation-order noise in a near-zero gradient can move an
    # element by ~1e-6 at lr 1e-2; a different batch moves elements by ~lr
    for k in got["b16"]:
        assert torch.allclose(got["b16"][k], got["b8x2"][k], atol=1e-5, rtol=0), k
    assert max(float((got["b16"][k] - got["b8"][k]).abs().max()) for k in moved) > 1e-3


def test_tensorboard_event_file_is_written(setup):
    pytest.importorskip("tensorboard", reason="needs the [tensorboard] extra: pip install 'deebert-cli[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, bb, data = setup
    out, logs = tmp / "tb", tmp / "tb-logs"
    r = invoke("finetune", "--model", bb, "--dataset", data, "--output", out, "--epochs", 2, "--batch-size", 16,
               "--device", "cpu", "--report-to", "tensorboard", "--logging-dir", logs)
    assert r.exit_code == 0, r.output
    events = list(logs.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(logs))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/accuracy"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 17))  # every optimizer step
    assert len(acc.Scalars("eval/accuracy")) == 2  # every epoch


def test_report_to_a_missing_package_is_one_line(setup, monkeypatch):
    import importlib.util

    tmp, bb, data = setup
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    r = invoke("finetune", "--model", bb, "--dataset", data, "--output", tmp / "wb", "--device", "cpu",
               "--report-to", "wandb")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "pip install 'deebert-cli[wandb]'" in r.output
    assert not (tmp / "wb").exists()
    r = invoke("finetune", "--model", bb, "--dataset", data, "--output", tmp / "wb", "--report-to", "mlflow")
    assert r.exit_code == 2 and "--report-to must be one of" in r.output


def test_early_stopping_stops(setup):
    tmp, bb, data = setup
    common = ["--model", bb, "--dataset", data, "--epochs", 6, "--batch-size", 16, "--lr", 1e-9, "--device", "cpu"]
    r = invoke("finetune", *common, "--output", tmp / "es", "--early-stopping-patience", 2)
    assert r.exit_code == 0, r.output
    rows = epochs_of(tmp / "es")
    # lr 1e-9 changes nothing the evaluation sees: epoch 1 stays best, epochs 2 and 3 do not improve
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert "early stopping" in r.output
    meta = json.loads((tmp / "es" / "deebert.json").read_text())
    assert meta["metrics"]["finetune_best_epoch"] == 1
    r = invoke("finetune", *common, "--output", tmp / "no-es")
    assert r.exit_code == 0, r.output
    assert len(epochs_of(tmp / "no-es")) == 6


def test_every_epoch_is_evaluated_and_the_best_kept(setup, uninterrupted):
    from test_distributed import single_process_eval

    rows = epochs_of(uninterrupted)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and [r["step"] for r in rows] == [8, 16, 24, 32]
    meta = json.loads((uninterrupted / "deebert.json").read_text())
    best = max(rows, key=lambda r: r["accuracy"])  # first of the best on ties
    assert meta["metrics"]["finetune_best_epoch"] == best["epoch"]
    assert meta["metrics"]["finetune"]["accuracy"] == best["accuracy"]
    n, acc = single_process_eval(str(uninterrupted))  # the saved weights are the best epoch's
    assert acc == best["accuracy"]


@pytest.mark.parametrize("task,scores,best", [("classification", [0.9, 0.5, 0.9, 0.7], 1),
                                               ("regression", [0.5, 0.2, 0.3, 0.2], 2)])
def test_the_best_epochs_weights_are_the_ones_saved(setup, monkeypatch, task, scores, best):
    """Scripted evaluation figures (accuracy, or MSE: lower is better; ties keep the earlier epoch): the
    checkpoint holds the weights the model had after the best epoch, not after the last."""
    from deebert_cli.core.config import FinetuneConfig
    from deebert_cli.core.train import stage1

    tmp, bb, data = setup
    snapshots, calls = [], iter(scores)
    real = stage1._Stage1.evaluate

    def scripted(self):
        report = real(self)
        snapshots.append({k: v.clone() for k, v in self.model.model.state_dict().items()})
        x = next(calls)
        if task == "regression":
            report.regression = {"mse": x, "pearson": 0.0, "spearman": 0.0}
        else:
            report.accuracy = x
        return report

    monkeypatch.setattr(stage1._Stage1, "evaluate", scripted)
    out = tmp / f"best-{task}"
    kw = dict(label_column="score") if task == "regression" else {}
    stage1.finetune(FinetuneConfig(model=bb, dataset=data, output=str(out), epochs=4, lr=3e-3, batch_size=16,
                                   device="cpu", task=task, **kw))
    saved = weights(out)
    assert all(torch.equal(saved[k], snapshots[best - 1][k]) for k in saved)
    assert not all(torch.equal(saved[k], snapshots[-1][k]) for k in saved)
    meta = json.loads((out / "deebert.json").read_text())
    assert meta["metrics"]["finetune_best_epoch"] == best and len(meta["metrics"]["finetune_epochs"]) == 4


def test_save_every_syntax():
    from deebert_cli.core.config import FinetuneConfig

    assert FinetuneConfig(save_every="200").save_every_parsed() == (200, "steps")
    assert FinetuneConfig(save_every="50 steps").save_every_parsed() == (50, "steps")
    assert FinetuneConfig(save_every="epoch").save_every_parsed() == (1, "epochs")
    assert FinetuneConfig(save_every="2epochs").save_every_parsed() == (2, "epochs")
    assert FinetuneConfig(save_every=3).save_every_parsed() == (3, "steps")  # from YAML
    for bad in ("0", "soon", "-1", "1.5 epochs"):
        with pytest.raises(ValueError, match="--save-every"):
            FinetuneConfig(save_every=bad)


def test_resume_under_accelerate_launch(setup):
    """2 CPU processes (gloo, DDP) with gradient accumulation: killed (every process SIGKILLs itself after
    the second saved state), relaunched with the same options: the same final weights as a straight run."""
    pytest.importorskip("accelerate", reason="needs the [distributed] extra: pip install 'deebert-cli[distributed]'")
    from test_distributed import _free_port, launch

    tmp, bb, data = setup
    killer = tmp / "killer.py"
    killer.write_text(KILLER)
    opts = ["--model", bb, "--dataset", data, "--epochs", 3, "--batch-size", 8, "--grad-accum", 2, "--lr", 3e-3,
            "--save-every", 3]
    launch(tmp, "finetune", *opts, "--output", tmp / "ddp-straight")
    out = tmp / "ddp-resumed"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), str(killer), "finetune", *map(str, opts), "--output", str(out), "--device", "cpu"]
    r = subprocess.run(cmd, env=env(KILL_AFTER_SAVES="2", HF_HOME=str(tmp / "hf-home")), capture_output=True,
                       text=True, timeout=300, cwd=tmp)
    assert r.returncode != 0 and not out.exists()
    state = Path(f"{out}.train-state")
    (done,) = [p for p in state.iterdir() if p.name.startswith("step-")]
    assert done.name == "step-000000006" and {p.name for p in done.glob("rng-*")} == {"rng-0.safetensors", "rng-1.safetensors"}
    r = invoke("finetune", *opts, "--output", out, "--device", "cpu")  # one process cannot take it over
    assert r.exit_code == 2 and "written by 2 process(es)" in r.output and state.is_dir()
    r = launch(tmp, "finetune", *opts, "--output", out)
    assert "resuming from" in r.stdout + r.stderr
    a, b = weights(tmp / "ddp-straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert epochs_of(tmp / "ddp-straight") == epochs_of(out)


def test_wandb_offline_run_is_written(setup):
    pytest.importorskip("wandb", reason="needs the [wandb] extra: pip install 'deebert-cli[wandb]'")
    tmp, bb, data = setup
    logs = tmp / "wandb-logs"
    r = subprocess.run([sys.executable, "-m", "deebert_cli", "finetune", "--model", bb, "--dataset", data,
                        "--output", str(tmp / "wb-ok"), "--epochs", "1", "--device", "cpu", "--report-to", "wandb",
                        "--logging-dir", str(logs)],
                       env=env(WANDB_MODE="offline", WANDB_SILENT="true"), capture_output=True, text=True,
                       timeout=300, cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list(logs.glob("wandb/offline-run-*/run-*.wandb"))) == 1
