"""Checkpoint directory: a plain transformers classifier plus off-ramps, written atomically.

Layout (every file readable without unpickling)::

    config.json, model.safetensors   the final exit: loads as AutoModelForSequenceClassification
    tokenizer files                  tokenizer.json / vocab ...
    highway.safetensors              off-ramps of layers 1..L-1 (ramps.{i}.*)
    deebert.json                     stage, family, ramp config, data spec, metrics, stored thresholds
    finetune_config.yaml, train_exits_config.yaml   resolved configs of the runs that wrote it
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..files import atomic_dir, check_output_folder, check_readable, read_json, usual_mode
from . import schema

FORMAT_VERSION = 1
META_FILE = "deebert.json"
RAMPS_FILE = "highway.safetensors"
STAGE_FINETUNED = "finetuned"
STAGE_EXITS = "exits_trained"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its tokenizer and its metadata (``deebert.json``)."""

    model: object  # HighwayModel
    tokenizer: object
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def stage(self) -> str:
        return self.meta.get("stage", STAGE_FINETUNED)

    @property
    def exits_trained(self) -> bool:
        return self.stage == STAGE_EXITS

    @property
    def task(self) -> str:
        """``classification`` or ``regression`` (one output)."""
        return self.meta.get("task", "classification")

    @property
    def label_names(self) -> list[str]:
        id2label = self.model.config.id2label
        return [id2label[i] for i in range(len(id2label))]

    def data_spec(self, **overrides):
        """The data the checkpoint was trained on (``deebert.json``'s ``data``), with ``overrides``."""
        from ..data.examples import DataSpec

        try:
            return DataSpec(**{**self.meta.get("data", {}), **overrides})
        except TypeError as e:
            raise UserError(f"checkpoint metadata '{Path(self.path or '.') / META_FILE}' is damaged: 'data' {e}; "
                            f"{META_TODO}") from None


MODEL_FILE = "model.safetensors"
RUN_CONFIGS = ("finetune_config.yaml", "train_exits_config.yaml")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spm.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja")
# what a checkpoint write owns and replaces; anything else in a folder it writes over (an export in onnx/,
# a user's notes) is carried over into the new checkpoint
OWNED = frozenset((META_FILE, RAMPS_FILE, MODEL_FILE, "model.safetensors.index.json", "config.json",
                   "generation_config.json", *RUN_CONFIGS, *TOKENIZER_FILES))
# the JSON types of the report fields of deebert.json; the fields predict and the guarantee use are
# checked against the one schema (.schema.FIELDS: types, ranges, units, what may coexist) on every read
META_SHAPE = {"metrics": dict, "recipes": dict, "timing": dict, "calibration": list, "learned_exits": list,
              "base_model": str, "eval_source": str}
META_TODO = schema.TODO[""]


def owned_by_checkpoint(name: str) -> bool:
    """Whether an entry of a checkpoint folder is one a checkpoint write replaces (weights, configs,
    tokenizer, metadata, weight shards)."""
    return name in OWNED or (name.startswith("model-") and name.endswith(".safetensors"))


def is_checkpoint(path: Path) -> bool:
    """A folder this tool wrote as a checkpoint (a later write may replace it)."""
    return (Path(path) / META_FILE).is_file()


def check_checkpoint_output(output, flag: str = "--output") -> None:
    """Before any work: ``output`` may be written as a checkpoint folder (new, empty, or a checkpoint this
    tool wrote, whose other files are then kept; never a folder of the user's own, the current folder or one
    holding it) and its place can be written (:func:`..files.check_output_folder`)."""
    check_output_folder(output, flag, owned=is_checkpoint, kind="a deebert checkpoint")


def save_checkpoint(ckpt: Checkpoint, path: str | Path, extra_files: dict[str, str] | None = None,
                    keep_files_from: str | Path | None = None) -> Path:
    """Write ``ckpt`` to ``path`` atomically. ``extra_files`` maps file name -> text (e.g. configs);
    ``keep_files_from`` names a checkpoint whose run configs (*.yaml) are carried over. What a checkpoint
    already at ``path`` holds beyond a checkpoint's own files (an export in ``onnx/``, which then reads as
    stale) is kept."""
    from safetensors.torch import save_file

    path = Path(path)
    model = ckpt.model
    with atomic_dir(path, owned=owned_by_checkpoint) as tmp:
        # keep the configs of earlier runs (e.g. finetune_config.yaml) that this write does not replace
        if keep_files_from is not None and Path(keep_files_from).is_dir():
            for f in Path(keep_files_from).glob("*.yaml"):
                shutil.copy2(f, tmp / f.name)
        model.model.save_pretrained(tmp, safe_serialization=True)
        if ckpt.tokenizer is not None:
            ckpt.tokenizer.save_pretrained(tmp)
        ramps = {f"ramps.{k}": v.detach().contiguous().cpu() for k, v in model.ramps.state_dict().items()}
        save_file(ramps, str(tmp / RAMPS_FILE), metadata={"format": "deebert", "version": str(FORMAT_VERSION)})
        meta = dict(ckpt.meta)
        meta.update(
            format_version=FORMAT_VERSION,
            family=model.family,
            num_layers=model.num_layers,
            ramp=model.ramp_cfg.to_dict(),
        )
        meta.setdefault("stage", STAGE_FINETUNED)
        schema.check_meta(meta, path / META_FILE)  # never written unless every later read accepts it
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for weights in tmp.glob("*.safetensors"):  # safetensors writes 0600: others could not read the checkpoint
            usual_mode(weights)
    ckpt.path = path
    ckpt.meta = meta
    return path


def update_meta(path, fields: dict, drop: tuple = ()) -> tuple:
    """Set ``fields`` (and remove ``drop``) in checkpoint ``path``'s ``deebert.json``, written atomically
    (a temporary sibling renamed over it) -> (the new metadata, the line saying what it replaced in the
    stored thresholds and guarantee, or None). Every command that stores something in a checkpoint
    (stored thresholds, a guarantee) goes through here; the result is checked against the schema before
    it is written."""
    from ..files import atomic_text_file
    from .guarantee import replacement

    meta_path = Path(path) / META_FILE
    old = read_checked(meta_path)
    meta = {**old, **fields}
    for name in drop:
        meta.pop(name, None)
    schema.check_meta(meta, meta_path)
    with atomic_text_file(meta_path) as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta, replacement(old, meta)


def read_meta(path: Path, ramps: bool = True) -> dict:
    """The checkpoint folder's ``deebert.json``, checked: an object with fields of the right types, a
    known stage, and every file that stage needs present and readable (:func:`check_files`; the trained
    off-ramps only with ``ramps``)."""
    meta = read_checked(path / META_FILE)
    check_files(path, meta.get("stage", STAGE_FINETUNED) if ramps else STAGE_FINETUNED)
    return meta


def read_checked(meta_path: Path, todo: str = META_TODO) -> dict:
    """A ``deebert.json`` read and checked against the one schema (:func:`.schema.check_meta`): every
    command and the server read it through here (the ONNX runtime too), so none uses a value the flags
    would refuse. ``todo``: what to do when the file is missing or not JSON."""
    meta = read_json(meta_path, "checkpoint metadata", todo, META_SHAPE)
    return schema.check_meta(meta, meta_path)


def check_files(path: Path, stage: str) -> None:
    """UserError naming the file when the checkpoint lacks one its stage needs (the final classifier's
    config and weights; off-ramps once they are trained) or cannot read it."""
    needed = [("config.json", "the model's config", "copy the whole checkpoint folder again")]
    if not (path / "model.safetensors.index.json").is_file():
        needed.append((MODEL_FILE, "the model's weights", "copy the whole checkpoint folder again"))
    if stage == STAGE_EXITS:
        needed.append((RAMPS_FILE, f"the trained off-ramps its stage ({STAGE_EXITS}) needs",
                       f"copy the whole checkpoint folder again, or train them anew with "
                       f"`deebert train-exits --checkpoint {path}`"))
    for name, what, todo in needed:
        if not (path / name).exists():
            raise UserError(f"checkpoint '{path}' is missing {name}, {what}: {todo}")
        check_readable(path / name, "checkpoint file", todo)


def ramp_config(meta: dict, path: Path):
    """The off-ramp config stored in ``deebert.json`` (one line naming the file when it does not fit)."""
    from .policies import RampConfig

    try:
        return RampConfig(**meta.get("ramp", {}))
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint metadata '{path / META_FILE}' is damaged: 'ramp' {e}; {META_TODO}") from None


def load_checkpoint(path: str | Path, device=None, ramps: bool = True) -> Checkpoint:
    """Load a checkpoint directory written by :func:`save_checkpoint` (safetensors only, no pickles).
    ``ramps=False``: its off-ramps are not needed (``train-exits`` trains new ones), so the model gets fresh
    ones and a missing ``highway.safetensors`` is no error."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .highway import HighwayModel, load_hf

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"no checkpoint at '{path}' (run `deebert finetune` first, or pass --checkpoint DIR)")
    if not (path / META_FILE).is_file() or not (path / "config.json").is_file():
        raise UserError(f"'{path}' is not a deebert checkpoint (no {META_FILE}/config.json); run `deebert finetune` to make one")
    meta = read_meta(path, ramps)
    ramp_cfg = ramp_config(meta, path)
    model_hf = load_hf(AutoModelForSequenceClassification, str(path))
    if not ramps or not (path / RAMPS_FILE).is_file():  # or a stage-1 checkpoint of an older version: fresh off-ramps
        model = HighwayModel(model_hf, ramp_cfg, init_from_pooler=False)
    else:
        model = _with_ramps(model_hf, ramp_cfg, path / RAMPS_FILE)
    tokenizer = load_hf(AutoTokenizer, str(path)) if _has_tokenizer(path) else None
    model.eval()
    if device is not None:
        model.to(device)
    return Checkpoint(model=model, tokenizer=tokenizer, meta=meta, path=path)


def _with_ramps(model_hf, ramp_cfg, ramps_path: Path):
    """The highway model with the off-ramps of ``ramps_path``. They are built without memory or random
    init (meta device) and take the loaded tensors as they are (assign): no initialisation that the file
    then overwrites, no copies."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .highway import HighwayModel

    with torch.device("meta"):
        model = HighwayModel(model_hf, ramp_cfg, init_from_pooler=False)
    try:
        state = {k[len("ramps."):]: v for k, v in load_file(str(ramps_path)).items()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read '{ramps_path}': {e}; copy the whole checkpoint folder again") from None
    missing, unexpected = model.ramps.load_state_dict(state, strict=False, assign=True)
    for ramp in model.ramps:  # older files: uncalibrated
        if ramp.temperature.is_meta:
            ramp.temperature = torch.ones(())
    missing = [k for k in missing if not k.endswith("temperature")]
    if missing or unexpected:
        raise UserError(f"'{ramps_path}' does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
