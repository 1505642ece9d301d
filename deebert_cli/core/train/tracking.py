"""Experiment logging for stage 1 (``--report-to tensorboard|wandb|none``).

A thin adapter over the libraries' own writers (``torch.utils.tensorboard.SummaryWriter``, ``wandb``).
Accelerate's trackers wrap the same writers but need an ``Accelerator``, which a plain run never creates
(nor imports); these few lines keep that true. Only the main process logs."""
from __future__ import annotations

from ..errors import UserError

REPORT_TO = ("none", "tensorboard", "wandb")
_HINT = {"tensorboard": "pip install 'deebert-cli[tensorboard]'", "wandb": "pip install 'deebert-cli[wandb]'"}


class Tracker:
    """Logs nothing (``--report-to none``, and every process but the main one)."""

    def log(self, values: dict, step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    def __init__(self, logdir: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=logdir)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, logdir: str, config: dict):
        import wandb

        self.run = wandb.init(project="deebert", config=config, dir=logdir)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def check_available(kind: str) -> None:
    """One-line error naming the pip command when ``--report-to`` asks for a library that is missing."""
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
    if module and importlib.util.find_spec(module) is None:
        raise UserError(f"--report-to {kind} needs the {module} package: {_HINT[kind]}")


def make_tracker(kind: str, logdir: str, config: dict, is_main: bool = True) -> Tracker:
    check_available(kind)
    if kind == "none" or not is_main:
        return Tracker()
    from pathlib import Path

    Path(logdir).mkdir(parents=True, exist_ok=True)
    return TensorBoardTracker(logdir, config) if kind == "tensorboard" else WandbTracker(logdir, config)
