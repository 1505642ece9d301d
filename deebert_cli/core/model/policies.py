"""Exit policies: entropy (DeeBERT), patience (PABEE) and learned (BERxiT), and the entropy they use.

Written once against the Python array API standard, through ``array_api_compat`` (a small, well-kept
library that gives numpy and torch one namespace of array operations), so the same code decides exits on
torch tensors (the torch runtime, analyze's sweeps) and on numpy arrays (the ONNX runtime), and nothing
here imports torch. The off-ramp module itself (torch) lives in :mod:`.ramps`."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from array_api_compat import array_namespace, device as array_device

POOLINGS = ("cls", "mean")
AUTO = "auto"  # a RampConfig pooling the highway model resolves to its family's own (cls, or mean for ModernBERT)


@dataclass
class RampConfig:
    """How an off-ramp reads a layer: which token summary (``cls`` = first token, as in DeeBERT, or
    ``mean`` over non-padding tokens; ``auto``, before the highway model resolves it, is whichever the
    family's own head reads) and whether to LayerNorm it first."""

    pooling: str = "cls"
    norm: bool = False
    dropout: float = 0.1
    learned_exit: bool = False  # BERxiT: a Linear(H, 1) + sigmoid exit predictor on the pooler output

    def __post_init__(self):
        if self.pooling not in POOLINGS + (AUTO,):
            raise ValueError(f"ramp pooling must be one of {POOLINGS + (AUTO,)}, got '{self.pooling}'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ramp dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


_NUMPY_IS_STANDARD = tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 1)


def namespace(*arrays):
    """The array API namespace of ``arrays``: numpy itself for numpy arrays (numpy >= 2.1 implements the
    standard in its main namespace; array_api_compat's numpy wrapper would add ~0.5 s of imports to every
    start of the onnx runtime), array_api_compat's wrapper for torch tensors."""
    if _NUMPY_IS_STANDARD and isinstance(arrays[0], (np.ndarray, np.generic)):
        return np
    return array_namespace(*arrays)


def default_namespace(xp=None):
    """``xp`` itself, or torch's array-API namespace when none is given (the torch engines' default)."""
    if xp is not None:
        return xp
    from array_api_compat import torch as xp_torch

    return xp_torch


# ------------------------------------------------------------------------------------------------
# entropy
# ------------------------------------------------------------------------------------------------
def entropy(logits):
    """Shannon entropy in nats of softmax(logits): [..., classes] -> [...] (torch tensor or numpy array).

    Computed in float32 as log S - sum(e * z) / S with z = logits - max (floored at -1e4, where exp is
    already 0), e = exp(z), S = sum(e), so logits of +-1e4 or bf16/fp16 inputs stay finite. Few array
    operations: the engines call this once per layer and batch, and at batch 1 their cost is per row."""
    xp = namespace(logits)
    x = xp.astype(logits, xp.float32, copy=False)
    z = _bound(xp, x - xp.max(x, axis=-1, keepdims=True), lo=-1e4)
    e = xp.exp(z)
    total = xp.sum(e, axis=-1)
    return _bound(xp, xp.log(total) - xp.sum(e * z, axis=-1) / total, lo=0.0)


def _bound(xp, x, lo=None, hi=None):
    """``x`` bounded by Python numbers: numpy's maximum/minimum (its fastest), else ``clip`` (torch.clamp),
    which makes no tensor from a host number: array_api_compat's torch maximum would, and a CUDA graph
    capture (the static engine) refuses that; clamp is also ~5x faster on small CPU tensors."""
    if xp is np:
        x = x if lo is None else np.maximum(x, lo)
        return x if hi is None else np.minimum(x, hi)
    return xp.clip(x, min=lo, max=hi)


def normalized_entropy(logits):
    """Entropy divided by ln(C), in [0, 1]: [..., classes] -> [...]."""
    c = logits.shape[-1]
    if c < 2:
        raise ValueError("normalized entropy needs at least 2 classes")
    xp = namespace(logits)
    return _bound(xp, entropy(logits) / math.log(c), hi=1.0)


def exit_entropy(logits, kind: str = "normalized"):
    """Entropy of the kind a threshold is expressed in: ``normalized`` (0..1) or ``raw`` (nats)."""
    if kind == "normalized":
        return normalized_entropy(logits)
    if kind == "raw":
        return entropy(logits)
    raise ValueError(f"entropy kind must be 'normalized' or 'raw', got '{kind}'")


def max_entropy(num_labels: int, kind: str) -> float:
    """Largest possible entropy for ``num_labels`` classes in the given unit."""
    return 1.0 if kind == "normalized" else math.log(num_labels)


def first_exit(signal, thresholds):
    """Exit layer index (0-based) per sample for the entropy rule.

    signal: [layers, n] entropy at every exit; thresholds: [layers] (the last layer always exits).
    A sample leaves at the first layer whose entropy is strictly below that layer's threshold."""
    xp = namespace(signal, thresholds)
    fires = signal < xp.reshape(thresholds, (-1, 1))  # [layers, n]
    fires[-1, ...] = True
    # argmax returns the first maximum (True) along the layers
    return xp.argmax(xp.astype(fires, xp.int32), axis=0)


# ------------------------------------------------------------------------------------------------
# exit policies: one decision step per layer, with per-row state that travels with the row
# ------------------------------------------------------------------------------------------------
POLICIES = ("entropy", "patience", "learned")


class EntropyPolicy:
    """DeeBERT: leave after layer i if the off-ramp's entropy is strictly below ``thr[i]``. Stateless."""

    needs_score = False

    def __init__(self, thresholds, kind: str = "normalized"):
        self.thr, self.kind = thresholds, kind  # [layers], an array of the engine's namespace
        self._never = [bool(t <= 0) for t in thresholds]  # entropy is >= 0: nobody leaves at these layers

    def init_state(self, b: int, device=None, xp=None) -> tuple:
        return ()

    def can_exit(self, i: int) -> bool:
        """Whether any row may leave at layer i (an engine skips the off-ramp where none may)."""
        return not self._never[i]

    def step(self, i: int, logits, state: tuple, score=None) -> tuple:
        """logits [b, C] at layer i -> (done [b] bool, new state)."""
        if self._never[i]:  # the answer without computing the entropy (threshold 0: full depth)
            xp = namespace(logits)
            return xp.zeros(logits.shape[:1], dtype=xp.bool, device=None if xp is np else array_device(logits)), state
        return exit_entropy(logits, self.kind) < self.thr[i], state


class PatiencePolicy:
    """PABEE (Zhou et al. 2020). Each row keeps (last prediction, streak): ``streak`` counts the layers
    in a row, ending at the current one, whose prediction agrees with the layer before. A row leaves after
    layer i (0-based) as soon as ``streak >= patience``, i.e. when the predictions of layers
    i-patience..i all agree (patience + 1 equal predictions). Classification: predictions are the argmax
    class and agree when equal. Regression (``tolerance`` set): the prediction is the single output and
    consecutive values agree when they differ by less than ``tolerance``. ``patience`` 0 exits everyone
    at layer 1; the engine always exits at the last layer."""

    needs_score = False

    def __init__(self, patience: int, tolerance: float | None = None):
        self.patience, self.tolerance = patience, tolerance

    def prediction(self, logits):
        """[b, C] -> [b] float: the argmax class, or the value for regression."""
        xp = namespace(logits)
        if self.tolerance is not None:
            return xp.astype(logits[:, 0], xp.float32)
        return xp.astype(xp.argmax(logits, axis=-1), xp.float32)

    def can_exit(self, i: int) -> bool:
        return True  # the streak needs every layer's prediction

    def init_state(self, b: int, device=None, xp=None) -> tuple:
        """(last prediction [b] float, streak [b] int64); torch tensors unless ``xp`` says otherwise."""
        xp = default_namespace(xp)
        return xp.zeros((b,), dtype=xp.float32, device=device), xp.zeros((b,), dtype=xp.int64, device=device)

    def step(self, i: int, logits, state: tuple, score=None) -> tuple:
        """logits [b, C] at layer i, state (last [b], streak [b]) -> (done [b] bool, (pred, streak))."""
        xp = namespace(logits)
        pred = self.prediction(logits)
        last, streak = state
        if i == 0:
            streak = xp.zeros_like(streak)
        else:
            same = xp.abs(pred - last) < self.tolerance if self.tolerance is not None else pred == last
            streak = xp.where(same, streak + 1, xp.zeros_like(streak))
        return streak >= self.patience, (pred, streak)


class LearnedPolicy:
    """BERxiT (Xin et al. 2021): each off-ramp's learned exit predictor scores its own output. A row leaves
    after layer i when the score crosses ``threshold``: classification, the predicted chance of being
    right is strictly above it; regression, the predicted tanh(|error|) is strictly below it. Stateless;
    the engine always exits at the last layer (which has no predictor)."""

    needs_score = True

    def __init__(self, threshold: float, regression: bool = False):
        self.threshold, self.regression = threshold, regression

    def can_exit(self, i: int) -> bool:
        return True

    def init_state(self, b: int, device=None, xp=None) -> tuple:
        return ()

    def step(self, i: int, logits, state: tuple, score=None) -> tuple:
        """score [b] at layer i -> (done [b] bool, state)."""
        return (score < self.threshold) if self.regression else (score > self.threshold), state


class ScriptedPolicy:
    """A timing mode (benchmarks' scripted exits): ``inner`` decides as usual at every layer (off-ramp,
    entropy, comparison: all the real work), then each row leaves at its scripted layer instead. Rows get
    their layers in the order they enter an engine (``init_state`` takes the next ones from ``script``, a
    deque the caller fills); the layer travels with the row as the last part of its state."""

    def __init__(self, inner, script):
        self.inner, self.script = inner, script
        self.needs_score = inner.needs_score

    def can_exit(self, i: int) -> bool:
        return True

    def init_state(self, b: int, device=None, xp=None) -> tuple:
        xp = default_namespace(xp)
        layers = xp.asarray([self.script.popleft() for _ in range(b)], dtype=xp.int64, device=device)
        return self.inner.init_state(b, device, xp) + (layers,)

    def step(self, i: int, logits, state: tuple, score=None) -> tuple:
        done, inner = self.inner.step(i, logits, state[:-1], score)
        return state[-1] == i, inner + (state[-1],)


def policy_exit(policy, logits, scores=None):
    """Exit layer (0-based) per sample of ``policy`` from all-exits logits [layers, n, C] (and learned exit
    scores [layers - 1, n] for the learned policy) -> [n]; the same steps the engines take, run over every
    layer at once (the last layer always exits)."""
    xp = namespace(logits)
    dev = None if xp is np else array_device(logits)
    L, n = logits.shape[:2]
    state = policy.init_state(n, dev, xp)
    layer = xp.full((n,), L - 1, dtype=xp.int64, device=dev)
    open_ = xp.ones((n,), dtype=xp.bool, device=dev)
    for i in range(L - 1):
        score = None if scores is None else xp.astype(scores[i], xp.float32)
        done, state = policy.step(i, xp.astype(logits[i], xp.float32), state, score)
        layer[open_ & done] = i
        open_ = open_ & ~done
    return layer


def patience_exit(logits, patience: int, tolerance: float | None = None):
    """Exit layer (0-based) under the patience rule (see :class:`PatiencePolicy`): [layers, n, C] -> [n]."""
    return policy_exit(PatiencePolicy(patience, tolerance), logits)
