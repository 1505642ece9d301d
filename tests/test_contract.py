"""The stored setting is a contract (issue 30): deebert.json is checked against one schema
(core/model/schema.py) on every read, and every store says what it replaces.

The table-driven test mutates every field of ``thresholds`` and ``guarantee`` to each wrong type and
out-of-range value and reads it the way every command does (``read_meta``, which load_checkpoint uses for
predict, serve, predict-dataset, analyze, calibrate, export and train-exits; and ``read_checked``, the ONNX
runtime's own reading): the full product runs through those readers (fast: no model is loaded). The
commands themselves (predict, serve's start-up, predict-dataset, analyze, calibrate) run on a
representative subset of the mutations (one per kind of fault), each with a CLI runner: one error line,
exit 2. The accepted values (a null certified value, a free-text field, a missing optional field) are
listed by hand in ACCEPTED and must load. There is no fallback: a damaged guarantee is an error, never
dropped without a word."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import invoke, make_sentiment_rows, one_line_error, write_jsonl

from deebert_cli.core.errors import UserError
from deebert_cli.core.model import schema
from deebert_cli.core.model.checkpoint import read_checked, read_meta
from deebert_cli.core.model.guarantee import Guarantee, stored_guarantee

MISSING = object()
BAD = [float("nan"), -1, 5, "0.02", [1.0], ["a"], None, MISSING]
FIELDS = [f.name for f in schema.FIELDS if f.name.split(".")[0] in ("thresholds", "guarantee", "recipes")]


def _ids(v):
    return "missing" if v is MISSING else repr(v)


# (field, value) pairs that are valid in a checkpoint of 4 layers whose entropy guarantee has n = 300
ACCEPTED = {(f, _ids(v)) for f, v in [
    ("thresholds.entropy", MISSING), ("thresholds.search", "0.02"), ("thresholds.search", MISSING),
    *((f, v) for f in ("thresholds.chosen_on", "thresholds.by", "guarantee.calibrated_on", "guarantee.by")
      for v in ("0.02", None, MISSING)),
    *((f, v) for f in ("thresholds.max_drop", "thresholds.point_estimate", "guarantee.tolerance", "guarantee.min_n")
      for v in (5, None, MISSING)),
    ("guarantee.value", None), ("guarantee.losses", 5), ("guarantee.tested", 5), ("guarantee.family", 5),
    ("guarantee.family", MISSING), ("guarantee.entropy", MISSING), ("guarantee.accuracy_drop", -1),
    ("guarantee.accuracy_drop", None), ("guarantee.accuracy_drop", MISSING), ("guarantee.method", MISSING),
    *((f, v) for f in ("guarantee.level", "guarantee.selection") for v in (None, MISSING)),
    ("guarantee.disagreement_rate", None), ("guarantee.disagreement_rate", MISSING),
    ("guarantee.bound", -1),  # the exact test bounds the drop itself: [-1, 1] (a binomial bound's -1: below)
    ("recipes.selection", None), ("recipes.selection", MISSING), ("recipes.select_fraction", MISSING),
]}
# a value that breaks another field first: the error names that one
NAMED = {("guarantee.n", "5"): "guarantee.losses"}


def _copy(src, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="module")
def certified(trained_ckpt, tmp_path_factory) -> str:
    """``trained_ckpt`` with an entropy guarantee certified by calibrate on 300 labelled texts."""
    d = tmp_path_factory.mktemp("contract")
    ck = _copy(trained_ckpt, d / "ck")
    data = write_jsonl(d / "cal.jsonl", make_sentiment_rows(300, 9, with_score=False))
    r = invoke("calibrate", "--checkpoint", ck, "--dataset", data, "--max-drop", "5", "--device", "cpu")
    assert r.exit_code == 0, r.output
    g = stored_guarantee(_meta(ck))
    assert g.certified and g.policy == "entropy" and g.n == 300 and g.losses > 5
    return ck


def _meta(ck) -> dict:
    return json.loads((Path(ck) / "deebert.json").read_text())


def _mutated(meta: dict, field: str, value) -> dict:
    m = json.loads(json.dumps(meta))
    parent, key = field.split(".")
    if value is MISSING:
        m[parent].pop(key, None)
    else:
        m[parent][key] = value
    return m


def _bad_copy(certified, tmp_path, field, value) -> str:
    """A checkpoint whose deebert.json has ``field`` set to ``value``: the weights are links to the
    module's checkpoint (only deebert.json is copied)."""
    ck = tmp_path / "bad"
    ck.mkdir(parents=True)
    for f in Path(certified).iterdir():
        if f.name != "deebert.json" and f.is_file():
            (ck / f.name).symlink_to(f)
    (ck / "deebert.json").write_text(json.dumps(_mutated(_meta(certified), field, value)))
    return str(ck)


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_every_wrong_value_is_one_line_naming_it(certified, tmp_path, field):
    """The whole product (field x bad value) through the readers every command uses."""
    for value in BAD:
        path = Path(_bad_copy(certified, tmp_path / _ids(value).replace("/", "_"), field, value))
        key = (field, _ids(value))
        if key in ACCEPTED:
            read_meta(path)  # loads: a valid file
            continue
        for read in (lambda: read_meta(path), lambda: read_checked(path / "deebert.json")):
            with pytest.raises(UserError) as e:
                read()
            msg = str(e.value)
            assert "\n" not in msg and str(path / "deebert.json") in msg, msg
            assert f"'{NAMED.get(key, field)}'" in msg, (value, msg)
            todo = "deebert calibrate" if field.startswith("guarantee") else "deebert train-exits"
            assert todo in msg and "restore deebert.json from a copy" in msg, msg


def test_the_docs_show_every_field_of_the_schema():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "checkpoint.md").read_text()
    for f in schema.FIELDS:
        assert f"| `{f.name}` |" in doc, f.name


# one mutation per kind of fault (issue 30, cases 3, 4, 10): through the commands themselves
SUBSET = [("thresholds.values", [float("nan")] * 3), ("thresholds.values", [-1.0] * 3), ("thresholds.values", [5, 5, 5]),
          ("thresholds.values", ["a"]), ("thresholds.values", None), ("thresholds.values", MISSING),
          ("thresholds.entropy", "bogus"), ("guarantee.epsilon", "0.02"), ("guarantee.delta", 7), ("guarantee.n", -5),
          ("guarantee.risk", "bogus"), ("guarantee.value", [1.0]), ("guarantee.bound", float("nan")),
          ("guarantee.policy", MISSING)]


@pytest.mark.parametrize("field, value", SUBSET, ids=[f"{f}={_ids(v)}" for f, v in SUBSET])
def test_commands_refuse_a_damaged_deebert_json_in_one_line(certified, tmp_path, field, value):
    ck = _bad_copy(certified, tmp_path, field, value)
    data = write_jsonl(tmp_path / "d.jsonl", make_sentiment_rows(20, 3, with_score=False))
    runs = {
        "predict": ["predict", "--checkpoint", ck, "--device", "cpu"],
        "serve": ["serve", "--checkpoint", ck, "--port", "0", "--device", "cpu"],
        "analyze": ["analyze", "--checkpoint", ck, "--dataset", data, "--device", "cpu"],
        "calibrate": ["calibrate", "--checkpoint", ck, "--dataset", data, "--device", "cpu"],
        "calibrate --check": ["calibrate", "--checkpoint", ck, "--dataset", data, "--device", "cpu", "--check"],
    }
    for name, args in runs.items():
        r = invoke(*args, input="good\n")
        one_line_error(r, "deebert.json' is damaged", f"'{field}'")
    assert json.dumps(_meta(ck)) == json.dumps(_mutated(_meta(certified), field, value))  # nothing rewritten


def test_predict_dataset_refuses_a_damaged_deebert_json(certified, tmp_path):
    pytest.importorskip("ray", reason="predict-dataset needs the [ray] extra: pip install 'deebert-cli[ray]'")
    ck = _bad_copy(certified, tmp_path, "guarantee.delta", 7)
    data = write_jsonl(tmp_path / "d.jsonl", make_sentiment_rows(5, 3, with_score=False))
    r = invoke("predict-dataset", "--checkpoint", ck, "--input", data, "--output", tmp_path / "out")
    one_line_error(r, "deebert.json' is damaged", "'guarantee.delta'")
    assert not (tmp_path / "out").exists()


def test_onnx_runtime_on_a_truncated_deebert_json_says_what_fixes_it(exported_ckpt, tmp_path):
    """Case 15: exporting again reads the same file; the line says to restore it or make it again."""
    ck = _copy(exported_ckpt, tmp_path / "ck")
    meta = Path(ck) / "deebert.json"
    meta.write_text(meta.read_text()[:40])
    r = invoke("predict", "--checkpoint", ck, "--runtime", "onnx", input="good\n")
    line = one_line_error(r, "is not valid JSON", "restore the checkpoint from a copy")
    assert "deebert export" not in line


def test_thresholds_in_another_unit_never_claim_the_guarantee(certified, tmp_path):
    """Case 5: raw thresholds stored as guaranteed beside a normalized guarantee are refused; a guarantee
    for another unit is never named beside thresholds it did not certify."""
    ck = _bad_copy(certified, tmp_path, "thresholds.entropy", "raw")
    one_line_error(invoke("predict", "--checkpoint", ck, "--device", "cpu", input="good\n"), "'thresholds.entropy'",
                   "normalized")
    # the same raw values stored as a point estimate: valid, used, and no guarantee claimed
    m = _meta(ck)
    m["thresholds"]["search"] = "global"
    (Path(ck) / "deebert.json").write_text(json.dumps(m))
    r = invoke("predict", "--checkpoint", ck, "--device", "cpu", input="good\n")
    assert r.exit_code == 0 and "guaranteed" not in r.stderr and "entropy in nats" in r.stderr, r.output


def test_a_patience_calibration_says_what_it_replaces_and_what_predict_uses(certified, tmp_path):
    """Case 7: the entropy guarantee it replaces, that plain predict keeps the entropy thresholds without a
    guarantee, and predict --exit-policy patience uses the certified patience."""
    ck = _copy(certified, tmp_path / "ck")
    data = write_jsonl(tmp_path / "cal.jsonl", make_sentiment_rows(300, 9, with_score=False))
    r = invoke("calibrate", "--checkpoint", ck, "--dataset", data, "--max-drop", "5", "--exit-policy", "patience",
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    g = stored_guarantee(_meta(ck))
    if not g.certified:
        pytest.skip("no patience value saves layers on this tiny model")
    text = " ".join(r.stdout.split())
    assert "replaced thresholds" in text and "is lost" in text and "use it with --exit-policy patience" in text
    assert "plain `predict` keeps the entropy thresholds" in text and f"certified patience {int(g.value)}" in text
    r = invoke("predict", "--checkpoint", ck, "--device", "cpu", input="good\n")
    assert r.exit_code == 0 and "guaranteed" not in r.stderr, r.output
    r = invoke("predict", "--checkpoint", ck, "--device", "cpu", "--exit-policy", "patience", input="good\n")
    assert r.exit_code == 0 and "patience stored in the checkpoint; guaranteed" in " ".join(r.stderr.split())


def test_a_point_estimate_replaces_a_certified_threshold_only_when_asked(certified, tmp_path):
    """Case 2: analyze --store-thresholds over a certified threshold needs --replace-guarantee (refused
    before any work when the result is sure to be a point estimate); with it, one line says the guarantee
    is lost, and the removed guarantee is not reported as the stored one that holds."""
    ck = _copy(certified, tmp_path / "ck")
    data = write_jsonl(tmp_path / "d.jsonl", make_sentiment_rows(40, 4, with_score=False))
    before = _meta(ck)
    base = ["analyze", "--checkpoint", ck, "--dataset", data, "--device", "cpu", "--timing-repeats", "1",
            "--store-thresholds", "--per-layer"]
    one_line_error(invoke(*base), "--replace-guarantee", "certified threshold")
    assert _meta(ck) == before
    r = invoke(*base, "--replace-guarantee")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "replaced thresholds" in text and "is lost" in text and "-> thresholds" in text
    assert "stored guarantee (" not in text  # the removed one is not "stored ... holds"
    assert "guarantee" not in _meta(ck) and _meta(ck)["thresholds"]["search"] == "per-layer"


def test_calibrate_with_nothing_certified_reports_and_writes_its_json_after(certified, tmp_path):
    """Case 9: 3 texts certify nothing: what was found and how many texts would certify, exit 0, nothing
    stored, and the --json holds the uncertified result."""
    ck = _copy(certified, tmp_path / "ck")
    before = _meta(ck)
    data = write_jsonl(tmp_path / "few.jsonl", make_sentiment_rows(3, 5, with_score=False))
    for policy in ("entropy", "patience"):
        out = tmp_path / f"{policy}.json"
        r = invoke("calibrate", "--checkpoint", ck, "--dataset", data, "--device", "cpu", "--exit-policy", policy,
                   "--json", out)
        assert r.exit_code == 0 and "Traceback" not in r.output, r.output
        text = " ".join(r.stdout.split())
        assert "nothing certified" in text and "texts to certify anything" in text and "Nothing stored" in text
        got = json.loads(out.read_text())
        assert got["guarantee"]["value"] is None and got["stored"] is False and got["n"] == 3
    assert _meta(ck) == before


def test_calibrate_json_is_not_written_when_the_run_fails(certified, tmp_path, monkeypatch):
    """--json comes only with the final result: a failure while rendering leaves no file."""
    import deebert_cli.cli.calibrate as cli

    ck = _copy(certified, tmp_path / "ck")
    data = write_jsonl(tmp_path / "few.jsonl", make_sentiment_rows(3, 5, with_score=False))
    monkeypatch.setattr(cli, "render", lambda c: 1 / 0)
    invoke("calibrate", "--checkpoint", ck, "--dataset", data, "--device", "cpu", "--json", tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--max-drop", "1", "--max-disagreement", "0.02"], "give one budget"),
    (["--max-disagreement", "0.02", "--no-guarantee"], "--no-guarantee"),
])
def test_train_exits_one_certified_budget(stage1_ckpt, tmp_path, args, message):
    """Case 8: never one budget certified and the other point-estimated, nor a budget ignored."""
    ck = _copy(stage1_ckpt, tmp_path / "ck")
    one_line_error(invoke("train-exits", "--checkpoint", ck, "--device", "cpu", *args), message)


def test_train_exits_over_a_guarantee_says_what_it_replaces(certified, tmp_path):
    ck = _copy(certified, tmp_path / "ck")
    r = invoke("train-exits", "--checkpoint", ck, "--epochs", "1", "--lr", "3e-3", "--device", "cpu",
               "--ramp-pooling", "cls", "--max-drop", "5")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert f"replaced in '{ck}': thresholds" in text and "guarantee for threshold" in text


def test_old_guarantees_stay_valid_and_the_new_fields_round_trip():
    g = Guarantee("accuracy_drop", 0.01, 0.05, 300, "entropy", 0.3, 1, 1 / 300, 0.009, 2.0, 0.5, 4)
    assert g.method == "binomial" and g.disagreement_rate is None
    meta = {"num_layers": 4, "guarantee": {k: v for k, v in g.to_dict().items() if k not in ("method", "disagreement_rate")}}
    assert schema.problems(meta) == []
    g2 = Guarantee(**{**g.to_dict(), "method": "betting", "disagreement_rate": 0.01})
    assert schema.problems({"num_layers": 4, "guarantee": g2.to_dict()}) == []
    assert stored_guarantee({"guarantee": g2.to_dict()}) == g2
    bad = {"num_layers": 4, "guarantee": {**g2.to_dict(), "method": "hoeffding"}}
    assert [f for f, _ in schema.problems(bad)] == ["guarantee.method"]
    for method, problems in (("binomial", ["guarantee.bound"]), ("exact", []), ("betting", [])):
        m = {"num_layers": 4, "guarantee": {**g2.to_dict(), "method": method, "bound": -0.004}}
        assert [f for f, _ in schema.problems(m)] == problems  # a rate's bound is >= 0, a drop's may not be
    assert math.isclose(g2.bound, 0.009)


@pytest.mark.parametrize("value", [{"fp32": {"32": 0.8}}, {"bf16": {"1": 1.4, "256": 2}}])
def test_a_stored_gpu_measurement_is_read(certified, tmp_path, value):
    ck = tmp_path / "ok"
    shutil.copytree(certified, ck)
    (ck / "deebert.json").write_text(json.dumps({**_meta(certified), "gpu_measurement": value}))
    assert read_meta(ck)["gpu_measurement"] == value


@pytest.mark.parametrize("value", [{"fp32": {"32": float("nan")}}, {"fp32": {"x": 1.0}}, {"int4": {"1": 1.0}},
                                   {"fp32": {"32": -1}}, [1.0], "fast"])
def test_a_damaged_gpu_measurement_is_one_line(certified, tmp_path, value):
    """--engine auto reads it on CUDA to choose full depth: a damaged one is refused, never used."""
    ck = tmp_path / "bad"
    shutil.copytree(certified, ck)
    (ck / "deebert.json").write_text(json.dumps({**_meta(certified), "gpu_measurement": value}))
    with pytest.raises(UserError) as e:
        read_meta(ck)
    assert "'gpu_measurement'" in str(e.value) and "\n" not in str(e.value), str(e.value)
