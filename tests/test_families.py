"""Every supported family end to end on tiny random backbones: the CLI stages, batch invariance of
early exit, and the checkpoint's final exit as a plain transformers classifier (issue 14)."""
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_data_dir, make_family_backbone, mixed_lines
from deebert_cli.cli.app import app
from deebert_cli.core.model.checkpoint import load_checkpoint
from deebert_cli.core.runtime.rules import ExitRule
from deebert_cli.core.model.families import ADAPTERS
from deebert_cli.core.model.highway import HighwayModel
from test_predict import all_exit_entropies, run, spread_threshold

runner = CliRunner()
# one per adapter (BERT runs through the CLI in test_training and test_predict; camembert stands for the
# RoBERTa adapter it shares with roberta, xlm-roberta and data2vec-text) and DeBERTa's conv variant
ADAPTED = ["distilbert", "electra", "camembert", "deberta-v2", "deberta-v2-conv", "modernbert", "albert", "mpnet"]


def invoke(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


@pytest.fixture(scope="module", params=ADAPTED)
def family_ckpt(request, tmp_path_factory):
    """finetune -> train-exits through the CLI on a tiny random backbone of the family."""
    tmp = tmp_path_factory.mktemp(request.param)
    bb = make_family_backbone(tmp, request.param)
    data = make_data_dir(tmp, n_val=40)
    out = tmp / "ck"
    r = invoke("finetune", "--model", bb, "--dataset", data, "--output", out, "--epochs", 8, "--lr", 3e-3,
               "--batch-size", 16, "--device", "cpu")
    assert r.exit_code == 0, r.output
    # --ramp-pooling auto: one recipe, pooling as the family's own head (the default recipe search is
    # tested in test_recipes)
    r = invoke("train-exits", "--checkpoint", out, "--epochs", 6, "--lr", 3e-3, "--ramp-pooling", "auto", "--device", "cpu")
    assert r.exit_code == 0, r.output
    return request.param, str(out)


def test_finetune_train_exits_predict_analyze_through_the_cli(family_ckpt, tmp_path):
    family, ck = family_ckpt
    meta = json.loads(open(f"{ck}/deebert.json").read())
    assert meta["stage"] == "exits_trained" and meta["family"] == family.replace("-conv", "")
    assert [row["layer"] for row in meta["metrics"]["train_exits"]["layers"]] == [1, 2, 3, 4]
    # auto pooling is the family's own: mean for this ModernBERT (classifier_pooling=mean)
    assert meta["ramp"]["pooling"] == ("mean" if family == "modernbert" else "cls")
    lines = "good great film\n\nbad awful boring plot\nnot so good\n"
    r = invoke("predict", "--checkpoint", ck, "--format", "jsonl", "--threshold", "0.5", "--device", "cpu", input=lines)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["empty"] for row in rows] == [False, True, False, False]
    assert all(row["label"] in ("positive", "negative") and 1 <= row["exit_layer"] <= 4 for row in rows if not row["empty"])
    out = tmp_path / "a.json"
    r = invoke("analyze", "--checkpoint", ck, "--timing-repeats", "1", "--json", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    a = json.loads(out.read_text())
    assert a["model"]["family"] == meta["family"] and a["model"]["layers"] == 4
    assert len(a["sweep"]) > 1


def test_batch_1_equals_batch_32(family_ckpt):
    """Padding, length sorting and rows leaving the batch never change a result in any family
    (DeBERTa's conv reads neighbours, MPNet's positions follow the padding id, ModernBERT pools by mean)."""
    _, ck = family_ckpt
    ckpt = load_checkpoint(ck)
    lines = mixed_lines(120)
    ent = all_exit_entropies(ckpt, lines)
    thr = spread_threshold(ent)
    assert thr is not None
    rule = ExitRule([thr] * ckpt.model.num_layers)
    one, s1 = run(ckpt, lines, rule, batch_size=1, window=1)
    assert sum(c > 0 for c in s1.histogram) >= 2, f"exits must fire at several layers: {s1.histogram}"
    for kw in (dict(batch_size=32, window=64), dict(batch_size=32, engine="refill")):
        many, _ = run(ckpt, lines, rule, **kw)
        for a, b in zip(one, many):
            assert (a.label, a.exit_layer) == (b.label, b.exit_layer), (kw, a, b)
            assert abs(a.confidence - b.confidence) < 1e-4


def test_final_exit_loads_as_a_plain_classifier(family_ckpt):
    from transformers import AutoModelForSequenceClassification

    _, ck = family_ckpt
    ckpt = load_checkpoint(ck)
    plain = AutoModelForSequenceClassification.from_pretrained(ck).eval()
    enc = ckpt.tokenizer(["good great film", "bad awful boring plot and so dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = ckpt.model.eval()(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))[-1]
        theirs = plain(**enc).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_refused_family_names_what_is_supported():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from deebert_cli.core.errors import UserError

    cfg = AutoConfig.for_model("funnel", d_model=32, n_head=2, d_head=16, d_inner=64, block_sizes=[1, 1],
                               vocab_size=64, num_labels=2)
    with pytest.raises(UserError) as e:
        HighwayModel(AutoModelForSequenceClassification.from_config(cfg))
    msg = str(e.value)
    assert "'funnel' is not supported" in msg
    for family in ("albert", "bert", "camembert", "deberta-v2", "modernbert", "mpnet"):
        assert family in msg
    assert set(ADAPTERS) >= {"deberta-v2", "modernbert", "albert", "mpnet", "camembert"}
