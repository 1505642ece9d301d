"""The one schema of a checkpoint's ``deebert.json``: every field the inference and guarantee paths use,
with its JSON type, range, unit and what may stand beside it, declared once as a table (:data:`FIELDS`)
and checked on every read (:func:`check_meta`, called by :func:`.checkpoint.read_meta`, by the ONNX
runtime's own reading and before any rewrite). A violation is one :class:`~..errors.UserError` line
naming the file, the field and what to do; no value is used that the command-line flags would refuse.

Adding a field is one row of :data:`FIELDS`. Fields the table does not name are kept and not checked
(metrics, timing, recipes ... are reports, not inputs). ``docs/checkpoint.md`` shows the table
(tests/test_contract.py checks that every row is there)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError

# what to do, by the part of deebert.json that is damaged
RESTORE = "restore deebert.json from a copy"
TODO = {
    "thresholds": "store new thresholds with `deebert train-exits` (or `deebert analyze --store-thresholds`), or " + RESTORE,
    "guarantee": "certify anew with `deebert calibrate`, or " + RESTORE,
    "recipes": RESTORE + ", or make the checkpoint again (`deebert finetune`, then `deebert train-exits`)",
    "": "restore the checkpoint from a copy, or make it again (`deebert finetune`, then `deebert train-exits`)",
}
RISKS = {"classification": ("accuracy_drop", "disagreement"), "regression": ("error_increase", "disagreement")}
POLICIES = ("entropy", "patience", "learned")
UNITS = ("normalized", "raw")
METHODS = ("binomial", "exact", "betting")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v) -> bool:
    return _num(v) and float(v).is_integer()


# ---- range checks: (value, the whole metadata) -> None when fine, else what it should be ----------------
def one_of(*allowed) -> Callable:
    want = f"one of {', '.join(map(str, allowed))}"

    def check(v, m):
        return None if v in allowed else want
    check.desc = want
    return check


def number(lo=None, hi=None, lo_open=False, hi_open=False, whole=False) -> Callable:
    """A finite number (``whole``: an integer) in the interval; None bounds are open ends."""
    def check(v, m):
        ok = (_whole(v) if whole else _num(v)) and (lo is None or (v > lo if lo_open else v >= lo)) \
            and (hi is None or (v < hi if hi_open else v <= hi))
        return None if ok else want
    what = "a whole number" if whole else "a finite number"
    if lo is not None and hi is not None:
        want = f"{what} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        want = f"{what} {'>' if lo_open else '>='} {lo:g}"
    else:
        want = what
    check.desc = want
    return check


def text(v, m):
    """a string"""
    return None if isinstance(v, str) else "a string"


def _layers(m) -> int | None:
    L = m.get("num_layers")
    return L if _whole(L) and L >= 2 else None


def _threshold_range(unit: str) -> Callable:
    """What --threshold accepts in ``unit``: normalized [0, 1]; raw (nats) a finite number >= 0."""
    return number(0, 1) if unit == "normalized" else number(0)


def thresholds_values(v, m):
    """One threshold per layer 1..L-1, each what --threshold accepts in the stored unit."""
    if not isinstance(v, list):
        return "a list of numbers"
    unit = (m.get("thresholds") or {}).get("entropy", "normalized")
    rng = _threshold_range(unit if unit in UNITS else "normalized")
    bad = next((t for t in v if rng(t, m) is not None), None)
    if bad is not None or not v:
        return f"a list of {rng.desc.replace('a finite number', 'finite numbers')} ({unit} entropy), got {_show(bad) if v else 'none'}"
    L = _layers(m)
    if L is not None and len(v) != L - 1:
        return f"needs {L - 1} values (one per layer 1..{L - 1}: num_layers is {L}), got {len(v)}"
    return None


def guarantee_value(v, m):
    """The certified setting, by policy: entropy as a threshold, patience a whole number in [0, L-1],
    learned in [0, 1]; null: nothing beyond full depth was certified."""
    g = m["guarantee"]
    policy, L = g.get("policy"), _layers(m)
    if v is None:
        return None
    if policy == "patience":
        return number(0, (L - 1) if L else None, whole=True)(v, m)
    if policy == "learned":
        return number(0, 1)(v, m)
    return _threshold_range(g.get("entropy", "normalized"))(v, m)


thresholds_values.desc = "L-1 values, each as --threshold takes it: normalized in [0, 1], raw (nats) >= 0"
guarantee_value.desc = "entropy: as a threshold; patience: a whole number in [0, L-1]; learned: in [0, 1]; null"


def risk_kind(v, m):
    """classification: accuracy_drop or disagreement; regression: error_increase or disagreement"""
    allowed = RISKS["regression" if m.get("task") == "regression" else "classification"]
    return None if v in allowed else f"one of {', '.join(allowed)} (a {m.get('task', 'classification')} checkpoint)"


def losses(v, m):
    """a whole number in [0, n]"""
    n = m["guarantee"].get("n")
    return number(0, n if _whole(n) else None, whole=True)(v, m)


def exit_layer(v, m):
    """a finite number in [1, num_layers]"""
    L = _layers(m)
    return number(1, L)(v, m)


def gpu_measurement(v, m):
    """{precision: {batch size: early exit's texts/s over full depth's}}: fp32/bf16/fp16 keys, whole batch
    sizes >= 1, finite ratios > 0 (read by ``--engine auto`` on CUDA)."""
    want = "{fp32|bf16|fp16: {batch size: a finite ratio > 0}}"
    if not isinstance(v, dict):
        return want
    for prec, by_batch in v.items():
        if prec not in ("fp32", "bf16", "fp16") or not isinstance(by_batch, dict):
            return want
        for b, r in by_batch.items():
            if not (isinstance(b, str) and b.isdigit() and int(b) >= 1) or not (_num(r) and r > 0):
                return want
    return None


gpu_measurement.desc = "{fp32|bf16|fp16: {batch size: early exit / full depth texts/s, > 0}}"
def risk_bound(v, m):
    """the exact binomial bound of a rate: in [0, 1]; the exact or betting bound of the accuracy drop (a mean of
    signed losses, negative when the exits are more accurate): in [-1, 1]"""
    lo = -1 if m["guarantee"].get("method") in ("betting", "exact") else 0
    return number(lo, 1)(v, m)


risk_bound.desc = "binomial: [0, 1]; exact or betting (the drop itself): [-1, 1]"
pos_int = number(1, whole=True)
anything = lambda v, m: None  # noqa: E731  (an object the table does not look into)
anything.desc = ""


@dataclass(frozen=True)
class Field:
    """One field of deebert.json: ``name`` (dotted: ``guarantee.epsilon``), its JSON type, the check of its
    value, its unit and meaning, whether a present parent object must hold it, and whether null is allowed."""

    name: str
    type: str
    check: Callable
    unit: str
    doc: str
    required: bool = False
    null: bool = False


# fmt: off
FIELDS = (
    Field("stage", "string", one_of("finetuned", "exits_trained"), "", "what the checkpoint holds: the fine-tuned model, or trained off-ramps too"),
    Field("task", "string", one_of("classification", "regression"), "", "classification or regression (one output)"),
    Field("num_layers", "integer", number(2, whole=True), "layers", "L, the backbone's layers (off-ramps 1..L-1)"),
    Field("max_length", "integer", number(8, whole=True), "tokens", "longest input in tokens (as --max-length)"),
    Field("family", "string", text, "", "the backbone family (bert, roberta, ...)"),
    Field("format_version", "integer", number(1, whole=True), "", "the checkpoint format"),
    Field("ramp", "object", anything, "", "the off-ramp config (pooling, norm, dropout, learned exit)"),
    Field("data", "object", anything, "", "the data spec it was trained on (columns, splits)"),
    Field("gpu_measurement", "object", gpu_measurement, "ratio", "a one-off GPU measurement: early exit's texts/s over full depth's by precision and batch size (--engine auto runs full depth where it is below 1)"),
    Field("thresholds.entropy", "string", one_of(*UNITS), "", "the unit of the values: normalized (0..1) or raw (nats)"),
    Field("thresholds.values", "list", thresholds_values, "entropy", "the stored thresholds predict uses when given none: L-1 values, normalized in [0, 1], raw >= 0", required=True),
    Field("thresholds.search", "string", text, "", "how they were chosen: guaranteed, global, per-layer"),
    Field("thresholds.chosen_on", "string", text, "", "the texts they were chosen on", null=True),
    Field("thresholds.by", "string", text, "", "the command that stored them", null=True),
    Field("thresholds.max_drop", "number", number(0), "points", "the accuracy budget of the point estimate", null=True),
    Field("thresholds.point_estimate", "number", number(0), "entropy", "train-exits' point estimate beside a guaranteed one", null=True),
    Field("guarantee.risk", "string", risk_kind, "", "what is bounded: accuracy_drop or disagreement (regression: error_increase or disagreement)", required=True),
    Field("guarantee.epsilon", "number", number(0, 1, True, True), "fraction", "the budget (0.005 = half a point of accuracy)", required=True),
    Field("guarantee.delta", "number", number(0, 1, True, True), "fraction", "it holds with probability >= 1 - delta", required=True),
    Field("guarantee.n", "integer", pos_int, "texts", "calibration texts", required=True),
    Field("guarantee.policy", "string", one_of(*POLICIES), "", "the policy certified: entropy, patience or learned", required=True),
    Field("guarantee.value", "number", guarantee_value, "by policy", "the certified setting: entropy threshold (as thresholds), patience 0..L-1, learned [0, 1]; null: full depth only", required=True, null=True),
    Field("guarantee.losses", "integer", losses, "texts", "losses at the value on the calibration texts, 0..n", required=True),
    Field("guarantee.empirical", "number", number(0, 1), "fraction", "losses / n", required=True),
    Field("guarantee.bound", "number", risk_bound, "fraction", "upper confidence bound of the risk at the value (<= epsilon when certified)", required=True),
    Field("guarantee.mean_exit_layer", "number", exit_layer, "layers", "mean exit layer on the calibration texts, 1..L", required=True),
    Field("guarantee.layer_saving", "number", number(0, 1, hi_open=True), "fraction", "1 - mean exit layer / L", required=True),
    Field("guarantee.tested", "integer", number(0, whole=True), "settings", "settings tried in sequence", required=True),
    Field("guarantee.family", "integer", pos_int, "candidates", "candidates compared, each tested at delta / family"),
    Field("guarantee.min_n", "integer", number(0, whole=True), "texts", "texts needed to certify anything", null=True),
    Field("guarantee.entropy", "string", one_of(*UNITS), "", "the unit of an entropy value"),
    Field("guarantee.tolerance", "number", number(0, lo_open=True), "output units", "regression: the tolerance of losses and patience", null=True),
    Field("guarantee.accuracy_drop", "number", number(-1, 1), "fraction", "labelled calibration: the observed drop at the value", null=True),
    Field("guarantee.calibrated_on", "string", text, "", "which texts", null=True),
    Field("guarantee.by", "string", text, "", "the command that certified it", null=True),
    Field("guarantee.method", "string", one_of(*METHODS), "", "the bound that certified the value: binomial, exact or betting"),
    Field("guarantee.level", "number", number(0, 1, True, True), "probability", "the level each test ran at (delta / family; older checkpoints: halved when two bounds ran)", null=True),
    Field("guarantee.selection", "string", one_of("union", "split"), "", "how the off-ramp recipe was chosen: union (each at delta / family) or split (chosen on a disjoint part)", null=True),
    Field("guarantee.disagreement_rate", "number", number(0, 1), "fraction", "disagreement with the final layer at the value on the calibration texts", null=True),
    Field("recipes.selection", "string", one_of("union", "split"), "", "how train-exits paid for its choice among recipes: union (each at delta / their number) or split (chosen on a seeded part of the split, certified on the rest)", null=True),
    Field("recipes.select_fraction", "number", number(0, 1, True, True), "fraction", "split: the share of the evaluation split the recipe was chosen on (analyze certifies on the rest)"),
)
# fmt: on
OBJECTS = ("thresholds", "guarantee", "recipes")  # the nested objects the table describes
_TYPES = {"string": (str,), "integer": (int, float), "number": (int, float), "list": (list,), "object": (dict,)}


def top_level_types() -> dict:
    """{field: python types} of the top-level fields (for :func:`..files.check_shape`)."""
    shape = {f.name: _TYPES[f.type] for f in FIELDS if "." not in f.name}
    return {**shape, **{o: dict for o in OBJECTS}}


def _problem(f: Field, meta: dict, v) -> str | None:
    if v is None:
        return None if f.null else "null"
    ok_type = isinstance(v, _TYPES[f.type]) and not isinstance(v, bool)
    if not ok_type:
        return f"should be {_A.get(f.type, f.type)}, not {_show(v)}"
    want = f.check(v, meta)
    if want is None:
        return None
    if want.startswith("needs "):
        return want
    return f"should be {want}" if " got " in want else f"should be {want}, not {_show(v)}"


_OBJ = "should be an object"
_A = {"string": "a string", "integer": "a whole number", "number": "a number", "list": "a list", "object": "an object"}


def _show(v) -> str:
    s = repr(v) if not isinstance(v, float) or math.isfinite(v) else str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def problems(meta: dict) -> list:
    """Every violation of the schema in ``meta`` -> [(field, what is wrong)] (empty: it fits)."""
    out, seen = [], set()
    for f in FIELDS:
        parent, _, key = f.name.rpartition(".")
        holder = meta.get(parent) if parent else meta
        if parent and not isinstance(holder, dict):
            if parent in meta and parent not in seen:
                seen.add(parent)
                out.append((parent, f"{_OBJ}, not {_show(holder)}" if holder is not None else "is null"))
            continue
        if key not in holder:
            if f.required:
                out.append((f.name, "is missing"))
            continue
        why = _problem(f, meta, holder[key])
        if why is not None:
            out.append((f.name, "is null" if why == "null" else why))
    return out + _coexist(meta)


def _coexist(meta: dict) -> list:
    """What may stand together: a certified guarantee's bound within its budget, and entropy thresholds
    stored as guaranteed in the unit of the entropy guarantee beside them."""
    g, thr = meta.get("guarantee"), meta.get("thresholds")
    out = []
    if not isinstance(g, dict):
        return out
    if g.get("value") is not None and _num(g.get("bound")) and _num(g.get("epsilon")) and g["bound"] > g["epsilon"] + 1e-12:
        out.append(("guarantee.bound", f"is {g['bound']:g}, above its budget epsilon {g['epsilon']:g}: nothing so "
                                       "bounded is certified"))
    if (isinstance(thr, dict) and thr.get("search") == "guaranteed" and g.get("policy") == "entropy"
            and thr.get("entropy", "normalized") != g.get("entropy", "normalized")):
        out.append(("thresholds.entropy", f"is '{thr.get('entropy', 'normalized')}' but the entropy guarantee they "
                                          f"are stored as is in '{g.get('entropy', 'normalized')}' entropy"))
    return out


def check_meta(meta: dict, path) -> dict:
    """``meta`` (read from ``path``, the deebert.json) when it fits the schema; else one UserError line
    naming the file, the first field at fault and what to do."""
    found = problems(meta)
    if not found:
        return meta
    name, why = found[0]
    part = name.split(".")[0] if name.split(".")[0] in OBJECTS else ""
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise UserError(f"checkpoint metadata '{Path(path)}' is damaged: '{name}' {why}{more}; {TODO[part]}")


def markdown_table() -> str:
    """The schema as the markdown table of docs/checkpoint.md."""
    rows = ["| field | type | range | unit | meaning |", "|---|---|---|---|---|"]
    for f in FIELDS:
        rng = getattr(f.check, "desc", None) or (f.check.__doc__ or "").strip().split("\n")[0].rstrip(".")
        rows.append(f"| `{f.name}` | {f.type}{' or null' if f.null else ''}{' (required)' if f.required else ''} "
                    f"| {rng} | {f.unit} | {f.doc} |")
    return "\n".join(rows)
