"""deebert predict-dataset and DeeBertPredictor on a local Ray instance (2 CPUs, small object store)."""
import csv
import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_sentiment_rows, mixed_lines
from deebert_cli.cli.app import app

ray = pytest.importorskip("ray", reason="needs the [ray] extra: pip install 'deebert-cli[ray]'")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
import ray.data  # noqa: E402

runner = CliRunner()
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the module's tests: 2 CPUs, 256 MB object store, no dashboard; workers import
    deebert_cli and this test module (for the crash-once predictor) from the same paths as pytest."""
    import logging

    paths = [str(HERE.parent), str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def threshold_for(ckpt_path, lines):
    """A threshold that sends rows out at several layers, far from every entropy (see test_predict)."""
    from test_predict import all_exit_entropies, spread_threshold
    from deebert_cli.core.model.checkpoint import load_checkpoint

    return spread_threshold(all_exit_entropies(load_checkpoint(ckpt_path), [l for l in lines if l.strip()]))


def write_corpus(folder: Path, lines: list) -> list:
    """The lines spread over a text, a JSONL, a CSV and a Parquet file (with nulls and blanks among them);
    returns [(file, its texts)] in sorted file order."""
    folder.mkdir()
    parts = [lines[:60], lines[60:120], lines[120:180], lines[180:]]
    (folder / "a.txt").write_text("\n".join(parts[0]) + "\n")
    with open(folder / "b.jsonl", "w") as f:
        for k, t in enumerate(parts[1]):
            rec = {"id": f"b{k}", "text": t if t else None, "label": "x"}  # a null text reads as empty
            f.write(json.dumps(rec) + "\n")
            if k == 3:
                f.write("\n")  # a blank line is not a record
    with open(folder / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([[f"c{k}", t] for k, t in enumerate(parts[2])])
    pq.write_table(pa.table({"id": [f"d{k}" for k in range(len(parts[3]))], "text": parts[3]}), folder / "d.parquet")
    return list(zip(sorted(str(p.resolve()) for p in folder.iterdir()), parts))


def read_output(folder: Path):
    import pyarrow.dataset as pds

    files = [str(p) for p in folder.iterdir() if not p.name.startswith(("_", "."))]
    return pds.dataset(files, format="parquet" if files[0].endswith(".parquet") else "json").to_table().to_pylist()


def predict_lines(ckpt, lines, tmp_path, *args):
    src = tmp_path / "all.txt"
    src.write_text("\n".join(lines) + "\n")
    res = runner.invoke(app, ["predict", "--checkpoint", ckpt, "--input", str(src), "--format", "jsonl", "--device", "cpu", *args])
    assert res.exit_code == 0, res.output
    return [json.loads(l) for l in res.stdout.splitlines()]


def test_several_files_equal_predict_on_the_concatenated_texts(local_ray, trained_ckpt, tmp_path):
    lines = mixed_lines(240)
    lines[5] = lines[70] = lines[130] = lines[200] = ""  # an empty text in every file
    thr = threshold_for(trained_ckpt, lines)
    corpus = write_corpus(tmp_path / "corpus", lines)
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict-dataset", "--checkpoint", trained_ckpt, "--input", str(tmp_path / "corpus" / "*"),
                              "--output", str(out), "--threshold", str(thr), "--concurrency", "2",
                              "--rows-per-batch", "50", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = read_output(out)
    assert len(rows) == len(lines)
    order = {path: k for k, (path, _) in enumerate(corpus)}
    rows.sort(key=lambda r: (order[r["path"]], r["row"]))  # input order from the carried ids
    assert [(r["path"], r["row"]) for r in rows] == [(p, k) for p, part in corpus for k in range(len(part))]
    want = predict_lines(trained_ckpt, lines, tmp_path, "--threshold", str(thr))
    assert len({w["exit_layer"] for w in want if not w["empty"]}) >= 3, "exits must fire at several layers"
    assert [(r["label"], r["exit_layer"], r["empty"]) for r in rows] == [(w["label"], w["exit_layer"], w["empty"]) for w in want]
    assert all(abs(r["confidence"] - w["confidence"]) < 1e-4 for r, w in zip(rows, want) if not w["empty"])
    assert f"{len(lines)} row(s) from 4 file(s)" in res.output and "4 empty" in res.output
    assert (out / "_deebert.yaml").is_file()


def test_id_columns_carried_in_jsonl_output(local_ray, trained_ckpt, tmp_path):
    rows_in = make_sentiment_rows(40, seed=4, with_score=False)
    data = tmp_path / "in"
    data.mkdir()
    for part, chunk in enumerate((rows_in[:25], rows_in[25:])):
        (data / f"p{part}.jsonl").write_text("".join(json.dumps({"uid": 1000 + part * 25 + k, **r}) + "\n" for k, r in enumerate(chunk)))
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict-dataset", "--checkpoint", trained_ckpt, "--input", str(data), "--id-column", "uid",
                              "--output", str(out), "--format", "jsonl", "--threshold", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    got = sorted(read_output(out), key=lambda r: r["uid"])
    assert [r["uid"] for r in got] == list(range(1000, 1040))
    assert set(got[0]) == {"uid", "label", "confidence", "exit_layer", "entropy", "empty"}
    want = predict_lines(trained_ckpt, [r["text"] for r in rows_in], tmp_path, "--threshold", "0")
    assert [r["label"] for r in got] == [w["label"] for w in want]


class CrashOnce:
    """A predictor whose process dies on its first batch (once per marker file): Ray must restart it."""

    def __init__(self, marker, **kw):
        from deebert_cli.core.ray_data.predictor import DeeBertPredictor

        self.marker, self.inner = Path(marker), DeeBertPredictor(**kw)

    def __call__(self, batch):
        if not self.marker.exists():
            self.marker.write_text("crashed")
            os._exit(1)
        return self.inner(batch)


def test_a_dying_worker_is_restarted_and_no_row_is_lost(local_ray, trained_ckpt, tmp_path):
    texts = mixed_lines(60, seed=6)
    marker = tmp_path / "crashed"
    ds = ray.data.from_items([{"n": k, "text": t} for k, t in enumerate(texts)], override_num_blocks=3)
    out = ds.map_batches(CrashOnce, fn_constructor_kwargs=dict(marker=str(marker), checkpoint=trained_ckpt,
                                                               threshold=0.0, device="cpu"),
                         batch_size=20, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), max_restarts=2, max_task_retries=2).take_all()
    assert marker.read_text() == "crashed"
    assert sorted(r["n"] for r in out) == list(range(60))


def test_predictor_maps_pandas_batches_like_predict(trained_ckpt):
    import pandas as pd

    from deebert_cli.core.model.checkpoint import load_checkpoint
    from deebert_cli.core.runtime.rules import ExitRule
    from deebert_cli.core.runtime.stream import predict_stream
    from deebert_cli.core.ray_data.predictor import DeeBertPredictor

    texts = mixed_lines(30, seed=8) + ["", None, "   "]
    thr = threshold_for(trained_ckpt, [t for t in texts if t])
    pred = DeeBertPredictor(trained_ckpt, threshold=thr, device="cpu", batch_size=4)
    out = pred(pd.DataFrame({"k": range(len(texts)), "text": texts}))
    assert isinstance(out, pd.DataFrame) and list(out["k"]) == list(range(len(texts)))
    ckpt = load_checkpoint(trained_ckpt)
    want = list(predict_stream(ckpt, [t or "" for t in texts], ExitRule([thr] * ckpt.model.num_layers), "cpu"))
    assert list(out["exit_layer"][:30]) == [w.exit_layer for w in want[:30]]
    assert list(out["label"][:30]) == [ckpt.label_names[w.label] for w in want[:30]]
    assert list(out["empty"]) == [False] * 30 + [True] * 3 and out["label"][30:].isna().all()
    with pytest.raises(Exception, match="would be overwritten"):
        pred(pd.DataFrame({"text": ["good"], "label": ["x"]}))
    with pytest.raises(Exception, match="column 'text' holds int64, not text"):  # no str(12345) for a text
        pred(pd.DataFrame({"text": [12345, 6]}))
    with pytest.raises(Exception, match="not trained on pairs"):
        DeeBertPredictor(trained_ckpt, text_pair_column="second", threshold=thr, device="cpu")


# the bad inputs: what the file holds (None: a.jsonl as written), extra arguments, the error's words
BAD_INPUTS = {
    "glob": (None, ["--input", "{c}/*.parquet"], "matches no files"),
    "column": (None, ["--text-column", "body"], "no column 'body'"),
    "id_text": ({"b.txt": "good\n"}, ["--input", "{c}/b.txt", "--id-column", "uid"], "text file"),
    "output_exists": (None, [], "already exists"),
    "format": ({"a.doc": "x"}, ["--input", "{c}/a.doc"], "unknown file type"),
    "id_clash": ({"a.jsonl": '{"text": "good film", "label": "positive"}\n'}, ["--id-column", "label"], "--id-column label"),
    # a record of a JSONL file (not the first) without its text, or with a text that is no string
    "missing_key": ({"a.jsonl": '{"text": "good film"}\n{"id": 2}\n'}, [], "a.jsonl' line 2 has no key 'text'"),
    "number": ({"a.jsonl": '{"text": "good film"}\n{"text": 12345}\n'}, [], "a.jsonl' line 2: 'text' holds a number (12345)"),
    "list": ({"a.jsonl": '{"text": "good film"}\n{"text": ["a", "b"]}\n'}, [], "line 2: 'text' holds a list"),
    "dict": ({"a.jsonl": '{"text": "good film"}\n{"text": {"a": 1}}\n'}, [], "line 2: 'text' holds an object"),
    "bool": ({"a.jsonl": '{"text": "good film"}\n{"text": true}\n'}, [], "line 2: 'text' holds a boolean (true)"),
    # parse and encoding errors: the file and the line, no echo of the bytes
    "bad_json": ({"a.jsonl": '{"text": "good film"}\n{"text": oops}\n'}, [], "a.jsonl' line 2 is not valid JSON"),
    "not_object": ({"a.jsonl": '{"text": "good film"}\n[1, 2]\n'}, [], "a.jsonl' line 2 is not a JSON object"),
    "binary": ({"a.csv": b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\n\x00\x03\x00>\x00"}, ["--input", "{c}/a.csv"],
               "a.csv' line 1 holds a NUL byte"),
    "binary_body": ({"a.csv": b"text,id\n" + bytes(range(256)) * 4}, ["--input", "{c}/a.csv"], "a.csv' line 2 "),
    "latin1": ({"a.csv": "text,id\ncafé ok,1\n".encode("latin-1")}, ["--input", "{c}/a.csv"],
               "a.csv' line 2 is not UTF-8 (byte 0xe9 at column 4)"),
    "ragged": ({"a.csv": "text,id\ngood,1\nbad,2,3\nfine,4\n"}, ["--input", "{c}/a.csv"], "a.csv' line 3 has 3 fields; the header has 2"),
    "ragged_tsv": ({"a.tsv": "text\tid\ngood\t1\n\nbad\n"}, ["--input", "{c}/a.tsv"], "a.tsv' line 4 has 1 field; the header has 2"),
    # ids: one type per column, in a file and across files; a Parquet text column of numbers
    "id_mixed": ({"a.jsonl": '{"uid": 1, "text": "good"}\n{"uid": "b", "text": "bad"}\n'}, ["--id-column", "uid"],
                 "a.jsonl' line 2: 'uid' holds a string (\"b\"), unlike the lines before it"),
    "id_types": ({"a.jsonl": '{"uid": 1, "text": "good"}\n', "b.csv": "uid,text\nx,bad\n"}, ["--input", "{c}/*", "--id-column", "uid"],
                 "--id-column uid: "),
    "parquet_number_text": ({"a.parquet": {"text": [1, 2]}}, ["--input", "{c}/a.parquet"], "a.parquet': column 'text' holds int64, not text"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_give_one_error_line(case, local_ray, trained_ckpt, tmp_path):
    """Each ends in one `error:` line naming the file (and the line), exit 2: no traceback, none of Ray's
    messages (the CLI runner catches what Ray Data logs to stderr), nothing written."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    files, extra, expect = BAD_INPUTS[case]
    for name, data in (files or {"a.jsonl": '{"text": "good film"}\n'}).items():
        if isinstance(data, dict):
            pq.write_table(pa.table(data), corpus / name)
        elif isinstance(data, bytes):
            (corpus / name).write_bytes(data)
        else:
            (corpus / name).write_text(data, encoding="utf-8")
    args = [a.format(c=corpus) for a in extra]
    if "--input" not in args:
        args += ["--input", str(corpus / "*.jsonl")]
    out = tmp_path / "out"
    if case == "output_exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    res = runner.invoke(app, ["predict-dataset", "--checkpoint", trained_ckpt, *args, "--output", str(out), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip() and not l.startswith("deebert predict-dataset: ")]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert expect in lines[0], lines[0]
    assert lines[0].isprintable() and len(lines[0]) < 300, "no bytes of the file echoed"
    if case == "output_exists":
        assert (out / "mine.txt").read_text() == "keep me"
    else:
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_null_texts_are_empty_rows_and_every_row_is_kept(local_ray, trained_ckpt, tmp_path):
    """The refusals above leave what is allowed alone: a null text (JSONL, Parquet) and an empty CSV cell
    are rows marked empty; ids keep their types."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"uid": 1, "text": "good film"}\n{"uid": 2, "text": null}\n\n{"uid": 3, "text": "awful"}\n')
    (corpus / "b.csv").write_text("uid,text\n4,\n5,fine\n")
    pq.write_table(pa.table({"uid": pa.array([6, 7], pa.int32()), "text": pa.array(["nice", None], pa.large_string())}),
                   corpus / "c.parquet")
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict-dataset", "--checkpoint", trained_ckpt, "--input", str(corpus / "a.jsonl"),
                              "--input", str(corpus / "c.parquet"), "--output", str(out), "--device", "cpu",
                              "--id-column", "uid", "--format", "jsonl", "--threshold", "0"])
    assert res.exit_code == 0, res.output
    got = sorted(read_output(out), key=lambda r: r["uid"])
    assert [(r["uid"], r["empty"]) for r in got] == [(1, False), (2, True), (3, False), (6, False), (7, True)]
    res = runner.invoke(app, ["predict-dataset", "--checkpoint", trained_ckpt, "--input", str(corpus / "b.csv"),
                              "--output", str(tmp_path / "out2"), "--device", "cpu", "--threshold", "0"])
    assert res.exit_code == 0, res.output
    assert sorted((r["row"], r["empty"]) for r in read_output(tmp_path / "out2")) == [(0, True), (1, False)]


def test_inputs_with_no_rows_give_an_empty_output(local_ray, trained_ckpt, tmp_path):
    """An empty file: FileNotFoundError on the temporary folder (Ray wrote no shard, so no folder)."""
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict-dataset", "--checkpoint", trained_ckpt, "--input", str(tmp_path / "empty.jsonl"),
                              "--output", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "wrote 0 row(s) from 1 file(s)" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["_deebert.yaml"]  # no shard: no rows


def test_a_fresh_run_prints_only_its_own_lines(trained_ckpt, tmp_path):
    """A new process starting its own local Ray: no token-auth warning, no core_worker line, no "no
    available CPUs ... will hang" warning; a bad file gives its one error line and exit 2, with no Ray
    traceback before it (a CSV parse error, an invalid JSON line)."""
    import subprocess

    (tmp_path / "a.jsonl").write_text('{"text": "good film"}\n{"text": "awful"}\n')
    (tmp_path / "b.csv").write_text("text,id\ngood,1\nbad,2,3\n")
    (tmp_path / "c.jsonl").write_text('{"text": "good film"}\n{"text": oops}\n')
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    errors = {"b.csv": "line 3 has 3 fields; the header has 2", "c.jsonl": "line 2 is not valid JSON: Expecting value at column 10"}
    for name in ("a.jsonl", "b.csv", "c.jsonl"):
        proc = subprocess.run([sys.executable, "-m", "deebert_cli", "predict-dataset", "--checkpoint", trained_ckpt,
                               "--input", str(tmp_path / name), "--output", str(tmp_path / f"out-{name}"), "--device", "cpu",
                               "--local-cpus", "2", "--object-store-mb", "256", "--threshold", "0"],
                              capture_output=True, text=True, env=env, timeout=400)
        assert proc.returncode == (2 if name in errors else 0), proc.stderr
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert lines[0].startswith("deebert predict-dataset: 1 file(s)"), proc.stderr
        if name in errors:
            assert lines[1:] == [f"error: '{tmp_path / name}' {errors[name]}"], proc.stderr
        else:
            assert lines[1].startswith("wrote 2 row(s)") and len(lines) <= 6, proc.stderr
            for noise in ("WARNING", "core_worker", "available CPUs", "Traceback", "ERROR"):
                assert noise not in proc.stderr, proc.stderr


def test_missing_extra_names_the_pip_command(monkeypatch, tmp_path, trained_ckpt):
    monkeypatch.setitem(sys.modules, "ray", None)
    (tmp_path / "a.txt").write_text("good\n")
    res = runner.invoke(app, ["predict-dataset", "--checkpoint", trained_ckpt, "--input", str(tmp_path / "a.txt"),
                              "--output", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "pip install 'deebert-cli[ray]'" in res.output


def test_predictor_reads_sentence_pairs_from_two_columns(tmp_path):
    import pyarrow as pa

    from conftest import make_tiny_backbone, write_jsonl
    from deebert_cli.core.model.checkpoint import load_checkpoint
    from deebert_cli.core.config import FinetuneConfig
    from deebert_cli.core.runtime.rules import ExitRule
    from deebert_cli.core.runtime.stream import predict_stream
    from deebert_cli.core.ray_data.predictor import DeeBertPredictor
    from deebert_cli.core.train.stage1 import finetune

    rows = make_sentiment_rows(40, 3, with_score=False)
    pairs = [{"premise": r["text"], "hypothesis": rows[(i + 1) % 40]["text"], "label": r["label"]} for i, r in enumerate(rows)]
    out = str(tmp_path / "ck")
    finetune(FinetuneConfig(model=make_tiny_backbone(tmp_path), dataset=write_jsonl(tmp_path / "p.jsonl", pairs),
                            text_column="premise", text_pair_column="hypothesis", output=out, max_steps=2, device="cpu"))
    first = [p["premise"] for p in pairs[:12]] + [None]
    second = [p["hypothesis"] for p in pairs[:12]] + ["good"]
    first[0] = first[0].replace(" ", "\t", 1)  # a tab inside the first text reads as a space
    pred = DeeBertPredictor(out, text_column="premise", text_pair_column="hypothesis", threshold=0.0, device="cpu")
    got = pred(pa.table({"premise": first, "hypothesis": second})).to_pylist()
    ck = load_checkpoint(out)
    lines = [f"{a.replace(chr(9), ' ')}\t{b}" for a, b in zip(first[:12], second[:12])] + [""]
    want = list(predict_stream(ck, lines, ExitRule([0.0] * ck.model.num_layers), "cpu"))
    assert [g["empty"] for g in got] == [w.empty for w in want] == [False] * 12 + [True]
    assert all(abs(g["confidence"] - w.confidence) < 1e-5 for g, w in zip(got[:12], want[:12]))
    alone = list(predict_stream(ck, [f"{first[1]}\t"], ExitRule([0.0] * ck.model.num_layers), "cpu"))[0]
    assert abs(alone.confidence - got[1]["confidence"]) > 1e-6, "the second text must reach the model"


def test_text_files_are_read_by_predicts_line_rules(tmp_path):
    import io

    from deebert_cli.core.runtime.stream import read_lines
    from deebert_cli.core.ray_data.records import _text_chunks

    # U+0085 (NEL), U+2028 and the like end a line for str.splitlines, not for predict: one row
    raw = b"one\r\ntwo\n\n\xff bad \xfe\r\n  \n" + "NEL\u0085 LS\u2028 VT\x0b FF\x0c FS\x1c end\n".encode() + b"last without newline"
    (tmp_path / "t.txt").write_bytes(raw)
    got = [x for t in _text_chunks(str(tmp_path / "t.txt"), "text") for x in t.column("text").to_pylist()]
    assert got == list(read_lines(io.BytesIO(raw))) and len(got) == 7
    assert got[5] == "NEL\u0085 LS\u2028 VT\x0b FF\x0c FS\x1c end"


def test_predictor_on_the_onnx_runtime_equals_torch(trained_ckpt, exported_ckpt):
    """The same exit rule on the export (runtime onnx, no torch in the actor) gives predict's torch answers."""
    import pandas as pd

    from deebert_cli.core.ray_data.predictor import DeeBertPredictor

    texts = mixed_lines(30, seed=9)
    thr = threshold_for(trained_ckpt, texts)
    frame = pd.DataFrame({"text": texts})
    on_torch = DeeBertPredictor(trained_ckpt, threshold=thr, device="cpu", batch_size=4)(frame)
    on_onnx = DeeBertPredictor(exported_ckpt, threshold=thr, runtime="onnx", batch_size=4)(frame)
    assert list(on_onnx["label"]) == list(on_torch["label"])
    assert list(on_onnx["exit_layer"]) == list(on_torch["exit_layer"]) and len(set(on_torch["exit_layer"])) >= 2
    with pytest.raises(Exception, match="deebert export"):
        DeeBertPredictor(trained_ckpt, threshold=thr, runtime="onnx")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_texts_holding_line_breaks_stay_one_row(fmt, tmp_path):
    """U+0085, U+2028 and the other characters str.splitlines breaks at stay inside their row, in every
    format (Ray's read_text would split them: one reason the per-file readers stay)."""
    from deebert_cli.core.ray_data.records import read_one

    texts = [f"a{c}b" for c in ["\u0085", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]] + ["plain"]
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": texts}), path)
    else:
        with path.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f, delimiter="\t" if fmt == "tsv" else ",").writerows([["text"]] + [[t] for t in texts])
    got = [x for t in read_one(str(path), fmt, ["text"], ("text",)) for x in t.column("text").to_pylist()]
    assert got == texts


def test_quiet_stderr_drops_only_the_known_line(capfd):
    """Ray's C++ line about actor arguments in the object store goes; every other line passes, in order."""
    from deebert_cli.core.ray_data.quiet import quiet_stderr

    noise = (b"[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(X)' and ID: 'ab' "
             b"has constructor arguments in the object store and max_restarts > 0. If the arguments ...\n")
    with quiet_stderr():
        os.write(2, b"before\n" + noise + b"[2026-01-01 E 1 1] core_worker.cc:10: a real error\nno newline at the end")
    os.write(2, b"\nafter\n")
    assert capfd.readouterr().err.splitlines() == ["before", "[2026-01-01 E 1 1] core_worker.cc:10: a real error",
                                                   "no newline at the end", "after"]


def test_ray_data_console_keeps_real_errors(local_ray):
    """The filter on Ray Data's console drops the false "will hang" warning and Ray's report of a worker's
    UserError (the command prints that in one line); any other record passes."""
    import logging

    from deebert_cli.core.errors import UserError
    from deebert_cli.core.ray_data.quiet import quiet_ray

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.getLogger("ray.data._internal.test_quiet")
    keep = Keep()
    logging.getLogger("ray.data").addHandler(keep)
    try:
        with quiet_ray():
            log.warning("Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang")
            try:
                raise RuntimeError("task failed") from UserError("'a.jsonl' line 2 has no key 'text'")
            except RuntimeError as e:
                log.error("An exception was raised from a task", exc_info=e)
            log.error("a real error")
            log.info("an info line")
    finally:
        logging.getLogger("ray.data").removeHandler(keep)
    assert seen == ["a real error"]
