import math

import pytest
import torch

from deebert_cli.core.model.policies import RampConfig, entropy, first_exit, normalized_entropy
from deebert_cli.core.model.ramps import OffRamp, pool


def test_entropy_hand_computed_values():
    # uniform over 2 classes: ln 2 nats, normalized 1
    assert entropy(torch.zeros(2)).item() == pytest.approx(math.log(2), abs=1e-6)
    assert normalized_entropy(torch.zeros(2)).item() == pytest.approx(1.0, abs=1e-6)
    # p = [0.25, 0.75]
    logits = torch.tensor([0.0, math.log(3.0)])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy(logits).item() == pytest.approx(h, abs=1e-6)
    assert normalized_entropy(logits).item() == pytest.approx(h / math.log(2), abs=1e-6)
    # uniform over 5 classes: ln 5; normalized 1
    assert entropy(torch.ones(3, 5)).tolist() == pytest.approx([math.log(5)] * 3, abs=1e-6)
    # one-hot-like is ~0
    assert entropy(torch.tensor([20.0, -20.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_finite_for_extreme_and_low_precision_logits():
    extreme = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [1e4, 1e4], [3e38, -3e38]])
    for t in (extreme, extreme[:3].to(torch.bfloat16), extreme[:3].to(torch.float16).clamp(-6e4, 6e4)):
        h, hn = entropy(t), normalized_entropy(t)
        assert torch.isfinite(h).all() and torch.isfinite(hn).all()
        assert (hn >= 0).all() and (hn <= 1).all()
    assert entropy(extreme)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert entropy(extreme)[2].item() == pytest.approx(math.log(2), abs=1e-6)
    half = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float16)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy(half).item() == pytest.approx(h, abs=1e-3)


def test_first_exit_picks_first_layer_below_threshold_and_last_layer_always():
    sig = torch.tensor([[0.9, 0.1, 0.9], [0.2, 0.9, 0.9], [0.1, 0.9, 0.9]])  # [layers=3, n=3]
    thr = torch.tensor([0.15, 0.3, 0.0])
    # sample 0: layer 2 (0.2 < 0.3); sample 1: layer 1 (0.1 < 0.15); sample 2: never below, so the last
    assert first_exit(sig, thr).tolist() == [1, 0, 2]
    assert first_exit(sig, torch.zeros(3)).tolist() == [2, 2, 2]


def test_mean_pooling_ignores_padding():
    torch.manual_seed(0)
    ramp = OffRamp(8, 3, RampConfig(pooling="mean", norm=True, dropout=0.0)).eval()
    h = torch.randn(1, 5, 8)
    m = torch.ones(1, 5, dtype=torch.long)
    padded = torch.cat([h, torch.randn(1, 7, 8) * 100], 1)  # junk in padding positions
    pm = torch.cat([m, torch.zeros(1, 7, dtype=torch.long)], 1)
    assert torch.allclose(ramp(h, m), ramp(padded, pm), atol=1e-6)
    assert torch.allclose(pool(padded, pm, "mean"), h.mean(1), atol=1e-6)
    assert torch.equal(pool(padded, pm, "cls"), h[:, 0])


def test_patience_and_entropy_disagree_on_hand_made_logits():
    import math

    from deebert_cli.core.model.policies import PatiencePolicy, first_exit, normalized_entropy, patience_exit, policy_exit

    # 4 layers x 2 samples x 2 classes
    # sample 0: confidently wrong at layer 1, then flips and stays  -> entropy exits at 1, patience 1 at layer 3
    # sample 1: unsure everywhere but always class 1               -> entropy runs to the end, patience 1 exits at 2
    logits = torch.tensor([
        [[6.0, -6.0], [-0.1, 0.1]],
        [[-1.0, 1.0], [-0.1, 0.1]],
        [[-1.0, 1.0], [-0.1, 0.1]],
        [[-1.0, 1.0], [-0.1, 0.1]],
    ])
    ent = normalized_entropy(logits)
    assert first_exit(ent, torch.tensor([0.1, 0.1, 0.1, 0.0])).tolist() == [0, 3]
    assert patience_exit(logits, 1).tolist() == [2, 1]
    assert patience_exit(logits, 2).tolist() == [3, 2]  # N=2: three equal predictions
    assert patience_exit(logits, 0).tolist() == [0, 0]  # N=0: everyone leaves at layer 1
    assert patience_exit(logits, 9).tolist() == [3, 3]  # the last layer always exits
    # regression: values agree within a tolerance
    values = torch.tensor([[0.0], [1.0], [1.05], [1.08]]).view(4, 1, 1)
    assert patience_exit(values, 1, tolerance=0.1).tolist() == [2]
    assert patience_exit(values, 2, tolerance=0.1).tolist() == [3]
    assert patience_exit(values, 1, tolerance=2.0).tolist() == [1]
    # the engines' step: state carried across layers
    pol = PatiencePolicy(1)
    state = pol.init_state(2, "cpu")
    done, state = pol.step(0, logits[0], state)
    assert done.tolist() == [False, False] and state[1].tolist() == [0, 0]
    done, state = pol.step(1, logits[1], state)
    assert done.tolist() == [False, True]
    assert policy_exit(pol, logits).tolist() == [2, 1] and not math.isnan(float(ent.sum()))
