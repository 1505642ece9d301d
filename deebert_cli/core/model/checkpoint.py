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
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

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


def atomic_dir(target: str | Path):
    """Context manager yielding a temporary sibling directory; on success it replaces ``target``.

    The previous ``target`` stays intact until the very end, so an interrupted write (Ctrl-C, kill)
    never leaves a half-written checkpoint where a good one was."""
    return _AtomicDir(Path(target))


class _AtomicDir:
    def __init__(self, target: Path):
        self.target = target
        self.tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def save_checkpoint(ckpt: Checkpoint, path: str | Path, extra_files: dict[str, str] | None = None,
                    keep_files_from: str | Path | None = None) -> Path:
    """Write ``ckpt`` to ``path`` atomically. ``extra_files`` maps file name -> text (e.g. configs);
    ``keep_files_from`` names a checkpoint whose run configs (*.yaml) are carried over."""
    from safetensors.torch import save_file

    path = Path(path)
    model = ckpt.model
    with atomic_dir(path) as tmp:
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
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    ckpt.path = path
    ckpt.meta = meta
    return path


def load_checkpoint(path: str | Path, device=None) -> Checkpoint:
    """Load a checkpoint directory written by :func:`save_checkpoint` (safetensors only, no pickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .highway import HighwayModel, load_hf
    from .policies import RampConfig

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"no checkpoint at '{path}' (run `deebert finetune` first, or pass --checkpoint DIR)")
    meta_path = path / META_FILE
    if not meta_path.is_file() or not (path / "config.json").is_file():
        raise UserError(f"'{path}' is not a deebert checkpoint (no {META_FILE}/config.json); run `deebert finetune` to make one")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"'{meta_path}' is not valid JSON: {e}") from None
    import torch

    model_hf = load_hf(AutoModelForSequenceClassification, str(path))
    ramp_cfg = RampConfig(**meta.get("ramp", {}))
    ramps_path = path / RAMPS_FILE
    if not ramps_path.is_file():
        model = HighwayModel(model_hf, ramp_cfg, init_from_pooler=False)
    else:
        # the off-ramps are built without memory or random init (meta device) and take the loaded tensors
        # as they are (assign): no initialisation that the file then overwrites, no copies
        with torch.device("meta"):
            model = HighwayModel(model_hf, ramp_cfg, init_from_pooler=False)
        try:
            state = {k[len("ramps."):]: v for k, v in load_file(str(ramps_path)).items()}
        except SafetensorError as e:
            raise UserError(f"cannot read '{ramps_path}': {e}") from None
        missing, unexpected = model.ramps.load_state_dict(state, strict=False, assign=True)
        for ramp in model.ramps:  # older files: uncalibrated
            if ramp.temperature.is_meta:
                ramp.temperature = torch.ones(())
        missing = [k for k in missing if not k.endswith("temperature")]
        if missing or unexpected:
            raise UserError(f"'{ramps_path}' does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if _has_tokenizer(path) else None
    model.eval()
    if device is not None:
        model.to(device)
    return Checkpoint(model=model, tokenizer=tokenizer, meta=meta, path=path)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
