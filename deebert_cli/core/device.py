"""Device selection shared by every command: ``auto|cpu|cuda|cuda:N|mps``."""
from __future__ import annotations

import re

from .errors import UserError

DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"


def resolve_device(spec: str = "auto"):
    """Return a ``torch.device`` for ``spec``; raise UserError if it is unknown or not present."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m:
        if not torch.cuda.is_available():
            raise UserError(f"device '{spec}' requested but CUDA is not available on this machine (try --device cpu)")
        if m.group(1) is not None:
            idx, n = int(m.group(1)), torch.cuda.device_count()
            if idx >= n:
                raise UserError(f"device '{spec}' requested but only {n} CUDA device(s) exist (cuda:0..cuda:{n - 1})")
        return torch.device(spec)
    if spec == "mps":
        if not _mps_available():
            raise UserError("device 'mps' requested but Apple MPS is not available on this machine (try --device cpu)")
        return torch.device("mps")
    raise UserError(f"unknown device '{spec}': use {DEVICE_HELP}")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
