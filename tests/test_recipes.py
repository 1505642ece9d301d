"""Stage 2 picks its off-ramp recipe by measurement and ends with a stored threshold (issue 12)."""
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import mixed_lines, train_tiny_checkpoint
from deebert_cli.cli.app import app
from deebert_cli.core.train.recipes import candidates

runner = CliRunner()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("recipes"), exits=False)


def _train_exits(stage1, out, *opts):
    r = runner.invoke(app, ["train-exits", "--checkpoint", stage1, "--output", str(out), "--epochs", "6", "--lr", "3e-3",
                            "--device", "cpu", *map(str, opts)])
    assert r.exit_code == 0, r.output
    return r, json.loads((out / "deebert.json").read_text())


@pytest.fixture(scope="module")
def auto(stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "ckpt"
    r, meta = _train_exits(stage1, out)
    return out, r, meta


def test_no_option_tries_every_candidate_and_keeps_the_best(auto):
    out, r, meta = auto
    search = meta["recipes"]
    rows = search["candidates"]
    assert [row["recipe"] for row in rows] == [c.name for c in candidates("classification")]
    assert {row["pooling"] for row in rows} == {"cls", "mean"} and search["given"] is False
    chosen = next(row for row in rows if row["recipe"] == search["chosen"])
    # the kept recipe saves the most layers within the budget; among equals, it is the more accurate
    for row in rows:
        assert -row["accuracy_change"] <= search["max_drop"] + 1e-9
        assert (round(row["layer_saving"], 12), round(row["accuracy"], 12)) <= \
            (round(chosen["layer_saving"], 12), round(chosen["accuracy"], 12))
    assert meta["ramp"]["pooling"] == chosen["pooling"] and meta["ramp"]["norm"] == chosen["norm"]
    assert ("calibration" in meta) == chosen["calibrate"]
    # the reported per-exit accuracies are those of the kept recipe
    assert [l["accuracy"] for l in meta["metrics"]["train_exits"]["layers"][:-1]] == pytest.approx(chosen["layer_accuracy"][:-1])
    # the candidates are shown side by side, the kept one marked
    assert "off-ramp recipes" in r.stdout and f"{search['chosen']} *" in r.stdout
    for row in rows:
        assert row["recipe"] in r.stdout


def test_the_stored_threshold_is_what_analyze_recommends(auto, tmp_path):
    out, r, meta = auto
    stored = meta["thresholds"]
    assert stored["by"] == "train-exits" and stored["max_drop"] == 0.5 and stored["entropy"] == "normalized"
    j = tmp_path / "a.json"
    a = runner.invoke(app, ["analyze", "--checkpoint", str(out), "--json", str(j), "--timing-repeats", "1",
                            "--examples", "0", "--device", "cpu"])
    assert a.exit_code == 0, a.output
    rec = json.loads(j.read_text())["recommendation"]
    chosen = next(row for row in meta["recipes"]["candidates"] if row["recipe"] == meta["recipes"]["chosen"])
    assert stored["values"] == [rec["threshold"]] * (len(meta["metrics"]["train_exits"]["layers"]) - 1)
    assert chosen["layer_saving"] == pytest.approx(rec["layer_saving"]) and chosen["accuracy"] == pytest.approx(rec["accuracy"])
    # 60 evaluation texts cannot certify a 0.5-point budget: the point estimate is stored, and said so
    text = " ".join(r.stdout.split())
    assert "no guarantee: the evaluation split (n=60) is too small" in text and "stored the point estimate" in text


def test_predict_uses_the_stored_threshold_and_an_explicit_one_wins(auto):
    out, _, meta = auto
    lines = "\n".join(mixed_lines(40)) + "\n"
    p = runner.invoke(app, ["predict", "--checkpoint", str(out), "--format", "jsonl", "--device", "cpu"], input=lines)
    assert p.exit_code == 0, p.output
    assert "thresholds stored in the checkpoint" in p.stderr
    assert f"< {meta['thresholds']['values'][0]:g}" in p.stderr
    p = runner.invoke(app, ["predict", "--checkpoint", str(out), "--threshold", "0", "--format", "jsonl", "--device", "cpu"],
                      input=lines)
    assert "--threshold" in p.stderr
    assert {json.loads(l)["exit_layer"] for l in p.stdout.splitlines()} == {len(meta["metrics"]["train_exits"]["layers"])}


def _flags(recipe: dict) -> list:
    return ["--ramp-pooling", recipe["pooling"]] + [f"--{k.replace('_', '-')}" for k in ("ramp_norm", "distill", "calibrate")
                                                    if recipe["norm" if k == "ramp_norm" else k]]


def test_the_kept_recipe_equals_training_it_alone(stage1, auto, tmp_path):
    out, _, meta = auto
    chosen = next(row for row in meta["recipes"]["candidates"] if row["recipe"] == meta["recipes"]["chosen"])
    _, alone = _train_exits(stage1, tmp_path / "alone", *_flags(chosen))
    assert alone["recipes"]["given"] is True and [r["recipe"] for r in alone["recipes"]["candidates"]] == [chosen["recipe"]]
    a, b = load_file(str(out / "highway.safetensors")), load_file(str(tmp_path / "alone" / "highway.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert alone["thresholds"]["values"] == meta["thresholds"]["values"]


def test_explicit_flags_select_exactly_one_recipe(stage1, tmp_path):
    _, meta = _train_exits(stage1, tmp_path / "plain", "--ramp-pooling", "cls")
    assert meta["recipes"]["chosen"] == "cls" and len(meta["recipes"]["candidates"]) == 1
    assert meta["ramp"]["pooling"] == "cls" and meta["ramp"]["norm"] is False and "calibration" not in meta
    _, meta = _train_exits(stage1, tmp_path / "dist", "--distill")  # the others stay at DeeBERT's values
    assert meta["recipes"]["chosen"] == "cls+distill" and len(meta["recipes"]["candidates"]) == 1
    assert "thresholds" in meta  # an explicit recipe also ends with a stored threshold


def test_learned_exits_are_trained_on_the_kept_recipe(stage1, tmp_path):
    r, meta = _train_exits(stage1, tmp_path / "learned", "--learned-exits")
    assert len(meta["recipes"]["candidates"]) == 8 and meta["ramp"]["learned_exit"] is True
    kept = next(row for row in meta["recipes"]["candidates"] if row["recipe"] == meta["recipes"]["chosen"])
    assert meta["ramp"]["pooling"] == kept["pooling"] and len(meta["learned_exits"]) == len(kept["layer_accuracy"]) - 1
    p = runner.invoke(app, ["predict", "--checkpoint", str(tmp_path / "learned"), "--exit-policy", "learned",
                            "--format", "jsonl", "--device", "cpu"], input="\n".join(mixed_lines(20)) + "\n")
    assert p.exit_code == 0, p.output
    assert len(p.stdout.splitlines()) == 20
