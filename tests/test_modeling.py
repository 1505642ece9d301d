import pytest
import torch

from conftest import FAMILIES, pad_id, tiny_classifier
from deebert_cli.core.model.highway import HighwayModel


def _inputs(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad_id(family)
    return ids, mask


@pytest.mark.parametrize("family,attn", [(f, None) for f in FAMILIES] + [("modernbert", "eager"), ("albert", "eager")])
def test_layer_by_layer_forward_equals_transformers_forward(family, attn):
    model = tiny_classifier(family, attn=attn)
    assert attn is None or model.config._attn_implementation == attn
    hw = HighwayModel(model).eval()
    ids, mask = _inputs(family)
    with torch.no_grad():
        logits, states = hw(ids, mask, return_hidden=True)
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ref_states = torch.stack(ref.hidden_states)  # [L+1, b, s, h]
    assert states.shape == ref_states.shape
    real = mask.bool()
    assert (states - ref_states)[:, real].abs().max().item() < 1e-5
    assert torch.allclose(logits[-1], ref.logits, atol=1e-5)
    assert logits.shape == (hw.num_layers, 4, 2)
    # the early-exit pieces give the same exits as the all-exits pass
    with torch.no_grad():
        h = hw.embed(ids)
        m = hw.prepare_mask(mask, h)
        for i in range(hw.num_layers):
            h = hw.run_layer(i, h, m)
            assert torch.allclose(hw.exit_logits(i, h, mask), logits[i], atol=1e-6)


# where each family keeps the pretrained pooler Linear(H,H) that off-ramps start from (None: no pooler)
POOLERS = {"bert": "bert.pooler.dense", "deberta-v2": "pooler.dense", "deberta-v2-conv": "pooler.dense",
           "albert": "albert.pooler"}


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_weights_are_the_ones_loaded(family, tmp_path):
    src = tiny_classifier(family, seed=3)
    src.save_pretrained(tmp_path / "m")
    hw = HighwayModel.from_backbone(str(tmp_path / "m"), ["a", "b"])
    loaded = dict(hw.model.named_parameters())
    assert loaded.keys() == dict(src.named_parameters()).keys()
    for name, p in src.named_parameters():
        assert torch.equal(loaded[name], p), name
    pooler = hw.adapter.pretrained_pooler()
    if POOLERS.get(family) is None:
        assert pooler is None
        return
    want = src.get_submodule(POOLERS[family])
    for ramp in hw.ramps:  # off-ramps start as copies of the pretrained pooler
        assert torch.equal(ramp.pooler.weight, want.weight) and torch.equal(ramp.pooler.bias, want.bias)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bare_pretrained_encoder_loads_under_the_classifier(family, tmp_path):
    """Hub backbones are usually saved without a classification head (AutoModel / *ForMaskedLM): every
    encoder weight must land in the classifier's base model."""
    from transformers import AutoModel

    torch.manual_seed(4)
    cfg = tiny_classifier(family).config
    src = AutoModel.from_config(cfg)
    src.save_pretrained(tmp_path / "m")
    hw = HighwayModel.from_backbone(str(tmp_path / "m"), ["a", "b", "c"])
    base = dict(getattr(hw.model, hw.adapter.base_attr).named_parameters())
    unused = {n for n, _ in src.named_parameters()} - base.keys()
    assert all(n.startswith("pooler.") for n in unused), unused  # a pooler the classifier has no use for
    for name, p in src.named_parameters():
        if name not in unused:
            assert torch.equal(base[name], p), name
    if family == "albert":  # ALBERT's pretrained pooler lives in the base model: off-ramps copy it
        assert all(torch.equal(r.pooler.weight, src.pooler.weight) for r in hw.ramps)


def test_off_ramps_are_distinct_modules_per_layer():
    hw = HighwayModel(tiny_classifier("bert"))
    ptrs = [p.data_ptr() for r in hw.ramps for p in r.parameters()]
    assert len(ptrs) == len(set(ptrs))
    with torch.no_grad():
        hw.ramps[0].pooler.weight.add_(1.0)
    assert not torch.equal(hw.ramps[0].pooler.weight, hw.ramps[1].pooler.weight)
    assert len(hw.ramps) == hw.num_layers - 1


def test_parameter_overhead_formula_and_bert_base_size():
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        base = BertForSequenceClassification(BertConfig(num_labels=2))
        hw = HighwayModel(base, init_from_pooler=False)
    counts = hw.parameter_counts()
    h, c = 768, 2
    assert counts.ramps == 11 * (h * h + h + h * c + c)  # 11 off-ramps: the 12th exit is BERT's own head
    assert 109e6 < counts.backbone < 110e6
    assert 0.055 < counts.overhead < 0.065


def test_albert_gets_an_off_ramp_per_layer_position_though_weights_are_shared():
    """ALBERT-base-v2 shapes: 12 positions over one shared layer, so 11 off-ramps of a BERT-base's size
    sit on a backbone ~9x smaller (the README states this overhead)."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    cfg = AlbertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, embedding_size=128, num_labels=2)
    with torch.device("meta"):
        hw = HighwayModel(AlbertForSequenceClassification(cfg), init_from_pooler=False)
    assert hw.num_layers == 12 and len(hw.ramps) == 11 and len(hw.adapter.layers) == 1
    h, c = 768, 2
    counts = hw.parameter_counts()
    assert counts.ramps == 11 * (h * h + h + h * c + c)
    assert 11e6 < counts.backbone < 12.5e6 and 0.5 < counts.overhead < 0.6


class _LayerStep(torch.nn.Module):
    """What a per-layer export traces: prepare_mask + run_layer + the exit, from hidden states and a 2-D mask."""

    def __init__(self, hw, i):
        super().__init__()
        self.hw, self.i = hw, i

    def forward(self, hidden, mask):
        h = self.hw.run_layer(self.i, hidden, self.hw.prepare_mask(mask, hidden))
        return h, self.hw.exit_logits(self.i, h, mask)


# transformers' own code warns while traced, each time about a value fixed by the config or by q and k
# having one length (DeBERTa's constants and size checks), or about the padding mask it was traced with
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning", "ignore::FutureWarning",
                            "ignore:To copy construct:UserWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_each_layer_step_traces_and_the_trace_generalises(family):
    """Per-forward extras (relative positions, rotary cos/sin, window masks) come from the mask and the
    hidden states' shape only: a trace taken on one padded batch gives the eager results on a batch of
    another size, length and padding."""
    hw = HighwayModel(tiny_classifier(family)).eval()
    ids, mask = _inputs(family, seed=0)
    ids2, mask2 = _inputs(family, seed=1)
    ids2, mask2 = torch.cat([ids2, ids2[:1]])[:, :9], torch.cat([mask2, mask2[:1]])[:, :9]  # [5, 9], other padding
    with torch.no_grad():
        h, h2 = hw.embed(ids), hw.embed(ids2)
        for i in range(hw.num_layers):
            step = _LayerStep(hw, i)
            traced = torch.jit.trace(step, (h, mask), check_trace=False)
            got, want = traced(h2, mask2), step(h2, mask2)
            assert torch.allclose(got[0][mask2.bool()], want[0][mask2.bool()], atol=1e-6)
            assert torch.allclose(got[1], want[1], atol=1e-6)
            h, h2 = step(h, mask)[0], want[0]


def test_off_ramp_pooling_follows_the_family_head_unless_given():
    from deebert_cli.core.model.policies import RampConfig

    assert HighwayModel(tiny_classifier("modernbert")).ramp_cfg.pooling == "mean"  # classifier_pooling=mean
    assert HighwayModel(tiny_classifier("modernbert-cls")).ramp_cfg.pooling == "cls"
    assert HighwayModel(tiny_classifier("bert")).ramp_cfg.pooling == "cls"
    hw = HighwayModel(tiny_classifier("modernbert"), RampConfig(pooling="cls"))
    assert hw.ramp_cfg.pooling == "cls" and all(r.cfg.pooling == "cls" for r in hw.ramps)
    hw.build_ramps(RampConfig(pooling="auto"))  # what stage 2 does with the default --ramp-pooling
    assert all(r.cfg.pooling == "mean" for r in hw.ramps)
