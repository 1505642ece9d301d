"""Nothing lost, nothing silent: what a command writes never replaces a user's files and is checked before
any work; every file read back is refused in one line naming it when it is missing, unreadable or damaged."""
import builtins
import errno
import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from conftest import (export_copy, interrupt_after_first_save, invoke, make_data_dir, make_sentiment_rows, make_tiny_backbone,
                      one_line_error, write_jsonl)
from deebert_cli.cli.app import app





@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nothing-lost")
    return make_tiny_backbone(tmp), make_data_dir(tmp, n_train=40, n_val=12)


def finetune_args(tiny, output, *more):
    backbone, data = tiny
    return ["finetune", "--model", backbone, "--dataset", data, "--output", output, "--max-steps", 1,
            "--batch-size", 8, "--device", "cpu", *more]


def no_work(monkeypatch):
    """Any training, analysis or model loading from now on fails the test: refusals come first."""
    def started(*a, **k):
        raise AssertionError("the command started its work before refusing")

    import deebert_cli.core.analysis.calibrate as calibrate
    import deebert_cli.core.analysis.report as report
    import deebert_cli.core.runtime.export as export
    import deebert_cli.core.runtime.stream as stream
    import deebert_cli.core.train.stage1 as stage1
    import deebert_cli.core.train.stage2 as stage2

    monkeypatch.setattr(stage1._Stage1, "__init__", started)
    monkeypatch.setattr(stage2, "Runtime", started)
    monkeypatch.setattr(report, "analyze", started)
    monkeypatch.setattr(calibrate, "calibrate", started)
    monkeypatch.setattr(stream, "load_for_inference", started)
    monkeypatch.setattr(export, "load_checkpoint", started)


def copy_ckpt(src, tmp_path, name="ck") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# 1. a folder of the user's own files is never replaced; nor the current folder -----------------------
def test_checkpoint_output_never_replaces_a_folder_of_the_users_files(tiny, trained_ckpt, tmp_path, monkeypatch):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "main.py").write_text("print('mine')\n")
    no_work(monkeypatch)
    one_line_error(invoke(*finetune_args(tiny, mine)), "--output", "not a deebert checkpoint")
    one_line_error(invoke("train-exits", "--checkpoint", trained_ckpt, "--output", mine), "--output", "not a deebert checkpoint")
    assert sorted(os.listdir(mine)) == ["main.py"] and (mine / "main.py").read_text() == "print('mine')\n"


def test_output_is_never_the_current_folder_or_one_holding_it(tiny, trained_ckpt, tmp_path, monkeypatch):
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (here / "keep.txt").write_text("keep")
    monkeypatch.chdir(here)
    no_work(monkeypatch)
    for out in (".", here, ".."):
        one_line_error(invoke(*finetune_args(tiny, out)), "--output", "current folder")
    ck = copy_ckpt(trained_ckpt, tmp_path)
    monkeypatch.chdir(ck)  # writing back into the checkpoint one stands in
    one_line_error(invoke("train-exits", "--checkpoint", "."), "--checkpoint", "current folder")
    assert (here / "keep.txt").read_text() == "keep" and os.listdir(here) == ["keep.txt"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


# 2. a checkpoint rewritten keeps what it does not own (an export, a user's notes) ----------------------
def test_train_exits_keeps_the_export_which_then_reads_as_stale(trained_ckpt, tmp_path_factory):
    ck = Path(export_copy(trained_ckpt, tmp_path_factory, "keeps-export", quantize=None))
    (ck / "notes.txt").write_text("mine")
    manifest = (ck / "onnx" / "manifest.json").read_text()
    r = invoke("train-exits", "--checkpoint", ck, "--epochs", 1, "--ramp-pooling", "cls", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert (ck / "notes.txt").read_text() == "mine" and (ck / "onnx" / "manifest.json").read_text() == manifest
    one_line_error(invoke("predict", "--checkpoint", ck, "--runtime", "onnx", input="good film\n"),
                   "is stale", "highway.safetensors changed", "deebert export")


def test_atomic_dir_carries_over_what_the_new_folder_does_not_own(tmp_path):
    from deebert_cli.core.files import atomic_dir

    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "x.txt").write_text("x")
    (target / "weights").write_text("old")
    (target / "stale").write_text("old")
    with atomic_dir(target, owned=lambda name: name in ("weights", "stale")) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(os.listdir(target)) == ["sub", "weights"]
    assert (target / "weights").read_text() == "new" and (target / "sub" / "x.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old folder left


# 3. an output that cannot be written is refused before any work ---------------------------------------
def lock(folder: Path, monkeypatch) -> None:
    """From now on every mkdir in ``folder`` fails as on a read-only file system (root ignores permission
    bits, and a probe that only asks os.access would pass)."""
    real = os.mkdir

    def mkdir(path, *a, **k):
        if folder == Path(path) or folder in Path(path).parents:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("command", ["finetune", "train-exits", "train-exits-in-place", "export", "predict", "analyze-json",
                                     "analyze-store", "calibrate-store"])
def test_an_unwritable_output_is_refused_before_any_work(command, tiny, trained_ckpt, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    inside = ro / "ck"
    shutil.copytree(trained_ckpt, inside)
    texts = tmp_path / "texts.txt"
    texts.write_text("good film\nbad plot\n")
    lock(ro, monkeypatch)
    no_work(monkeypatch)
    args, flag = {
        "finetune": (finetune_args(tiny, ro / "new"), "--output"),
        "train-exits": (["train-exits", "--checkpoint", trained_ckpt, "--output", ro / "new"], "--output"),
        "train-exits-in-place": (["train-exits", "--checkpoint", inside], "--checkpoint"),
        "export": (["export", "--checkpoint", trained_ckpt, "--output", ro / "new"], "--output"),
        "predict": (["predict", "--checkpoint", trained_ckpt, "--output", ro / "out.txt"], "--output"),
        "analyze-json": (["analyze", "--checkpoint", trained_ckpt, "--json", ro / "a.json"], "--json"),
        "analyze-store": (["analyze", "--checkpoint", inside, "--store-thresholds"], "--store-thresholds"),
        "calibrate-store": (["calibrate", "--checkpoint", inside, "--unlabeled", texts], "--checkpoint"),
    }[command]
    one_line_error(invoke(*args, input="good\n"), flag, "not writable", "Read-only file system")


# 4. a checkpoint missing a file its stage needs is refused -------------------------------------------
def test_a_checkpoint_without_its_trained_off_ramps_is_refused(trained_ckpt, tmp_path):
    ck = copy_ckpt(trained_ckpt, tmp_path)
    (ck / "highway.safetensors").unlink()
    for args in (["predict", "--checkpoint", ck, "--device", "cpu"], ["analyze", "--checkpoint", ck, "--device", "cpu"]):
        one_line_error(invoke(*args, input="good film\nbad dull plot\n"), "missing highway.safetensors",
                       "exits_trained", "deebert train-exits")
    # what the line advises works: train-exits needs only the stage-1 parts
    r = invoke("train-exits", "--checkpoint", ck, "--epochs", 1, "--ramp-pooling", "cls", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert (ck / "highway.safetensors").is_file()


def test_a_checkpoint_without_its_weights_is_refused(trained_ckpt, tmp_path):
    ck = copy_ckpt(trained_ckpt, tmp_path)
    (ck / "model.safetensors").unlink()
    one_line_error(invoke("predict", "--checkpoint", ck, "--device", "cpu", input="good\n"), "missing model.safetensors")


# 7. a resumed finetune notices that its data changed ---------------------------------------------------
def test_resume_refuses_changed_data(tmp_path, monkeypatch):
    backbone, data = make_tiny_backbone(tmp_path), make_data_dir(tmp_path, n_train=40, n_val=12)
    out = tmp_path / "ck"
    args = ["finetune", "--model", backbone, "--dataset", data, "--output", out, "--epochs", 2, "--batch-size", 8,
            "--save-every", 2, "--device", "cpu"]
    interrupt_after_first_save(monkeypatch, args)
    state = Path(f"{out}.train-state")
    assert any(p.name.startswith("step-") for p in state.iterdir())
    rows = [json.loads(l) for l in open(f"{data}/train.jsonl")]
    flipped = [{**r, "label": "negative" if r["label"] == "positive" else "positive"} for r in rows]
    write_jsonl(Path(data) / "train.jsonl", flipped)  # same path, same options, other labels
    one_line_error(invoke(*args), "train-state", "changed", "remove that directory", alone=False)
    assert state.is_dir() and not out.exists()  # nothing lost, nothing written
    write_jsonl(Path(data) / "train.jsonl", rows)  # the data it was trained on: resumes
    r = invoke(*args)
    assert r.exit_code == 0 and "resumed from step" in r.output, r.output


def test_a_damaged_training_state_is_one_line(tiny, tmp_path, monkeypatch):
    backbone, data = tiny
    out = tmp_path / "ck"
    args = ["finetune", "--model", backbone, "--dataset", data, "--output", out, "--epochs", 1, "--batch-size", 8,
            "--save-every", 2, "--device", "cpu"]
    interrupt_after_first_save(monkeypatch, args)
    step = next(Path(f"{out}.train-state").glob("step-*"))
    (step / "optimizer.safetensors").write_bytes(b"cut short")
    one_line_error(invoke(*args), "training state", str(step), "remove it to start afresh", alone=False)


# 9. tracebacks that are now one line --------------------------------------------------------------------
@pytest.mark.parametrize("damage,needle", [(lambda m: [1, 2], "holds a JSON list"),
                                           (lambda m: {**m, "ramp": "cls"}, "'ramp' should be an object"),
                                           (lambda m: {**m, "data": {"nonsense": 1}}, "'data'")],
                         ids=["list", "ramp-string", "data-fields"])
def test_a_deebert_json_of_the_wrong_shape_is_one_line(trained_ckpt, tmp_path, damage, needle):
    ck = copy_ckpt(trained_ckpt, tmp_path)
    meta = json.loads((ck / "deebert.json").read_text())
    (ck / "deebert.json").write_text(json.dumps(damage(meta)))
    commands = [["analyze", "--checkpoint", ck, "--device", "cpu"], ["train-exits", "--checkpoint", ck, "--device", "cpu"]]
    if needle != "'data'":  # predict does not read the data spec
        commands.append(["predict", "--checkpoint", ck, "--device", "cpu"])
    for args in commands:
        one_line_error(invoke(*args, input="good\n"), "deebert.json", needle)


@pytest.fixture(scope="module")
def plain_export(trained_ckpt, tmp_path_factory) -> str:
    return export_copy(trained_ckpt, tmp_path_factory, "damaged-export", quantize=None)


def cut_weights(ck: Path) -> None:
    data = ck / "onnx" / "fp32" / "model.onnx.data"
    os.truncate(data, data.stat().st_size // 2)


@pytest.mark.parametrize("damage,needle", [
    (cut_weights, "damaged or incomplete"),
    (lambda ck: (ck / "onnx" / "tokenizer.json").write_text('{"broken": '), "tokenizer file"),
    (lambda ck: (ck / "onnx" / "manifest.json").write_text("[]"), "holds a JSON list"),
    (lambda ck: (ck / "onnx" / "fp32" / "model.onnx.data").unlink(), "missing"),
], ids=["weights-cut-short", "tokenizer", "manifest", "weights-missing"])
def test_a_damaged_onnx_export_is_one_line(plain_export, tmp_path, damage, needle):
    ck = copy_ckpt(plain_export, tmp_path)
    damage(ck)
    one_line_error(invoke("predict", "--checkpoint", ck, "--runtime", "onnx", input="good\n"), needle, "deebert export")


@pytest.mark.skipif(not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)), reason="no /dev/full")
def test_predict_to_a_full_disk_is_one_line(trained_ckpt):
    one_line_error(invoke("predict", "--checkpoint", trained_ckpt, "--output", "/dev/full", "--device", "cpu",
                          input="good\n" * 50), "/dev/full", "No space left on device",
                   alone=False)  # after the header line predict prints before it reads its input


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_no_temp_folder(tiny, trained_ckpt, tmp_path, monkeypatch):
    out = copy_ckpt(trained_ckpt, tmp_path, "out")  # an earlier checkpoint there stays as it was
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = Path.write_text

    def full(self, *a, **k):
        if ".tmp-" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    one_line_error(invoke(*finetune_args(tiny, out)), str(out), "No space left on device", alone=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def long_rows(n: int) -> list:
    rows = make_sentiment_rows(n, seed=3)
    return [{**r, "text": " ".join([r["text"]] * 40)} for r in rows]  # hundreds of tokens: past 130 positions


def test_max_length_past_the_model_is_lowered_with_a_warning_everywhere(tiny, trained_ckpt, tmp_path):
    backbone, _ = tiny
    data = tmp_path / "long"
    data.mkdir()
    write_jsonl(data / "train.jsonl", long_rows(16))
    write_jsonl(data / "validation.jsonl", long_rows(6))
    r = invoke("finetune", "--model", backbone, "--dataset", data, "--output", tmp_path / "ck", "--max-steps", 1,
               "--batch-size", 8, "--max-length", 100000, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "warning: --max-length 100000 is more than this model takes (130 tokens" in r.output
    assert json.loads((tmp_path / "ck" / "deebert.json").read_text())["max_length"] == 130
    ck = copy_ckpt(trained_ckpt, tmp_path, "long-ck")  # a checkpoint whose stored max_length is too long
    meta = json.loads((ck / "deebert.json").read_text())
    (ck / "deebert.json").write_text(json.dumps({**meta, "max_length": 100000}))
    data_long = ck.parent / "long-data"
    data_long.mkdir()
    write_jsonl(data_long / "validation.jsonl", long_rows(8))
    for args in (["analyze", "--checkpoint", ck, "--dataset", data_long / "validation.jsonl", "--examples", 0,
                  "--timing-repeats", 1, "--device", "cpu"],
                 ["train-exits", "--checkpoint", ck, "--dataset", data, "--epochs", 1, "--ramp-pooling", "cls",
                  "--device", "cpu"]):
        r = invoke(*args)
        assert r.exit_code == 0, r.output
        assert "warning: the checkpoint's max_length 100000 is more than this model takes (130 tokens" in r.output


# 12. messages that say what is wrong ---------------------------------------------------------------------
def test_input_that_is_a_folder_says_so(trained_ckpt, tmp_path):
    one_line_error(invoke("predict", "--checkpoint", trained_ckpt, "--input", tmp_path), "--input", "is a folder")
    one_line_error(invoke("predict", "--checkpoint", trained_ckpt, "--config", tmp_path, input="good\n"),
                   "--config", "is a folder")


@pytest.mark.parametrize("name", ["model.safetensors", "highway.safetensors", "deebert.json"])
def test_unreadable_weights_say_permission_denied(trained_ckpt, tmp_path, monkeypatch, name):
    ck = copy_ckpt(trained_ckpt, tmp_path)
    locked = ck / name
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads any file: as the system would answer anyone else
        real = builtins.open

        def refuse(file, *a, **k):
            if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == locked.resolve():
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real(file, *a, **k)

        monkeypatch.setattr(builtins, "open", refuse)
    line = one_line_error(invoke("predict", "--checkpoint", ck, "--device", "cpu", input="good\n"), name, "permission denied")
    assert "No such file" not in line


def test_a_hub_name_offline_by_network_fails_fast_and_advises_right(tiny, tmp_path, monkeypatch):
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # not set: the network is what is missing
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)  # behind a proxy the hub is not probed directly

    def no_network(*a, **k):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    _, data = tiny
    t = time.perf_counter()
    line = one_line_error(invoke("finetune", "--model", "someorg/no-such-model", "--dataset", data, "--device", "cpu",
                                 "--output", tmp_path / "o"),
                          "cannot load 'someorg/no-such-model'", "neither a local folder nor reachable")
    assert time.perf_counter() - t < 20 and "HF_HUB_OFFLINE" not in line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # set: say so, and how to undo it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(invoke("finetune", "--model", "someorg/no-such-model", "--dataset", data, "--device", "cpu",
                                 "--output", tmp_path / "o"), "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE")
    assert "HF_HUB_OFFLINE=0" not in line


def test_a_config_value_of_the_wrong_type_names_the_option(tiny, tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("batch_size: many\n")
    one_line_error(invoke(*finetune_args(tiny, tmp_path / "o"), "--config", cfg),
                   "config file", "x.yaml", "--batch-size", "a whole number", "'many'")
    cfg.write_text("lr: 1e-3\nmax_steps: '1'\n")  # YAML reads 1e-3 as text: still the number it says
    from deebert_cli.core.config import FinetuneConfig, build_config, read_yaml

    c = build_config(FinetuneConfig, read_yaml(cfg))
    assert c.lr == 1e-3 and c.max_steps == 1
