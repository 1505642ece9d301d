"""The onnx runtime: export, per-exit equality with torch, tokenizer parity, stale exports, the missing
extra, no torch on the predict path, and the refill engine's "no new input right now" contract."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import RUNTIMES, load_runtime, mixed_lines
from conftest import FAMILIES
from deebert_cli.cli.app import app
from deebert_cli.core.model.checkpoint import load_checkpoint
from deebert_cli.core.data.encoding import encode
from deebert_cli.core.errors import UserError
from deebert_cli.core.runtime.engine import EarlyExitEngine
from deebert_cli.core.runtime.rules import ExitRule
from deebert_cli.core.runtime.stream import load_for_inference, predict_stream

runner = CliRunner()


def test_every_exit_equals_torch(trained_ckpt, exported_ckpt):
    ref = load_checkpoint(trained_ckpt)
    onnx = load_for_inference(exported_ckpt, "onnx")
    int8 = load_for_inference(exported_ckpt, "onnx", precision="int8")
    lines = mixed_lines(40, seed=2)
    enc = encode(ref.tokenizer, lines, None, 128)
    from deebert_cli.core.runtime.engine import pad_rows

    ids, mask, tt = pad_rows(enc.input_ids, ref.tokenizer.pad_token_id, enc.token_type_ids)
    assert (mask == 0).any(), "the batch must hold padding"
    with torch.no_grad():
        want = ref.model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(tt)).numpy()  # [L, n, C]
    for model, tol in ((onnx.model, 1e-4), (int8.model, None)):
        h = model.embed(ids, tt)
        for i in range(model.num_layers):
            h, logits, _ = model.layer(i, h, mask)
            if tol is not None:
                assert np.abs(logits - want[i]).max() < tol, (i, np.abs(logits - want[i]).max())
            else:  # int8 changes the numbers a little, not the picture
                assert np.isfinite(logits).all() and (logits.argmax(-1) == want[i].argmax(-1)).mean() >= 0.8
    m = json.loads(open(f"{exported_ckpt}/onnx/manifest.json").read())
    assert m["precisions"] == ["fp32", "int8"] and m["check"]["fp32_max_abs_logit_diff"] < 1e-4
    assert m["source"]["highway.safetensors"]["sha256"] and m["opset"] == 17
    assert sum(f.get("Attention", 0) for f in m["fusions"].values()) == m["num_layers"], m["fusions"]


def test_tokenizer_matches_transformers(exported_ckpt):
    ref = load_checkpoint(exported_ckpt)
    fast = load_for_inference(exported_ckpt, "onnx").tokenizer
    lines = mixed_lines(60, seed=4) + ["", "   ", "UPPER Case, punctuation!? and [unk]s", "good " * 300]
    pairs = list(reversed(lines))
    cut = {}
    for side in ("right", "left"):  # left (deebert serve's truncation_direction) keeps a long text's end
        ref.tokenizer.truncation_side = fast.truncation_side = side
        for max_length in (128, 12):
            for p in (None, pairs):
                a, b = encode(ref.tokenizer, lines, p, max_length), encode(fast, lines, p, max_length)
                assert a.input_ids == b.input_ids and a.token_type_ids == b.token_type_ids
                assert a.truncated == b.truncated and (max_length == 128 or b.truncated > 10)
                cut[side, max_length, p is None] = b.input_ids
    assert cut["left", 12, True] != cut["right", 12, True] and cut["left", 128, True] == cut["right", 128, True]


def test_stale_export_is_refused(trained_ckpt, tmp_path_factory):
    from conftest import export_copy
    from safetensors.numpy import load_file, save_file

    ck = export_copy(trained_ckpt, tmp_path_factory, "stale", quantize=None)
    os.utime(f"{ck}/highway.safetensors")  # touched, same content: still fresh (checked by hash)
    assert load_for_inference(ck, "onnx").model.num_layers == 4
    state = load_file(f"{ck}/highway.safetensors")
    key = next(k for k in state if k.endswith("classifier.bias"))
    state[key] = state[key] + 1.0  # what train-exits does to the off-ramps
    save_file(state, f"{ck}/highway.safetensors")
    with pytest.raises(UserError, match="stale.*highway.safetensors changed.*deebert export --checkpoint"):
        load_for_inference(ck, "onnx")
    r = runner.invoke(app, ["predict", "--checkpoint", ck, "--runtime", "onnx"], input="good film\n")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and "deebert export" in r.output
    # no int8 graphs in this export; and re-exporting makes it fresh again
    assert runner.invoke(app, ["export", "--checkpoint", ck]).exit_code == 0
    with pytest.raises(UserError, match="no int8 graphs.*--quantize int8"):
        load_for_inference(ck, "onnx", precision="int8")
    r = runner.invoke(app, ["predict", "--checkpoint", ck, "--runtime", "onnx", "--format", "jsonl"], input="good film\n")
    assert r.exit_code == 0 and json.loads(r.stdout)["label"] in ("positive", "negative")
    # an export written by an earlier deebert (one graph per step, format 1) is refused the same way
    manifest = json.loads(open(f"{ck}/onnx/manifest.json").read())
    open(f"{ck}/onnx/manifest.json", "w").write(json.dumps(manifest | {"format": 1}))
    with pytest.raises(UserError, match=r"stale \(export format 1 \(this deebert writes 2\)\).*deebert export"):
        load_for_inference(ck, "onnx")


def test_export_never_replaces_what_is_not_an_export(trained_ckpt, tmp_path):
    """The export replaces its folder as a whole: the checkpoint, a folder holding it, or a folder of the
    user's own are refused in one line (exit 2) and left as they were."""
    before = sorted(os.listdir(trained_ckpt))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for out, why in ((trained_ckpt, "is the checkpoint or holds it"), (os.path.dirname(trained_ckpt), "is the checkpoint or holds it"),
                     (str(mine), "is a folder of other files, not an earlier deebert export")):
        r = runner.invoke(app, ["export", "--checkpoint", trained_ckpt, "--output", out])
        assert r.exit_code == 2 and why in r.output and "--output" in r.output and "Traceback" not in r.output
    assert sorted(os.listdir(trained_ckpt)) == before and (mine / "notes.txt").read_text() == "keep"


def test_missing_extra_gives_one_line(trained_ckpt, exported_ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    for args in (["predict", "--checkpoint", exported_ckpt, "--runtime", "onnx"], ["export", "--checkpoint", trained_ckpt]):
        r = runner.invoke(app, args, input="good film\n")
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines() == [r.output.strip()] and "pip install 'deebert-cli[onnx]'" in r.output
        assert "Traceback" not in r.output


def test_bad_runtime_options(exported_ckpt, trained_ckpt):
    def err(*args):
        r = runner.invoke(app, ["predict", "--checkpoint", exported_ckpt, *args], input="good\n")
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        return r.output

    assert "runtime must be one of" in err("--runtime", "tensorrt")
    assert "--onnx-precision applies to --runtime onnx" in err("--onnx-precision", "int8")
    assert "applies to --runtime torch" in err("--runtime", "onnx", "--precision", "bf16")
    assert "runs on the CPU" in err("--runtime", "onnx", "--device", "cuda")
    r = runner.invoke(app, ["predict", "--checkpoint", trained_ckpt, "--runtime", "onnx"], input="good\n")
    assert r.exit_code == 2 and f"run `deebert export --checkpoint {trained_ckpt}` first" in r.output


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_predict_imports_only_what_its_runtime_needs(exported_ckpt, runtime):
    """--runtime onnx imports no torch, transformers or datasets; the torch runtime no datasets."""
    code = ("import sys\n"
            "from deebert_cli.cli.app import main\n"
            f"sys.argv = ['deebert', 'predict', '--checkpoint', {exported_ckpt!r}, '--runtime', {runtime!r}, '--format', 'jsonl']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules), file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p)}
    p = subprocess.run([sys.executable, "-c", code], input=b"good film\n\nbad dull plot\n", capture_output=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    rows = [json.loads(l) for l in p.stdout.decode().splitlines()]
    assert [r["empty"] for r in rows] == [False, True, False]
    imported = p.stderr.decode().strip().splitlines()[-1]
    assert imported == ("[]" if runtime == "onnx" else "['torch', 'transformers']")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_refill_advances_when_no_new_input(runtime, request):
    """The row iterator may yield None ("no new input right now"): the engine moves the rows it holds on
    (part-full batches) instead of waiting, and asks again when it holds none; results equal predict's."""
    ckpt = load_runtime(runtime, request)
    L = ckpt.model.num_layers
    rule = ExitRule([0.5] * L)
    lines = mixed_lines(10, seed=8)
    enc = encode(ckpt.tokenizer, lines, None, 128)
    rows = [(k, enc.input_ids[k], enc.token_type_ids[k]) for k in range(len(lines))]
    eng = EarlyExitEngine(ckpt, rule, "cpu", batch_size=4)
    done, asked_idle = {}, 0

    def source():
        nonlocal asked_idle
        for burst in (rows[:3], rows[3:4], rows[4:]):
            yield None  # nothing yet, nothing held: the engine must simply ask again
            yield from burst
            while not all(r[0] in done for r in burst):  # wait (as a server would) until the burst is out
                asked_idle += 1
                assert asked_idle < 200, "the engine does not advance part-full queues on None"
                yield None

    for key, layer, logits, ent in eng.run_refill(source()):
        done[key] = layer + 1
    want = list(predict_stream(ckpt, iter(lines), rule, "cpu", batch_size=4))
    assert [done[k] for k in range(len(lines))] == [r.exit_layer for r in want]
    assert asked_idle > 0


def test_analyze_times_the_onnx_runtime_and_reports_int8_accuracy(exported_ckpt, tmp_path):
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.json"
        r = runner.invoke(app, ["analyze", "--checkpoint", exported_ckpt, "--runtime", "onnx", "--onnx-precision", precision,
                                "--timing-repeats", "1", "--exit-policy", "entropy", "--json", str(out), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        a = json.loads(out.read_text())
        rt = a["runtime"]
        assert rt["precision"] == precision and a["timing"]["runtime"] == f"onnx ({precision})"
        assert f"onnx runtime ({precision})" in r.stdout
        if precision == "fp32":  # the same labels as torch: the exact sweep's accuracy
            assert rt["full_depth_accuracy"] == pytest.approx(rt["torch_fp32_full_depth_accuracy"])
            if "at_recommended" in rt:
                assert rt["at_recommended"]["accuracy"] == pytest.approx(rt["at_recommended"]["torch_fp32_accuracy"])
        else:
            assert abs(rt["full_depth_accuracy"] - rt["torch_fp32_full_depth_accuracy"]) < 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_layer_by_layer(family, tmp_path):
    """Each family's layers trace with the mask built inside from the 2-D attention mask: every exit's
    logits (and learned exit score) of the graphs equal torch's on a padded batch; the steps composed
    into one model (chosen by its ``step`` input) give the same as each step's own graph. The batch holds
    what the family's tokenizer emits: token type ids (of a pair) from a BERT or DeBERTa-v2 tokenizer too,
    which a model without segment embeddings (DeBERTa-v3: type_vocab_size 0; DistilBERT with a BERT
    tokenizer) does not take: its graph has no such input and the runtime drops them."""
    pytest.importorskip("onnxruntime", reason="the onnx runtime needs pip install 'deebert-cli[onnx]'")
    import onnxruntime as ort

    from conftest import family_tokenizer, tiny_classifier
    from deebert_cli.core.model.policies import RampConfig
    from deebert_cli.core.runtime.export import compose_steps, graph_inputs, write_graphs
    from deebert_cli.core.runtime.onnx_backend import OnnxModel
    from deebert_cli.core.model.highway import HighwayModel

    torch.manual_seed(0)
    model = HighwayModel(tiny_classifier(family), RampConfig(pooling="mean", norm=True, learned_exit=True)).eval()
    ids = torch.randint(5, 60, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:], mask[2, 3:] = 0, 0
    emits = "token_type_ids" in family_tokenizer(family)(["good film"], ["bad"])
    tt = ((torch.arange(9) >= 4) & (mask == 1)).long() if emits else None  # a pair: its second text is type 1
    takes = model.takes_token_type_ids
    assert takes == (family in ("bert", "electra", "albert")), family  # DeBERTa-v3 style: type_vocab_size 0
    names, _ = write_graphs(model, tmp_path, (ids, mask, tt), learned=True)
    assert ("token_type_ids" in graph_inputs(tmp_path / names["embed"])) == (takes and tt is not None)
    with torch.no_grad():
        want = model(ids, mask, tt)
        if not takes:  # torch drops them too
            assert torch.equal(want, model(ids, mask))
    run = lambda g, feeds: ort.InferenceSession(str(tmp_path / g), providers=["CPUExecutionProvider"]).run(None, feeds)
    feeds = {"input_ids": ids.numpy()} | ({"token_type_ids": tt.numpy()} if takes and tt is not None else {})
    h = run(names["embed"], feeds)[0]
    hidden = model.embed(ids, tt)
    for i, g in enumerate(names["layers"]):
        out = run(g, {"hidden": h, "attention_mask": mask.numpy()})
        assert np.abs(out[-1 if i == len(names["layers"]) - 1 else 1] - want[i].numpy()).max() < 1e-4, (family, i)
        if i < len(names["layers"]) - 1:
            with torch.no_grad():
                hidden = model.run_layer(i, hidden, model.prepare_mask(mask, hidden))
                _, score = model.exit_logits_and_score(i, hidden, mask)
            assert np.abs(out[2] - score.numpy()).max() < 1e-5
            h = out[0]
    steps = [names["embed"], *names["layers"]]
    compose_steps([tmp_path / g for g in steps], tmp_path / "fp32" / "model.onnx")
    one = ort.InferenceSession(str(tmp_path / "fp32" / "model.onnx"), providers=["CPUExecutionProvider"])
    idle = {"input_ids": np.zeros((1, 1), np.int64), "hidden": np.zeros((1, 1, 1), np.float32),
            "attention_mask": np.zeros((1, 1), np.int64)} | ({"token_type_ids": np.zeros((1, 1), np.int64)} if "token_type_ids" in feeds else {})
    h = run(names["embed"], feeds)[0]
    assert np.array_equal(one.run(["hidden_out"], idle | feeds | {"step": np.array(0)})[0], h)
    for k, g in enumerate(names["layers"], start=1):
        layer_feeds = {"hidden": h, "attention_mask": mask.numpy()}
        alone = run(g, layer_feeds)
        got = one.run(None, idle | layer_feeds | {"step": np.array(k)})  # hidden_out, logits, score
        last = k == len(names["layers"])
        assert np.abs(got[1] - alone[0 if last else 1]).max() < 1e-6, (family, k)
        if not last:
            assert np.abs(got[0] - alone[0]).max() < 1e-6 and np.abs(got[2] - alone[2]).max() < 1e-6
            h = alone[0]
    # the runtime is fed what the tokenizer emits, and drops what the graph does not take
    manifest = {"num_layers": model.num_layers, "num_labels": model.num_labels, "family": model.family,
                "learned_exit": True, "graphs": {"model": "model.onnx"}, "inputs": {"token_type_ids": tt is not None}}
    om = OnnxModel(ort, tmp_path, manifest, "fp32", {}, {}, threads=1)
    assert om.takes_token_type_ids == (takes and tt is not None)
    h = om.embed(ids.numpy(), None if tt is None else tt.numpy())
    for i in range(model.num_layers):
        h, logits, _ = om.layer(i, h, mask.numpy())
        assert np.abs(logits - want[i].numpy()).max() < 1e-4, (family, i)
