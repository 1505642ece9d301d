"""Resumable stage-1 training state, without pickles: safetensors for tensors, JSON for the rest.

``transformers.Trainer`` and ``Accelerator.save_state`` write optimizer, scheduler and RNG state with
``torch.save`` (pickles); this module writes the same information as

- ``model.safetensors``: the classifier's weights now; ``best.safetensors``: those of the best epoch so far;
- ``optimizer.safetensors``: every tensor of the optimizer's state, flattened to ``"{param}.{key}"``;
- ``rng-{rank}.safetensors``: each process's torch RNG states (CPU, and CUDA/MPS when used) and the
  sampler generator's state at the start of the current epoch (every process writes its own);
- ``state.json``: position (optimizer step, epoch, batches done in that epoch), the optimizer's
  param groups and non-tensor state, the scheduler and gradient-scaler state, Python's RNG state, the
  per-epoch history, the best epoch, the resolved config and the number of processes.

A state lives in ``DIR/step-<N>/``; it is written to ``DIR/.tmp-step-<N>/`` and renamed when complete
(a rename is atomic), then older states are removed. A kill at any moment therefore leaves the previous
complete state (or none) and never a half-written one that would be loaded. Under a launcher every
process must see the same directory (one machine, or a shared filesystem).
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..files import read_json

STATE_PREFIX = "step-"


def state_dir_for(output: str) -> Path:
    """Where stage 1 keeps resumable state for checkpoint directory ``output``: a sibling directory."""
    p = Path(output)
    return p.parent / f"{p.name}.train-state"


@dataclass
class Position:
    """Where a run stands: optimizer steps done, the epoch being trained, batches of it already done."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class TrainState:
    """Everything beyond model and optimizer that a resumed run needs."""

    position: Position = field(default_factory=Position)
    history: list = field(default_factory=list)  # per-epoch figures
    best: dict | None = None  # the best history row so far
    bad_epochs: int = 0  # evaluations since the last improvement (early stopping)
    epoch_loss: list = field(default_factory=lambda: [0.0, 0])  # running (sum, count) of this epoch's train loss
    seen: int = 0  # training examples consumed
    seconds: float = 0.0  # training time so far
    eval_seconds: float = 0.0


def latest_state(root: Path) -> Path | None:
    """The newest complete state under ``root`` (None when there is none)."""
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STATE_PREFIX) and p.name[len(STATE_PREFIX):].isdigit()]
    return max(done, key=lambda p: int(p.name[len(STATE_PREFIX):]), default=None)


def resume_hint(output: str) -> str:
    """What rerunning an interrupted stage 1 writing ``output`` does, in words: resume from the newest
    saved state (the one it was resumed from or wrote), or start over when there is none."""
    path = latest_state(state_dir_for(output))
    if path is None:
        return ("no training state was saved, so rerunning starts over; --save-every N (optimizer steps, or "
                "'1 epoch') makes a run resumable")
    return f"rerun the same command to resume from step {int(path.name[len(STATE_PREFIX):])} (state in '{path.parent}')"


# -- optimizer <-> safetensors + JSON -------------------------------------------------------------
def flatten_optimizer(sd: dict) -> tuple:
    """``optimizer.state_dict()`` -> (tensors {"{param}.{key}": tensor}, JSON-able rest)."""
    tensors, plain = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                plain.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def unflatten_optimizer(tensors: dict, rest: dict) -> dict:
    state: dict = {}
    for name, v in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    for pid, st in rest["state"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- RNG ------------------------------------------------------------------------------------------
def rng_tensors(device: torch.device, epoch_gen_state: torch.Tensor) -> dict:
    out = {"torch": torch.get_rng_state(), "epoch_generator": epoch_gen_state}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        out["mps"] = torch.mps.get_rng_state()
    return out


def restore_rng(t: dict, device: torch.device) -> torch.Tensor:
    """Restore this process's RNG states; returns the sampler generator's epoch-start state."""
    torch.set_rng_state(t["torch"])
    if device.type == "cuda" and "cuda" in t:
        torch.cuda.set_rng_state(t["cuda"], device)
    elif device.type == "mps" and "mps" in t:
        torch.mps.set_rng_state(t["mps"])
    return t["epoch_generator"]


def _python_rng_json():
    v, state, gauss = random.getstate()
    return [v, list(state), gauss]


def _restore_python_rng(x) -> None:
    random.setstate((x[0], tuple(x[1]), x[2]))


# -- save / load ----------------------------------------------------------------------------------
def save_state(root: Path, rt, module, optimizer, scheduler, state: TrainState, best_weights: dict | None,
               epoch_gen_state: torch.Tensor, config: dict, data_fingerprint: str | None = None) -> Path:
    """Write the state of every process to ``root/step-<N>`` atomically (collective under a launcher).
    ``data_fingerprint`` (of the examples trained on) lets a resumed run notice changed data."""
    name = f"{STATE_PREFIX}{state.position.step:09d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    rt.wait_for_everyone()
    save_file(rng_tensors(rt.device, epoch_gen_state), str(tmp / f"rng-{rt.rank}.safetensors"))
    if rt.is_main:
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp / "model.safetensors"))
        if best_weights is not None:
            save_file(best_weights, str(tmp / "best.safetensors"))
        tensors, opt_rest = flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = {
            "position": vars(state.position), "history": state.history, "best": state.best,
            "bad_epochs": state.bad_epochs, "epoch_loss": state.epoch_loss, "seen": state.seen,
            "seconds": state.seconds, "eval_seconds": state.eval_seconds,
            "optimizer": opt_rest, "scheduler": scheduler.state_dict(), "scaler": rt.scaler_state(),
            "python_rng": _python_rng_json(), "processes": rt.world, "config": config,
            "data_fingerprint": data_fingerprint,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    rt.wait_for_everyone()
    if rt.is_main:
        tmp.rename(final)
        for old in root.iterdir():
            if old != final and old.name.startswith(STATE_PREFIX):
                shutil.rmtree(old, ignore_errors=True)
    rt.wait_for_everyone()
    return final


STATE_TODO = "remove it to start afresh"
STATE_SHAPE = {"position": dict, "history": list, "optimizer": dict, "scheduler": dict, "python_rng": list,
               "processes": int, "config": dict, "data_fingerprint": str}


def read_state_meta(path: Path) -> dict:
    return read_json(path / "state.json", "training state", f"{STATE_TODO} (the folder '{path.parent}')", STATE_SHAPE)


def load_state(path: Path, rt, module, optimizer, scheduler) -> tuple:
    """Load a state written by :func:`save_state` into ``module``, ``optimizer``, ``scheduler`` and the RNGs.
    Returns (TrainState, best weights or None, the sampler generator's epoch-start state); a state that
    cannot be read or does not fit is one UserError line."""
    try:
        return _load_state(path, rt, module, optimizer, scheduler)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        # a damaged or hand-edited state: an unreadable file, a missing field, tensors that do not fit
        raise UserError(f"training state '{path}' cannot be loaded ({type(e).__name__}: {str(e)[:200]}); "
                        f"{STATE_TODO} (the folder '{path.parent}')") from None


def _load_state(path: Path, rt, module, optimizer, scheduler) -> tuple:
    meta = read_state_meta(path)
    if meta["processes"] != rt.world:
        raise UserError(f"training state '{path}' was written by {meta['processes']} process(es); "
                        f"resume it with the same number (this run has {rt.world})")
    rng = path / f"rng-{rt.rank}.safetensors"
    if not rng.is_file():
        raise UserError(f"training state '{path}' has no RNG state for process {rt.rank}")
    module.load_state_dict(load_file(str(path / "model.safetensors")))
    optimizer.load_state_dict(unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    rt.load_scaler_state(meta.get("scaler"))
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None
    gen_state = restore_rng(load_file(str(rng)), rt.device)
    _restore_python_rng(meta["python_rng"])
    st = TrainState(Position(**meta["position"]), meta["history"], meta["best"], meta["bad_epochs"],
                    meta["epoch_loss"], meta["seen"], meta["seconds"], meta["eval_seconds"])
    return st, best, gen_state


def config_mismatch(saved: dict, current: dict, ignore: tuple) -> list:
    """Names of options whose values differ between a saved state's config and this run's."""
    keys = (set(saved) | set(current)) - set(ignore)
    return sorted(k for k in keys if saved.get(k) != current.get(k))
