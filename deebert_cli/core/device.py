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


# ------------------------------------------------------------------------------------------------
# numeric precision
# ------------------------------------------------------------------------------------------------
PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, device) -> None:
    """Raise UserError unless ``device`` can autocast to ``precision`` (fp32 always works)."""
    import torch

    if precision == "fp32":
        return
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}': use {', '.join(PRECISIONS)}")
    kind = device.type
    if kind == "cpu" and precision == "fp16":
        raise UserError("--precision fp16 needs a GPU (CUDA or MPS); on CPU use --precision bf16 or fp32")
    if kind == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or fp32")
    if kind not in ("cpu", "cuda", "mps") or not torch.amp.is_autocast_available(kind):
        raise UserError(f"--precision {precision}: autocast is not available on device '{device}'; use fp32")


def autocast(device, precision: str = "fp32", cache: bool = True):
    """Context manager: mixed-precision autocast on ``device`` (a no-op for fp32). ``cache=False`` for
    code captured into a CUDA graph (autocast's cache of cast weights must not live in a graph's pool)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, cache_enabled=cache)
