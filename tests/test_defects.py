"""Six defects found while measuring (issue 12), each through the CLI."""
import csv
import json
import shutil

import pytest

from conftest import invoke, make_sentiment_rows, mixed_lines, one_line_error, train_tiny_checkpoint
from deebert_cli.cli.app import app





# 1. analyze --dataset FILE evaluates the whole file ------------------------------------------------
def test_analyze_evaluates_a_given_file_whole(trained_ckpt, tmp_path):
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(37, seed=9)))
    j = tmp_path / "a.json"
    r = invoke("analyze", "--checkpoint", trained_ckpt, "--dataset", data, "--json", j, "--timing-repeats", 1,
               "--examples", 0, "--device", "cpu")
    assert r.exit_code == 0, r.output
    a = json.loads(j.read_text())
    assert a["dataset"]["n"] == 37 and sum(a["sweep"][0]["histogram"]) == 37
    assert str(data) in a["dataset"]["evaluated_on"] and "10%" not in r.output
    # a folder still goes by split: the checkpoint's evaluation split unless --split says otherwise
    folder = json.load(open(f"{trained_ckpt}/deebert.json"))["data"]["dataset"]
    r = invoke("analyze", "--checkpoint", trained_ckpt, "--dataset", folder, "--split", "test", "--json", j,
               "--timing-repeats", 1, "--examples", 0, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(j.read_text())["dataset"]["evaluated_on"] == "split 'test'"


# 2. predict --output: never the input, written whole or not at all ---------------------------------
def test_predict_refuses_to_write_over_its_input(trained_ckpt, tmp_path):
    f = tmp_path / "texts.txt"
    text = "\n".join(mixed_lines(12)) + "\n"
    f.write_text(text)
    one_line_error(invoke("predict", "--checkpoint", trained_ckpt, "--input", f, "--output", f, "--device", "cpu"),
                   "--output", "is the input")
    assert f.read_text() == text
    (tmp_path / "sub").mkdir()  # the same file by another path
    one_line_error(invoke("predict", "--checkpoint", trained_ckpt, "--input", f, "--output", tmp_path / "sub" / ".." / "texts.txt",
                          "--device", "cpu"), "is the input")
    assert f.read_text() == text


def test_outputs_never_replace_a_file_of_the_checkpoint(trained_ckpt, tmp_path):
    """predict --output and analyze --json/--plot refuse a file the checkpoint holds (its weights, its
    deebert.json), in one line naming the flag, and leave it as it was."""
    weights, meta = f"{trained_ckpt}/model.safetensors", f"{trained_ckpt}/deebert.json"
    before = open(weights, "rb").read(), open(meta).read()
    one_line_error(invoke("predict", "--checkpoint", trained_ckpt, "--output", weights, "--device", "cpu", input="good\n"),
                   "--output", "is a file of the checkpoint")
    for flag, path in (("--json", meta), ("--plot", weights)):
        one_line_error(invoke("analyze", "--checkpoint", trained_ckpt, flag, path, "--device", "cpu"),
                       flag, "is a file of the checkpoint")
    assert (open(weights, "rb").read(), open(meta).read()) == before


@pytest.mark.parametrize("damaged", ["model.safetensors", "highway.safetensors"])
def test_a_damaged_weights_file_is_one_error_line(trained_ckpt, tmp_path, damaged):
    ck = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ck)
    (ck / damaged).write_bytes(b"not safetensors")
    one_line_error(invoke("predict", "--checkpoint", ck, "--device", "cpu", input="good\n"), damaged if damaged.startswith("h") else "cannot load")


def test_predict_output_is_renamed_into_place_only_when_complete(trained_ckpt, tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(mixed_lines(30)) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    # a run that fails leaves the earlier file as it was and no temporary file behind
    r = invoke("predict", "--checkpoint", trained_ckpt, "--input", f, "--output", out, "--exit-policy", "learned",
               "--device", "cpu")
    assert r.exit_code == 2
    assert out.read_text() == "earlier results\n"
    r = invoke("predict", "--checkpoint", trained_ckpt, "--input", f, "--output", out, "--format", "jsonl",
               "--threshold", "0.3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert len(out.read_text().splitlines()) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "texts.txt"]


def test_output_interrupted_midway_leaves_the_old_file(tmp_path):
    from deebert_cli.core.files import atomic_text_file

    out = tmp_path / "out.txt"
    out.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_text_file(str(out)) as f:
            f.write("half\n")
            assert out.read_text() == "old\n"  # nothing reaches the target before the end
            raise KeyboardInterrupt
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# 3. predict --output in a missing folder ------------------------------------------------------------
def test_predict_output_in_a_missing_folder_is_one_error_line(trained_ckpt, tmp_path):
    one_line_error(invoke("predict", "--checkpoint", trained_ckpt, "--output", tmp_path / "missing" / "dir" / "out.txt",
                          "--device", "cpu", input="good film\n"), "--output", "does not exist")
    one_line_error(invoke("predict", "--checkpoint", trained_ckpt, "--output", tmp_path, "--device", "cpu",
                          input="good film\n"), "--output", "is a folder")
    assert not (tmp_path / "missing").exists()


# 4. predict --max-length above the model's maximum --------------------------------------------------
def test_max_length_above_the_position_embeddings_is_capped_with_one_warning(trained_ckpt):
    from deebert_cli.core.model.checkpoint import load_checkpoint

    limit = load_checkpoint(trained_ckpt).model.max_tokens
    long_line = " ".join(["good"] * (3 * limit))
    r = invoke("predict", "--checkpoint", trained_ckpt, "--max-length", 100000, "--format", "jsonl", "--threshold", 0,
               "--device", "cpu", input=f"{long_line}\nbad film\n")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 2
    warnings = [l for l in r.stderr.splitlines() if "--max-length" in l]
    assert len(warnings) == 1 and f"using {limit}" in warnings[0]
    assert f"longer than {limit} tokens" in r.stderr  # the long line was truncated at the cap


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "distilbert", "electra"])
def test_max_tokens_is_the_longest_input_the_model_takes(family):
    import torch

    from conftest import tiny_classifier
    from deebert_cli.core.model.highway import HighwayModel

    model = HighwayModel(tiny_classifier(family))
    n = model.max_tokens
    ids = torch.full((1, n), 5)
    assert model(ids, torch.ones_like(ids)).shape[0] == model.num_layers
    ids = torch.full((1, n + 1), 5)
    with pytest.raises((RuntimeError, IndexError)):  # one more token runs off the position embeddings
        model(ids, torch.ones_like(ids))


# 5. option errors name the flag ------------------------------------------------------------------------
@pytest.mark.parametrize("command, flag, message", [
    ("finetune", "--batch-size", "--batch-size must be > 0"),
    ("train-exits", "--batch-size", "--batch-size must be > 0"),
    ("predict", "--batch-size", "--batch-size must be > 0"),
    ("analyze", "--batch-size", "--batch-size must be > 0"),
    ("finetune", "--validation-fraction", "--validation-fraction must be in (0, 1)"),
    ("train-exits", "--max-drop", "--max-drop must be >= 0"),
    ("predict", "--window", "--window must be >= --batch-size"),
    ("analyze", "--timing-repeats", "--timing-repeats must be >= 1"),
])
def test_option_errors_name_the_flag(tmp_path, command, flag, message):
    bad = {"--validation-fraction": "2", "--max-drop": "-1", "--window": "1"}.get(flag, "0")
    line = one_line_error(invoke(command, flag, bad, "--checkpoint" if command != "finetune" else "--output",
                                 tmp_path / "ck"), message)
    assert "_" not in line.split("got")[0]  # no Python field names


def test_analyze_list_options_name_their_flag(tmp_path):
    one_line_error(invoke("analyze", "--timing-thresholds", "x", "--checkpoint", tmp_path), "--timing-thresholds must be")
    one_line_error(invoke("analyze", "--learned-thresholds", "2", "--checkpoint", tmp_path), "--learned-thresholds value 2")


# 6. data files with line-break characters inside a text ------------------------------------------------
BREAKS = ["\u0085", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


def _rows():
    rows = make_sentiment_rows(64, seed=3, with_score=False)
    for i, c in enumerate(BREAKS * 2):  # every character inside a text, twice, at different places
        words = rows[i]["text"].split()
        rows[i]["text"] = " ".join(words[:2]) + c + " ".join(words[2:])
    return rows


def _write(path, rows):
    if path.suffix == ".jsonl":  # as json.dumps writes them: U+0085/U+2028/U+2029 raw, control characters escaped
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix in (".csv", ".tsv"):  # raw, inside the cells
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, ["text", "label"], delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows({"text": r["text"], "label": r["label"]} for r in rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}), path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_texts_with_line_break_characters_are_read_whole(trained_ckpt, tmp_path, suffix):
    from deebert_cli.core.data.readers import read_table

    rows = _rows()
    path = tmp_path / f"data{suffix}"
    _write(path, rows)
    table = read_table(path)
    assert table["text"] == [r["text"] for r in rows]
    assert table["label"] == [r["label"] for r in rows]
    # and through the CLI: analyze evaluates all 64 rows of the file
    j = tmp_path / "a.json"
    r = invoke("analyze", "--checkpoint", trained_ckpt, "--dataset", path, "--json", j, "--timing-repeats", 1,
               "--examples", 0, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(j.read_text())["dataset"]["n"] == len(rows)


def test_a_broken_jsonl_line_is_named_in_one_error_line(trained_ckpt, tmp_path):
    rows = _rows()
    path = tmp_path / "data.jsonl"
    _write(path, rows)
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[40] = lines[40].replace('", "label"', ' "label"')  # line 41 loses a quote
    path.write_text("\n".join(lines), encoding="utf-8")
    one_line_error(invoke("analyze", "--checkpoint", trained_ckpt, "--dataset", path, "--device", "cpu"),
                   f"cannot read '{path}'", "line 41")


def test_csv_cells_stay_strings(tmp_path):
    from deebert_cli.core.data.readers import read_table

    path = tmp_path / "d.csv"
    path.write_text("text,label\nNA,007\n,1\n")
    assert read_table(path) == {"text": ["NA", ""], "label": ["007", "1"]}
