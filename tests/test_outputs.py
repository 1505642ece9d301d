"""Issue 30, the outputs and inputs part: every output through the same rules (never an input, checked
before the work, one line when the disk is full), one reading rule for a .txt and for unlabelled texts,
the server's announcement, stale temporary folders, and a noisy time measurement said as such."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import invoke, make_sentiment_rows, one_line_error, write_jsonl

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
            "OMP_NUM_THREADS": "1", "DEEBERT_NO_PROGRESS": "1"}


def _texts_file(tmp_path, n: int = 20) -> Path:
    p = tmp_path / "texts.txt"
    p.write_text("".join(r["text"] + "\n" for r in make_sentiment_rows(n, 3)))
    return p


# -- case 1: an output is never an input ---------------------------------------------------------------
def test_calibrate_json_that_is_its_unlabeled_input_is_refused_and_the_input_kept(trained_ckpt, tmp_path):
    texts = _texts_file(tmp_path)
    before = texts.read_bytes()
    r = invoke("calibrate", "--checkpoint", trained_ckpt, "--unlabeled", texts, "--check", "--json", texts, "--device", "cpu")
    one_line_error(r, "--json", "is the input file of --unlabeled")
    assert texts.read_bytes() == before


def test_calibrate_and_analyze_json_that_is_their_dataset_is_refused(trained_ckpt, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_sentiment_rows(30, 4, with_score=False))
    before = Path(data).read_bytes()
    for cmd in ("calibrate", "analyze"):
        r = invoke(cmd, "--checkpoint", trained_ckpt, "--dataset", data, "--json", data, "--device", "cpu")
        one_line_error(r, "--json", "is the input file of --dataset")
        assert Path(data).read_bytes() == before


def test_analyze_json_inside_its_dataset_folder_is_refused(trained_ckpt, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", make_sentiment_rows(30, 5, with_score=False))
    r = invoke("analyze", "--checkpoint", trained_ckpt, "--dataset", folder, "--json", folder / "train.jsonl", "--device", "cpu")
    one_line_error(r, "--json", "input folder of --dataset")


# -- case 13: --plot's format is checked before the analysis runs ---------------------------------------
def test_analyze_plot_with_an_unsupported_suffix_is_refused_before_any_work(trained_ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    r = invoke("analyze", "--checkpoint", trained_ckpt, "--plot", tmp_path / "x.jsonl", "--device", "cpu")
    one_line_error(r, "--plot", "'jsonl' is not supported", ".png")  # alone: nothing was analysed first
    assert not (tmp_path / "x.jsonl").exists()


def test_analyze_plot_and_json_must_be_two_files(trained_ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    r = invoke("analyze", "--checkpoint", trained_ckpt, "--plot", tmp_path / "x.png", "--json", tmp_path / "x.png", "--device", "cpu")
    one_line_error(r, "--plot", "also the --json output")


# -- case 12: stdout that cannot be written ------------------------------------------------------------
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_predict_to_a_full_stdout_is_one_line(trained_ckpt, tmp_path):
    texts = _texts_file(tmp_path)
    with open(texts, "rb") as src, open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "deebert_cli", "predict", "--checkpoint", trained_ckpt, "--device", "cpu"],
                              stdin=src, stdout=full, stderr=subprocess.PIPE, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: cannot write the results to standard output: No space left on device"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["--help"], ["analyze", "--help"], ["calibrate", "--checkpoint", "CKPT", "--unlabeled", "TEXTS",
                                                                     "--check", "--device", "cpu", "--max-disagreement", "0.5"]])
def test_any_command_to_a_full_stdout_is_one_line(trained_ckpt, tmp_path, args):
    """Every command's standard output goes through one rule (cli/app.main), not only predict's."""
    texts = _texts_file(tmp_path)
    args = [str(trained_ckpt) if a == "CKPT" else str(texts) if a == "TEXTS" else a for a in args]
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "deebert_cli", *args], stdout=full, stderr=subprocess.PIPE,
                              text=True, env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: cannot write the results to standard output: No space left on device"


def test_predict_into_a_closed_pipe_ends_quietly(trained_ckpt, tmp_path):
    texts = tmp_path / "many.txt"
    texts.write_text("".join(r["text"] + "\n" for r in make_sentiment_rows(20, 3)) * 200)
    with open(texts, "rb") as src:
        proc = subprocess.Popen([sys.executable, "-m", "deebert_cli", "predict", "--checkpoint", trained_ckpt, "--device", "cpu"],
                                stdin=src, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
        proc.stdout.readline()
        proc.stdout.close()  # `| head -1`
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "error:" not in err, err


# -- cases 6, 16, 20: unlabelled texts read by the shared rules -----------------------------------------
def _spec():
    from deebert_cli.core.data.examples import DataSpec

    return DataSpec()


def test_a_lone_carriage_return_does_not_split_an_unlabeled_text(tmp_path):
    """Path.read_text's universal newlines made 'one\\rtwo' two calibration texts; predict reads one."""
    from deebert_cli.core.data.examples import read_unlabeled
    from deebert_cli.core.data.lines import read_lines

    p = tmp_path / "t.txt"
    raw = b"one\rtwo\r\nthree\n\nfour"
    p.write_bytes(raw)
    texts, _ = read_unlabeled(str(p), _spec())
    assert texts == ["one\rtwo", "three", "four"]
    with open(p, "rb") as f:  # predict's reader: the same lines (read_unlabeled drops the blank one)
        assert [l for l in read_lines(f) if l.strip()] == texts


def test_unlabeled_text_that_is_not_utf8_is_refused_naming_the_line(tmp_path):
    from deebert_cli.core.data.examples import read_unlabeled
    from deebert_cli.core.errors import UserError

    p = tmp_path / "t.txt"
    p.write_bytes(b"good film\nbad \xff\xfe film\n")
    with pytest.raises(UserError, match=r"--unlabeled '.*t\.txt' line 2 is not UTF-8 \(byte 0xff at column 5\)"):
        read_unlabeled(str(p), _spec())


def test_unlabeled_jsonl_texts_that_are_numbers_are_refused_naming_the_record(trained_ckpt, tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text('{"text": "good film"}\n{"text": 5}\n{"text": null}\n')
    r = invoke("calibrate", "--checkpoint", trained_ckpt, "--unlabeled", p, "--device", "cpu")
    one_line_error(r, f"--unlabeled '{p}' record 2: 'text' holds a number (5), not a string")


def test_calibrate_data_errors_name_the_flag_and_the_file(trained_ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good film", "label": "weird"}\n{"text": "bad", "label": "negative"}\n')
    r = invoke("calibrate", "--checkpoint", trained_ckpt, "--dataset", bad, "--device", "cpu")
    one_line_error(r, f"--dataset '{bad}'", "'weird'")
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"body": "good film"}\n')
    r = invoke("calibrate", "--checkpoint", trained_ckpt, "--unlabeled", nocol, "--device", "cpu")
    one_line_error(r, f"--unlabeled '{nocol}' has no column 'text'", "--text-column")


# -- case 18: temporary folders a killed writer left ---------------------------------------------------
def test_atomic_dir_removes_the_temporary_folders_of_dead_writers_only(tmp_path):
    from deebert_cli.core.files import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    target = tmp_path / "onnx"
    stale = tmp_path / f".onnx.tmp-{dead}-0123abcd"
    live = tmp_path / f".onnx.tmp-{os.getpid()}-0123abcd"  # a writer still running (here: this process)
    other = tmp_path / ".onnx.tmp-mine"  # not a name this tool makes
    for d in (stale, live, other):
        d.mkdir()
        (d / "model.onnx").write_text("partial")
    with atomic_dir(target) as tmp:
        assert re.fullmatch(rf"\.onnx\.tmp-{os.getpid()}-[0-9a-f]{{8}}", tmp.name)
        (tmp / "model.onnx").write_text("whole")
    assert not stale.exists() and live.is_dir() and other.is_dir()
    assert (target / "model.onnx").read_text() == "whole"


# -- case 19: timing repeats until it agrees; a noisy figure is said to be noisy -----------------------
def test_timed_runs_repeat_until_they_agree(trained_ckpt, monkeypatch):
    import types

    import deebert_cli.core.analysis.report as report
    from deebert_cli.core.config import AnalyzeConfig
    from deebert_cli.core.runtime.stream import load_for_inference

    # run durations, interleaved (full depth, then the threshold), per round: rounds 1-2 disagree, 3 agrees
    durations = iter([1.0, 0.5, 2.0, 0.9, 1.01, 0.505] + [1.0] * 40)
    clock = {"t": 0.0}

    def run(ckpt, lines, rule, device, batch_size):  # a run that takes the next duration on a fake clock
        clock["t"] += next(durations)
        return [types.SimpleNamespace(label=1) for _ in lines]

    monkeypatch.setattr(report, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    monkeypatch.setattr(report, "predict_stream", run)
    monkeypatch.setattr(report, "TIMING_MAX_SECONDS", 1e9)
    ckpt = load_for_inference(trained_ckpt, "torch")
    L = ckpt.model.num_layers
    cfg = AnalyzeConfig(checkpoint=trained_ckpt, timing_repeats=2, device="cpu")
    timed = {0.0: [0.0] * (L - 1), 0.3: [0.3] * (L - 1)}
    seconds, acc, spread = report.time_runs(cfg, ckpt, "cpu", timed, ["good film", "awful"], [1, 0])
    assert seconds == {0.0: 1.0, 0.3: 0.5} and clock["t"] == pytest.approx(5.915)  # three rounds, then it stopped
    assert spread[0.0] == pytest.approx(0.01) and spread[0.3] == pytest.approx(0.01)


def test_a_noisy_time_saving_is_not_printed_as_a_figure(trained_ckpt, monkeypatch):
    """Under load analyze printed '223.36% more time' from two runs that disagreed."""
    import deebert_cli.core.analysis.report as report

    real = report.time_runs

    def loaded(*args):
        seconds, acc, spread = real(*args)
        return {k: (v if k == 0.0 else 3.2336 * seconds[0.0]) for k, v in seconds.items()}, acc, {k: 0.4 for k in spread}

    monkeypatch.setattr(report, "time_runs", loaded)
    r = invoke("analyze", "--checkpoint", trained_ckpt, "--examples", "0", "--device", "cpu")
    assert r.exit_code == 0, r.output
    line = next(l for l in r.stdout.splitlines() if l.startswith("recommended threshold"))
    assert "noisy measurement (±" in line and "more time" not in line and "less time" not in line, line


# -- cases 14, 17: the server's announcement, compressed bodies ------------------------------------------
def test_serve_announces_its_address_only_once_it_accepts_and_refuses_compressed_bodies(trained_ckpt):
    pytest.importorskip("uvicorn")
    import gzip
    import urllib.error
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "deebert_cli", "serve", "--checkpoint", trained_ckpt, "--port", "0",
                             "--device", "cpu", "--no-access-log"], stderr=subprocess.PIPE, text=True, env=_env())
    try:
        for line in proc.stderr:
            m = re.search(r"listening on http://([\d.]+):(\d+)", line)
            if m:
                break
        assert m, "no address announced"
        host, port = m.group(1), int(m.group(2))
        assert port != 0
        socket.create_connection((host, port), timeout=5).close()  # at once: refused before the fix
        req = urllib.request.Request(f"http://{host}:{port}/predict", data=gzip.compress(b'{"inputs": "good film"}'),
                                     headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 415
        assert "not accepted" in json.loads(e.value.read())["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
