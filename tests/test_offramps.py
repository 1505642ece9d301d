"""Better off-ramps (issue 7): pooling/normalization, distillation, calibration, stored thresholds."""
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import make_data_dir, make_tiny_backbone, mixed_lines, train_tiny_checkpoint
from deebert_cli.cli.app import app
from deebert_cli.core.model.checkpoint import load_checkpoint
from deebert_cli.core.config import TrainExitsConfig
from deebert_cli.core.data.examples import DataSpec, prepare_data
from deebert_cli.core.data.encoding import encode
from deebert_cli.core.runtime.rules import ExitRule
from deebert_cli.core.runtime.stream import predict_stream
from deebert_cli.core.runtime.passes import collect
from deebert_cli.core.train.stage2 import train_exits

runner = CliRunner()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("s1"), exits=False)


def _eval_states(ckpt):
    spec = DataSpec(**ckpt.meta["data"])
    ev = prepare_data(spec).eval
    enc = encode(ckpt.tokenizer, ev.texts, ev.pairs, 128)
    got = collect(ckpt.model, enc, ckpt.tokenizer.pad_token_id, 16, "cpu")
    return got["pooled"], got["final"], torch.tensor(ev.labels)


def _train(stage1, tmp_path, name, **kw):
    out = str(tmp_path / name)
    base = dict(checkpoint=stage1, output=out, epochs=4, lr=3e-3, device="cpu")
    base.update(kw)
    res = train_exits(TrainExitsConfig(**base))
    return load_checkpoint(out), res


def test_ramp_pooling_and_norm_are_stored_and_used(stage1, tmp_path):
    ck, _ = _train(stage1, tmp_path, "mean", ramp_pooling="mean", ramp_norm=True)
    assert ck.meta["ramp"]["pooling"] == "mean" and ck.meta["ramp"]["norm"] is True
    assert all(isinstance(r.norm, torch.nn.LayerNorm) for r in ck.model.ramps)
    # a text padded to different lengths gets the same off-ramp output (mean pooling ignores padding)
    tok = ck.tokenizer
    ids = tok(["good film"], return_tensors="pt")
    pad = tok(["good film"], padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        a = ck.model(ids["input_ids"], ids["attention_mask"])
        b = ck.model(pad["input_ids"], pad["attention_mask"])
    assert torch.allclose(a, b, atol=1e-5)


def test_distillation_pulls_off_ramps_towards_the_final_classifier(stage1, tmp_path):
    plain, _ = _train(stage1, tmp_path, "plain", ramp_pooling="cls")
    dist, _ = _train(stage1, tmp_path, "dist", distill=True, distill_alpha=1.0, distill_temperature=2.0)

    def kl_to_teacher(ck, t=2.0):  # what distillation optimises: KL to the softened final classifier
        pooled, final, _ = _eval_states(ck)
        with torch.no_grad():
            return sum(F.kl_div(F.log_softmax(r.classify(pooled[i]) / t, -1), F.log_softmax(final / t, -1),
                                log_target=True, reduction="batchmean").item() for i, r in enumerate(ck.model.ramps))

    assert kl_to_teacher(dist) < kl_to_teacher(plain)


def test_unlabeled_text_is_used_for_distillation(stage1, tmp_path):
    extra = tmp_path / "unlabeled.txt"
    extra.write_text("\n".join(mixed_lines(90, seed=11)) + "\n\n")
    _, res = _train(stage1, tmp_path, "unl", distill=True, unlabeled=str(extra))
    _, res0 = _train(stage1, tmp_path, "nounl", distill=True)
    assert res.extra["cached_examples"] == res0.extra["cached_examples"] + 90
    r = runner.invoke(app, ["train-exits", "--checkpoint", stage1, "--output", str(tmp_path / "x"), "--unlabeled", str(extra)])
    assert r.exit_code == 2 and "--distill" in r.output


def test_calibration_does_not_raise_validation_nll_and_is_stored(stage1, tmp_path):
    """Temperatures are fitted on the choosing part of the evaluation split (the rest certifies the
    threshold, so it must play no part in them): the NLL there does not rise, and the guarantee is
    certified on the other texts ("split")."""
    ck, res = _train(stage1, tmp_path, "cal", calibrate=True, epochs=20, lr=1e-2)  # overtrained: overconfident
    cal = ck.meta["calibration"]
    assert len(cal) == ck.model.num_layers - 1
    pooled, _, y = _eval_states(ck)
    from deebert_cli.core.analysis.risk import selection_parts
    from deebert_cli.core.train.recipes import SELECT_FRACTION

    pick = torch.as_tensor(selection_parts(len(y), SELECT_FRACTION)[0])  # fitted on the choosing part only
    pooled, y = pooled[:, pick], y[pick]
    for c, ramp in zip(cal, ck.model.ramps):
        assert c["nll_after"] <= c["nll_before"] + 1e-9
        assert float(ramp.temperature) == pytest.approx(c["temperature"])  # persisted in highway.safetensors
        with torch.no_grad():
            assert F.cross_entropy(ramp.classify(pooled[c["layer"] - 1]), y).item() == pytest.approx(c["nll_after"], abs=1e-4)
    assert any(abs(c["temperature"] - 1) > 0.05 for c in cal)  # it really changed something
    g = ck.meta.get("guarantee")
    if g is not None:
        assert g["selection"] == "split" and g["n"] == len(_eval_states(ck)[2]) - len(pick), g


def test_stored_per_layer_thresholds_are_used_by_predict(trained_ckpt, tmp_path):
    import shutil

    ck_dir = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ck_dir)
    out = tmp_path / "a.json"
    r = runner.invoke(app, ["analyze", "--checkpoint", str(ck_dir), "--per-layer", "--store-thresholds",
                            "--max-drop", "2", "--json", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    a = json.loads(out.read_text())
    stored = json.loads((ck_dir / "deebert.json").read_text())["thresholds"]
    assert stored["values"] == a["per_layer"]["thresholds"] == a["stored_thresholds"]
    assert stored["search"] == "per-layer" and -a["per_layer"]["accuracy_change"] <= 2 + 1e-9
    assert a["per_layer"]["layer_saving"] >= a["recommendation"]["layer_saving"] - 1e-9  # never worse than global
    lines = mixed_lines(80)
    p = runner.invoke(app, ["predict", "--checkpoint", str(ck_dir), "--format", "jsonl", "--device", "cpu"],
                      input="\n".join(lines) + "\n")
    assert p.exit_code == 0, p.output
    assert "stored in the checkpoint" in p.stderr
    got = [json.loads(l)["exit_layer"] for l in p.stdout.splitlines()]
    ck = load_checkpoint(ck_dir)
    want = [x.exit_layer for x in predict_stream(ck, lines, ExitRule(stored["values"] + [0.0]), "cpu")]
    assert got == want
    # an explicit threshold still wins over the stored ones
    p = runner.invoke(app, ["predict", "--checkpoint", str(ck_dir), "--threshold", "0", "--format", "jsonl",
                            "--device", "cpu"], input="\n".join(lines) + "\n")
    assert {json.loads(l)["exit_layer"] for l in p.stdout.splitlines()} == {ck.model.num_layers}
