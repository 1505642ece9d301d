"""Run configurations: dataclasses validated in ``__post_init__``.

Precedence: dataclass defaults < ``--config file.yaml`` < command-line flags. Every run writes its
resolved config beside the weights."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .data.readers import DEFAULT_DATASET
from .data.examples import DataSpec
from .errors import UserError
from .files import typed_values

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_CHECKPOINT = "deebert-checkpoint"  # the checkpoint folder every command reads or writes by default


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


TASKS = ("classification", "regression")
PRECISIONS = ("fp32", "bf16", "fp16")  # same as core.device.PRECISIONS
REPORT_TO = ("none", "tensorboard", "wandb")  # same as core.train.tracking.REPORT_TO


def _check_precision(value: str):
    _check(value in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got '{value}'")


@dataclass
class DataOptions:
    dataset: str = DEFAULT_DATASET
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    train_split: str = "train"
    eval_split: str = "validation"
    validation_fraction: float = 0.1

    def _validate_data(self):
        _check(0.0 < self.validation_fraction < 1.0, f"validation_fraction must be in (0, 1), got {self.validation_fraction}")

    def data_spec(self, seed: int) -> DataSpec:
        return DataSpec(self.dataset, self.text_column, self.text_pair_column, self.label_column,
                        self.train_split, self.eval_split, self.validation_fraction, seed,
                        task=getattr(self, "task", "classification"))


@dataclass
class FinetuneConfig(DataOptions):
    """Stage 1: fine-tune backbone + final classifier on the last layer's cross-entropy."""

    model: str = DEFAULT_MODEL
    task: str = "classification"  # or "regression" (float label column, MSE, one output)
    max_length: int = 128
    epochs: float = 3.0  # evaluated after each; the best epoch's weights are kept
    max_steps: int | None = None
    max_train_samples: int | None = None
    batch_size: int = 32  # rows per forward pass; an optimizer update takes batch_size * grad_accum
    grad_accum: int = 1
    lr: float | None = None  # None: by backbone width (core.train.stage1.default_lr), resolved in the saved config
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    group_by_length: bool = True  # batches of similar-length rows (less padding), seeded random order
    early_stopping_patience: int | None = None  # stop after this many evaluations without improvement
    save_every: str | None = None  # resumable state every "N" optimizer steps or "N epochs"
    report_to: str = "none"  # none | tensorboard | wandb
    logging_dir: str | None = None  # default: <output>.logs
    seed: int = 42
    output: str = DEFAULT_CHECKPOINT
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with gradient scaling)

    def __post_init__(self):
        self._validate_data()
        _check(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got '{self.task}'")
        _check_precision(self.precision)
        _check(self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}")
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps > 0, f"max_steps must be > 0, got {self.max_steps}")
        _check(self.max_train_samples is None or self.max_train_samples > 0, "max_train_samples must be > 0")
        _check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        _check(self.lr is None or 0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}")
        _check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
               f"--early-stopping-patience must be >= 1, got {self.early_stopping_patience}")
        _check(self.report_to in REPORT_TO, f"--report-to must be one of {', '.join(REPORT_TO)}, got '{self.report_to}'")
        if self.save_every is not None:
            self.save_every = str(self.save_every).strip()
            self.save_every_parsed()

    def save_every_parsed(self) -> tuple | None:
        """``save_every`` as (N, "steps" | "epochs"): "200" or "200 steps" -> (200, "steps"); "epoch",
        "1 epoch", "2epochs" -> (N, "epochs")."""
        if self.save_every is None:
            return None
        m = re.fullmatch(r"(\d*)\s*(steps?|epochs?)?", self.save_every.lower())
        n = int(m.group(1)) if m and m.group(1) else (1 if m and m.group(2) else 0)
        _check(m is not None and n >= 1, f"--save-every takes N (optimizer steps), 'N steps' or 'N epochs', got '{self.save_every}'")
        return n, "epochs" if (m.group(2) or "").startswith("epoch") else "steps"


@dataclass
class TrainExitsConfig:
    """Stage 2: freeze backbone + final classifier, train off-ramps 1..L-1 on their mean cross-entropy."""

    checkpoint: str = DEFAULT_CHECKPOINT
    output: str | None = None  # default: write back into --checkpoint
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.0
    seed: int = 42
    # The off-ramp recipe. None everywhere (the default): several candidate recipes are trained on the one
    # frozen-pass cache and the best by measurement is kept (see core.recipes). Any of them given: exactly
    # one recipe, the unset ones at the plain DeeBERT values ([CLS], no norm, no distill, no calibration).
    # pooling: cls, mean, or auto (the family's own head's: cls; mean for a ModernBERT with mean pooling)
    ramp_pooling: str | None = None
    ramp_norm: bool | None = None
    distill: bool | None = None  # FastBERT-style self-distillation from the final classifier
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5  # weight of the distillation term (1 - alpha on the label loss)
    unlabeled: str | None = None  # extra texts (one per line, or a data file) used with --distill
    calibrate: bool | None = None  # per-off-ramp temperature scaling on the evaluation split
    max_drop: float | None = None  # accuracy budget (points) of the stored threshold and of the recipe choice (0.5)
    max_disagreement: float | None = None  # instead: budget on disagreement with the final layer (fraction)
    delta: float = 0.05  # the guarantee holds with probability >= 1 - delta
    guarantee: bool = True  # store the risk-controlled threshold (else the point estimate, as before)
    learned_exits: bool = False  # BERxiT: also train a Linear(H, 1) exit predictor per off-ramp
    device: str = "auto"
    dataset: str | None = None  # default: the data the checkpoint was fine-tuned on
    max_train_samples: int | None = None
    precision: str = "fp32"  # of the frozen backbone pass; the small off-ramps always train in fp32

    def __post_init__(self):
        _check(self.distill_temperature > 0, f"distill_temperature must be > 0, got {self.distill_temperature}")
        _check(0.0 <= self.distill_alpha <= 1.0, f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        _check(self.unlabeled is None or self.distill, "--unlabeled needs --distill (the final classifier provides the targets)")
        _check_precision(self.precision)
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        _check(0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}")
        _check(self.ramp_pooling in (None, "auto", "cls", "mean"), f"ramp_pooling must be auto, cls or mean, got '{self.ramp_pooling}'")
        _check(self.max_drop is None or (math.isfinite(self.max_drop) and self.max_drop >= 0),
               f"max_drop must be >= 0 (accuracy points), got {self.max_drop}")
        _check_risk_budget(self)
        # one budget is certified, as calibrate: never one certified and the other a point estimate
        _check(self.max_drop is None or self.max_disagreement is None,
               "give one budget: --max-drop (accuracy points) or --max-disagreement (a fraction), not both")
        _check(self.guarantee or self.max_disagreement is None,
               "--max-disagreement is the budget of the guarantee, which --no-guarantee turns off: "
               "give --max-drop with --no-guarantee (a point estimate), or drop --no-guarantee")
        _check(self.max_train_samples is None or self.max_train_samples > 0, "max_train_samples must be > 0")

    @property
    def points(self) -> float:
        """The accuracy budget in points of the point estimate (and of the guarantee without
        --max-disagreement): --max-drop, default 0.5."""
        return 0.5 if self.max_drop is None else self.max_drop

    @property
    def recipe_given(self) -> bool:
        """Whether the user chose the off-ramp recipe (any of pooling, norm, distill, calibrate set)."""
        return any(v is not None for v in (self.ramp_pooling, self.ramp_norm, self.distill, self.calibrate))


def _check_risk_budget(cfg) -> None:
    """--delta and --max-disagreement (the guarantee's confidence and the label-free budget)."""
    _check(isinstance(cfg.delta, (int, float)) and 0 < cfg.delta < 1,
           f"delta must be in (0, 1) (the guarantee holds with probability 1 - delta), got {cfg.delta}")
    _check(cfg.max_disagreement is None or (isinstance(cfg.max_disagreement, (int, float)) and 0 < cfg.max_disagreement < 1),
           f"max_disagreement must be a fraction in (0, 1) (0.02 = 2%), got {cfg.max_disagreement}")


ENGINES = ("shrink", "refill", "static", "auto")
FORMATS = ("text", "jsonl", "tsv")


def _parse_list(text, cast, message: str) -> list | None:
    """'a,b, c' (or a list, or one value) -> [cast(a), ...]; None or blank -> None."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, (list, tuple)):
        return [cast(t) for t in text]
    if isinstance(text, int) and cast is int:
        return [text]
    try:
        return [cast(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{message}, got '{text}'") from None


def parse_thresholds(text: str | None, what: str = "thresholds") -> list | None:
    """'0.1,0.2, 0.3' -> [0.1, 0.2, 0.3] (``what`` names the option in the error)."""
    return _parse_list(text, float, f"{what} must be comma-separated numbers")


def parse_ints(text, what: str) -> list | None:
    """'1,2, 3' -> [1, 2, 3] (a single int or a list passes through)."""
    return _parse_list(text, int, f"{what} must be comma-separated whole numbers")


EXIT_POLICIES = ("entropy", "patience", "learned")
RUNTIMES = ("torch", "onnx")  # same as core.runtime.stream.RUNTIMES
ONNX_PRECISIONS = ("fp32", "int8")


_FIELD_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,), "list": (list, str)}
_TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string", "list": "a list"}


def _check_types(cfg) -> None:
    """Each field holds its annotated type: a --config file can give a string, a list or a boolean where
    a number or a flag is meant (``batching: "no"`` is no False; a boolean is no number here)."""
    for f in dataclasses.fields(cfg):
        kinds = [k.strip() for k in str(f.type).split("|")]
        value = getattr(cfg, f.name)
        allowed = tuple(t for k in kinds for t in _FIELD_TYPES.get(k, ()))
        if (value is None and "None" in kinds) or not allowed:
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            shown = repr(value)
            raise TypeError(f"{f.name} must be {' or '.join(_TYPE_WORDS.get(k, k) for k in kinds if k != 'None')}, "
                            f"got {shown if len(shown) <= 40 else shown[:37] + '...'}")


def _check_runtime(cfg) -> None:
    """runtime / onnx_precision (and, where the config has it, precision) go together."""
    _check(cfg.runtime in RUNTIMES, f"runtime must be one of {', '.join(RUNTIMES)}, got '{cfg.runtime}'")
    _check(cfg.onnx_precision in ONNX_PRECISIONS,
           f"onnx_precision must be one of {', '.join(ONNX_PRECISIONS)}, got '{cfg.onnx_precision}'")
    _check(cfg.runtime == "onnx" or cfg.onnx_precision == "fp32", "--onnx-precision applies to --runtime onnx")
    _check(cfg.runtime == "torch" or getattr(cfg, "precision", "fp32") == "fp32",
           "--precision (autocast) applies to --runtime torch; the onnx runtime takes --onnx-precision fp32|int8")


@dataclass
class PredictConfig:
    """Early-exit prediction over lines of text."""

    checkpoint: str = DEFAULT_CHECKPOINT
    threshold: float | None = None  # None: the checkpoint's stored thresholds, else 0.3
    thresholds: list | None = None  # one per layer (the last is ignored: it always exits)
    entropy: str = "normalized"
    exit_policy: str = "entropy"  # entropy (DeeBERT), patience (PABEE) or learned (BERxiT)
    patience: int | None = None  # patience policy: exit once patience + 1 agree (None: certified value, else 3)
    tolerance: float = 0.1  # patience on a regression checkpoint: "agree" = differ by less than this
    batch_size: int = 32
    engine: str = "shrink"
    window: int = 1024
    max_length: int | None = None  # default: the checkpoint's
    format: str = "text"
    all_probs: bool = False
    input: str | None = None
    output: str | None = None
    device: str = "auto"
    summary: bool = True
    precision: str = "fp32"
    runtime: str = "torch"  # torch, or onnx (the graphs of `deebert export`, run by ONNX Runtime)
    onnx_precision: str = "fp32"  # onnx runtime: fp32 or int8 (`deebert export --quantize int8`)

    def __post_init__(self):
        _check_precision(self.precision)
        _check_runtime(self)
        self.thresholds = parse_thresholds(self.thresholds)
        _check(self.entropy in ("normalized", "raw"), f"entropy must be 'normalized' or 'raw', got '{self.entropy}'")
        for name, t in [("threshold", self.threshold)] * (self.threshold is not None) + [("thresholds", t) for t in self.thresholds or []]:
            _check(math.isfinite(t) and t >= 0, f"{name} must be finite numbers >= 0, got {t}")
            if self.entropy == "normalized":
                _check(t <= 1.0, f"{name} {t} is out of range: normalized entropy lies in [0, 1] (use --entropy raw for nats)")
        _check(self.exit_policy in EXIT_POLICIES, f"exit_policy must be one of {', '.join(EXIT_POLICIES)}, got '{self.exit_policy}'")
        _check(self.patience is None or self.patience >= 0, f"patience must be >= 0, got {self.patience}")
        _check(math.isfinite(self.tolerance) and self.tolerance > 0, f"tolerance must be > 0, got {self.tolerance}")
        _check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        _check(self.window >= self.batch_size, "window must be >= batch_size")
        _check(self.engine in ENGINES, f"engine must be one of {ENGINES}, got '{self.engine}'")
        _check(self.format in FORMATS, f"format must be one of {FORMATS}, got '{self.format}'")
        _check(self.max_length is None or self.max_length >= 8, "max_length must be >= 8")


@dataclass
class AnalyzeConfig:
    """Per-layer quality, threshold sweep, recommendation, dead weight, examples by exit layer."""

    checkpoint: str = DEFAULT_CHECKPOINT
    dataset: str | None = None  # default: the checkpoint's data
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    split: str | None = None  # default: the checkpoint's evaluation split
    test_split: str | None = "test"
    thresholds: list | None = None
    entropy: str = "normalized"
    max_drop: float = 0.5
    max_disagreement: float | None = None  # the guaranteed recommendation's budget on disagreement instead
    delta: float = 0.05  # confidence of the guaranteed recommendation (1 - delta)
    per_layer: bool = False  # also search one threshold per layer for the budget
    store_thresholds: bool = False  # write the recommended threshold(s) into the checkpoint for predict
    replace_guarantee: bool = False  # --store-thresholds may replace a certified threshold with a point estimate
    timing_thresholds: list | None = None
    timing_repeats: int = 2
    batch_size: int = 32
    examples: int = 3
    example_threshold: float | None = None  # default: the recommended threshold
    patience: list | None = None  # patience values to sweep beside the entropy thresholds (default 0..L-1)
    tolerance: float = 0.1  # regression checkpoints: patience agreement tolerance of the sweep
    learned_thresholds: list | None = None  # learned-exit thresholds to sweep (checkpoints with learned exits)
    exit_policy: list | None = None  # policies to compare (default: every one that applies to the checkpoint)
    json: str | None = None
    plot: str | None = None
    device: str = "auto"
    runtime: str = "torch"  # of the timed runs (and, for onnx, the export's accuracy beside torch fp32)
    onnx_precision: str = "fp32"

    def __post_init__(self):
        _check_runtime(self)
        self.thresholds = parse_thresholds(self.thresholds)
        self.timing_thresholds = parse_thresholds(self.timing_thresholds, "timing_thresholds")
        self.patience = parse_ints(self.patience, "patience")
        for n in self.patience or []:
            _check(n >= 0, f"patience values must be >= 0, got {n}")
        _check(math.isfinite(self.tolerance) and self.tolerance > 0, f"tolerance must be > 0, got {self.tolerance}")
        self.learned_thresholds = parse_thresholds(self.learned_thresholds, "learned_thresholds")
        for t in self.learned_thresholds or []:
            _check(0.0 <= t <= 1.0, f"learned_thresholds value {t} is out of range: learned exit scores lie in [0, 1]")
        if isinstance(self.exit_policy, str):
            self.exit_policy = [p.strip() for p in self.exit_policy.split(",") if p.strip()] or None
        for p in self.exit_policy or []:
            _check(p in EXIT_POLICIES, f"exit_policy must be among {', '.join(EXIT_POLICIES)}, got '{p}'")
        _check(self.entropy in ("normalized", "raw"), f"entropy must be 'normalized' or 'raw', got '{self.entropy}'")
        for name in ("thresholds", "timing_thresholds"):
            for t in getattr(self, name) or []:
                _check(math.isfinite(t) and t >= 0, f"{name} must be finite numbers >= 0, got {t}")
                if self.entropy == "normalized":
                    _check(t <= 1.0, f"{name} value {t} is out of range: normalized entropy lies in [0, 1]")
        _check(self.max_drop >= 0, f"max_drop must be >= 0 (accuracy points), got {self.max_drop}")
        _check_risk_budget(self)
        _check(not self.replace_guarantee or self.store_thresholds, "--replace-guarantee goes with --store-thresholds")
        _check(self.batch_size > 0, "batch_size must be > 0")
        _check(self.examples >= 0, "examples must be >= 0")
        _check(self.timing_repeats >= 1, "timing_repeats must be >= 1")
        if self.example_threshold is not None:
            _check(self.example_threshold >= 0, "example_threshold must be >= 0")
            if self.entropy == "normalized":
                _check(self.example_threshold <= 1.0, f"example_threshold {self.example_threshold} is out of range: normalized entropy lies in [0, 1]")


@dataclass
class CalibrateConfig:
    """`deebert calibrate`: certify an exit setting of a checkpoint on new labelled or unlabelled texts."""

    checkpoint: str = DEFAULT_CHECKPOINT
    dataset: str | None = None  # labelled texts: a data file (used whole) or folder (its --split)
    unlabeled: str | None = None  # or unlabelled texts: a .txt file (one per line) or a data file / folder
    split: str | None = None  # of a --dataset folder (default: its validation split)
    text_column: str | None = None  # default: the checkpoint's
    text_pair_column: str | None = None
    label_column: str | None = None
    max_drop: float | None = None  # points of accuracy (default 0.5 with --dataset)
    max_disagreement: float | None = None  # fraction (default 0.02 with --unlabeled)
    delta: float = 0.05
    exit_policy: str = "entropy"
    entropy: str = "normalized"
    tolerance: float = 0.1  # regression: "agree" / "no worse" within this
    check: bool = False  # only check the stored guarantee and report what would be certified; store nothing
    batch_size: int = 32
    device: str = "auto"
    json: str | None = None

    def __post_init__(self):
        _check((self.dataset is None) != (self.unlabeled is None), "give exactly one of --dataset (labelled texts) or --unlabeled (texts only)")
        _check(self.max_drop is None or (math.isfinite(self.max_drop) and 0 < self.max_drop < 100),
               f"max_drop must be in (0, 100) accuracy points, got {self.max_drop}")
        _check(self.max_drop is None or self.max_disagreement is None, "give one budget: --max-drop or --max-disagreement")
        _check_risk_budget(self)
        _check(self.exit_policy in EXIT_POLICIES, f"exit_policy must be one of {', '.join(EXIT_POLICIES)}, got '{self.exit_policy}'")
        _check(self.entropy in ("normalized", "raw"), f"entropy must be 'normalized' or 'raw', got '{self.entropy}'")
        _check(math.isfinite(self.tolerance) and self.tolerance > 0, f"tolerance must be > 0, got {self.tolerance}")
        _check(self.batch_size > 0, "batch_size must be > 0")

    @property
    def risk(self) -> str:
        """accuracy_drop (labelled, --max-drop) or disagreement (--max-disagreement, or texts without labels)."""
        return "disagreement" if self.max_disagreement is not None or self.unlabeled else "accuracy_drop"

    @property
    def epsilon(self) -> float:
        if self.max_disagreement is not None:
            return self.max_disagreement
        if self.max_drop is not None:
            return self.max_drop / 100
        return 0.02 if self.unlabeled else 0.005


# ------------------------------------------------------------------------------------------------
# loading / saving
# ------------------------------------------------------------------------------------------------
def field_names(cls) -> list:
    return [f.name for f in dataclasses.fields(cls)]


def default_of(cls, name: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def read_yaml(path: str | Path) -> dict:
    import yaml

    from .files import check_input_file, read_text

    p = check_input_file(path, "config file", "--config")
    try:
        data = yaml.safe_load(read_text(p, "config file (--config)")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{p}' must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls, file_values: dict | None = None, flags: dict | None = None, source: str = "config file"):
    """defaults < file_values < flags -> a validated ``cls``; bad keys or values raise UserError. The
    file's values are checked against the fields' types first (``source`` names the file)."""
    known = set(field_names(cls))
    merged: dict = {}
    for origin, values in ((source, file_values or {}), ("flags", flags or {})):
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown option(s) in {origin}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        merged.update(typed_values(cls, values, source) if origin == source else values)
    try:
        return cls(**merged)
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid option: {as_flags(str(e), known)}") from None


def as_flags(message: str, fields) -> str:
    """The one place where a config field becomes the flag a user types: in a validation message, a field
    name that leads it, and any snake_case field name, is written as its flag ('batch_size must be > 0'
    -> '--batch-size must be > 0'). A --config file uses the same names with dashes or underscores."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    head = re.match(r"\w+", message)
    if head and head.group(0) in fields:
        message = flag(head.group(0)) + message[head.end():]
    snake = sorted((f for f in fields if "_" in f), key=len, reverse=True)
    if snake:
        message = re.sub(r"(?<![\w-])(" + "|".join(map(re.escape, snake)) + r")(?!\w)", lambda m: flag(m.group(1)), message)
    return message


def to_yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


__all__ = [
    "FinetuneConfig", "TrainExitsConfig", "PredictConfig", "AnalyzeConfig", "ExportConfig", "ServeConfig", "build_config", "read_yaml",
    "to_yaml", "default_of", "DEFAULT_MODEL", "field",
]


QUANTIZE = ("int8",)


@dataclass
class ExportConfig:
    """``deebert export``: the highway model as ONNX graphs for the onnx runtime."""

    checkpoint: str = DEFAULT_CHECKPOINT
    output: str | None = None  # default: <checkpoint>/onnx
    quantize: str | None = None  # int8: also write dynamically quantized graphs
    opset: int = 17
    optimize: bool = True  # onnxruntime.transformers fusions (Attention, SkipLayerNorm, BiasGelu ...)

    def __post_init__(self):
        _check(self.quantize in (None, *QUANTIZE), f"quantize must be one of {', '.join(QUANTIZE)}, got '{self.quantize}'")
        _check(14 <= self.opset <= 20, f"opset must be in 14..20, got {self.opset}")
