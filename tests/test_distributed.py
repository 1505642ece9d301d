"""Scaling out: `accelerate launch` with 2 CPU processes (gloo), and --precision.

The launched runs are real: two processes, a gloo process group, DDP in stage 1. Each launch costs a few
seconds (two interpreters importing torch + transformers on a small machine)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_data_dir, make_tiny_backbone, mixed_lines
from deebert_cli.cli.app import app

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, *args, processes: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m deebert_cli ARGS --device cpu`: Accelerate's
    torchrun launcher starts the processes; --device cpu makes them a CPU (gloo) group even on a GPU box."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               DEEBERT_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false",
               HF_HOME=str(tmp_path / "hf-home"))  # no user accelerate config leaks in
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "deebert_cli", *map(str, args), "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    if r.returncode != 0:
        noise = ("Loading weights", "Writing model shards")
        err = "\n".join(line for line in r.stderr.splitlines() if not line.startswith(noise))
        pytest.fail(f"launch failed ({r.returncode}): {' '.join(cmd)}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{err[:8000]}")
    return r


def single_process_eval(ckpt_dir: str, all_logits: bool = False) -> tuple:
    """Evaluate a checkpoint in this process on its own evaluation split, with the core's one-pass collect."""
    from deebert_cli.core.model.checkpoint import load_checkpoint
    from deebert_cli.core.data.examples import DataSpec, prepare_data
    from deebert_cli.core.data.encoding import encode
    from deebert_cli.core.metrics import accuracy
    from deebert_cli.core.runtime.passes import collect

    ckpt = load_checkpoint(ckpt_dir)
    data = prepare_data(DataSpec(**ckpt.meta["data"]))
    enc = encode(ckpt.tokenizer, data.eval.texts, data.eval.pairs, ckpt.meta["max_length"])
    got = collect(ckpt.model, enc, ckpt.tokenizer.pad_token_id, 7, "cpu", pooled=False, all_logits=all_logits)
    labels = data.eval.labels
    if all_logits:
        return len(labels), [accuracy(lg.argmax(-1).tolist(), labels) for lg in got["logits"]]
    return len(labels), accuracy(got["final"].argmax(-1).tolist(), labels)


@pytest.fixture(scope="module")
def launched_finetune(tmp_path_factory):
    """Stage 1 under `accelerate launch` with 2 CPU processes; 61 evaluation rows (odd, so shards differ)."""
    tmp = tmp_path_factory.mktemp("launched")
    bb = make_tiny_backbone(tmp)
    data = make_data_dir(tmp, n_train=150, n_val=61)
    out = tmp / "ck"
    r = launch(tmp, "finetune", "--model", bb, "--dataset", data, "--output", out, "--max-steps", 60,
               "--batch-size", 15, "--lr", 3e-3)
    return tmp, out, r


def test_finetune_under_accelerate_launch(launched_finetune):
    tmp, out, r = launched_finetune
    assert r.stdout.count("checkpoint:") == 1  # only the main process reports
    meta = json.loads((out / "deebert.json").read_text())
    assert meta["stage"] == "finetuned"
    saved = yaml_load(out / "finetune_config.yaml")
    assert saved["max_steps"] == 60 and saved["precision"] == "fp32"
    # the checkpoint loads, and the evaluation it reports (gathered over 2 processes, each row once)
    # equals a single-process evaluation of the same checkpoint
    n, acc = single_process_eval(str(out))
    reported = meta["metrics"]["finetune"]
    assert reported["n"] == n == 61
    assert reported["accuracy"] == acc
    assert acc > 0.6  # it learned something, so the comparison is not between two constant predictors


def test_train_exits_under_accelerate_launch(launched_finetune):
    tmp, stage1, _ = launched_finetune
    out = tmp / "exits"
    r = launch(tmp, "train-exits", "--checkpoint", stage1, "--output", out, "--epochs", 4, "--lr", 3e-3)
    assert r.stdout.count("checkpoint:") == 1
    meta = json.loads((out / "deebert.json").read_text())
    assert meta["stage"] == "exits_trained"
    n, per_layer = single_process_eval(str(out), all_logits=True)
    reported = meta["metrics"]["train_exits"]
    assert reported["n"] == n
    assert [row["accuracy"] for row in reported["layers"]] == per_layer
    # backbone and final classifier untouched by stage 2, as in one process
    from safetensors.torch import load_file

    a, b = load_file(str(stage1 / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_predict_equals_one_process(trained_ckpt, tmp_path):
    lines = mixed_lines(41)
    lines[0] = ""  # empty lines anywhere: first, middle, whitespace-only, a run of them, last
    lines[7] = "   "
    lines[19:22] = ["", "", ""]
    lines[-1] = ""
    inp = tmp_path / "in.txt"
    inp.write_bytes(("\n".join(lines[:30]) + "\r\n" + "\n".join(lines[30:]) + "\n").encode())
    # batch size 1 makes every line's arithmetic independent of which lines share its batch, so the
    # two runs must agree to the last printed digit; window 4 makes 3 rounds of gathering + a ragged end
    opts = ["--checkpoint", trained_ckpt, "--input", inp, "--format", "jsonl", "--threshold", 0.3,
            "--batch-size", 1, "--window", 4, "--all-probs"]
    one = runner.invoke(app, ["predict", *map(str, opts), "--output", str(tmp_path / "one.jsonl"), "--device", "cpu"])
    assert one.exit_code == 0, one.output
    r = launch(tmp_path, "predict", *opts, "--output", tmp_path / "two.jsonl")
    expected = (tmp_path / "one.jsonl").read_text().splitlines()
    got = (tmp_path / "two.jsonl").read_text().splitlines()
    assert len(got) == len(lines) == len(expected)
    assert got == expected
    rows = [json.loads(x) for x in got]
    assert [i for i, row in enumerate(rows) if row["empty"]] == [0, 7, 19, 20, 21, 40]
    assert len({row["exit_layer"] for row in rows if not row["empty"]}) > 1  # early exits really happen
    assert "41 line(s), 35 predicted, 6 empty" in r.stderr  # one summary, totals over both processes
    assert r.stderr.count("summary:") == 1


# ------------------------------------------------------------------------------------------------
# --precision (single process)
# ------------------------------------------------------------------------------------------------
def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_precision_is_validated():
    from deebert_cli.core.config import FinetuneConfig, PredictConfig, TrainExitsConfig

    for cls in (FinetuneConfig, TrainExitsConfig, PredictConfig):
        with pytest.raises(ValueError, match="precision"):
            cls(precision="fp64")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_fp16_on_cpu_is_one_clear_error(tiny_backbone, tmp_path):
    r = runner.invoke(app, ["finetune", "--model", tiny_backbone, "--output", str(tmp_path / "ck"),
                            "--precision", "fp16", "--device", "cpu"])
    assert r.exit_code == 2
    assert "fp16 needs a GPU" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["predict", "--precision", "half", "--device", "cpu"], input="good\n")
    assert r.exit_code == 2 and "precision must be one of fp32, bf16, fp16" in r.output


def test_bf16_on_cpu_trains_and_predicts(tiny_backbone, trained_ckpt, tmp_path):
    data = make_data_dir(tmp_path, n_train=40, n_val=10)
    out = tmp_path / "ck"
    r = runner.invoke(app, ["finetune", "--model", tiny_backbone, "--dataset", data, "--output", str(out),
                            "--max-steps", 3, "--batch-size", 8, "--precision", "bf16", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(str(out / "model.safetensors")).values())
    r = runner.invoke(app, ["train-exits", "--checkpoint", str(out), "--epochs", 1, "--precision", "bf16",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["predict", "--checkpoint", trained_ckpt, "--precision", "bf16", "--format", "jsonl",
                            "--device", "cpu"], input="good fun\n\nbad dull plot\n")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [row["empty"] for row in rows] == [False, True, False]


def test_single_process_never_imports_accelerate():
    code = ("import sys; from deebert_cli.core.launch import Runtime; rt = Runtime('cpu', 'bf16');"
            "print(rt.distributed, rt.world, 'accelerate' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "1", "False"]
