import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAMILIES, pad_id, tiny_classifier
from deebert_cli.core.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from deebert_cli.core.model.highway import HighwayModel


def _ids(family="bert"):
    ids = torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    ids[mask == 0] = pad_id(family)
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_gives_identical_logits_for_every_exit(family, tmp_path, monkeypatch):
    hw = HighwayModel(tiny_classifier(family)).eval()
    with torch.no_grad():
        for r in hw.ramps:  # make the off-ramps non-trivial
            r.classifier.weight.normal_()
    ids, mask = _ids(family)
    with torch.no_grad():
        before = hw(ids, mask)
    save_checkpoint(Checkpoint(hw, None, {"stage": "exits_trained"}), tmp_path / "ck")
    files = sorted(os.listdir(tmp_path / "ck"))
    assert "model.safetensors" in files and "highway.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files)

    def no_pickles(*a, **k):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", no_pickles)
    ck = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        after = ck.model(ids, mask)
    assert torch.equal(before, after)
    assert ck.exits_trained


@pytest.mark.parametrize("family", FAMILIES)
def test_final_exit_loads_as_plain_transformers_classifier(family, tmp_path):
    from transformers import AutoModelForSequenceClassification

    hw = HighwayModel(tiny_classifier(family)).eval()
    save_checkpoint(Checkpoint(hw, None, {}), tmp_path / "ck")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ck").eval()
    assert type(plain) is type(hw.model)
    ids, mask = _ids(family)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids, attention_mask=mask).logits, hw(ids, mask)[-1], atol=1e-6)


def test_interrupted_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    hw = HighwayModel(tiny_classifier("bert")).eval()
    target = tmp_path / "ck"
    save_checkpoint(Checkpoint(hw, None, {"stage": "finetuned"}), target)
    good = load_file(str(target / "highway.safetensors"))

    with torch.no_grad():
        for p in hw.ramps.parameters():
            p.add_(1.0)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(Checkpoint(hw, None, {"stage": "exits_trained"}), target)
    monkeypatch.undo()
    ck = load_checkpoint(target)
    assert ck.stage == "finetuned"
    after = load_file(str(target / "highway.safetensors"))
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left behind


def test_public_api_from_the_package(trained_ckpt):
    import deebert_cli

    ck = deebert_cli.load_checkpoint(trained_ckpt)
    rule = deebert_cli.ExitRule([0.3] * ck.model.num_layers)
    res = list(deebert_cli.predict_stream(ck, ["good great film", "", "bad awful dull"], rule, "cpu"))
    assert [r.empty for r in res] == [False, True, False]
    assert [ck.label_names[r.label] for r in (res[0], res[2])] == ["positive", "negative"]
    assert float(deebert_cli.normalized_entropy(torch.zeros(3))) == pytest.approx(1.0)
    assert deebert_cli.HighwayModel is type(ck.model)
