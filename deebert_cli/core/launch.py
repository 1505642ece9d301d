"""Running under ``accelerate launch`` (Hugging Face Accelerate), or as one plain process.

A plain run (no launcher) never imports accelerate and behaves exactly as before: one device, mixed
precision through ``torch.autocast`` (and a ``GradScaler`` for fp16). Under a launcher that starts several
processes (``accelerate launch``, or ``torchrun``, which sets ``WORLD_SIZE``), :class:`Runtime` creates an
``Accelerator``: it sets up the process group (NCCL on GPUs, gloo on CPU), wraps the trained module in
DDP, handles mixed precision and gathers results. Data is sharded *strided*: process ``r`` of ``W`` takes
rows ``r, r+W, r+2W, ...`` of every global batch or list, and :meth:`Runtime.gather_rows` puts the rows back
in their global order, each exactly once (no padding duplicates reach a metric).

The helpers at module level read only the environment, so the CLI can use them without importing torch.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

from .errors import UserError

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
INSTALL_HINT = "pip install 'deebert-cli[distributed]' (or pip install accelerate)"


def _env_int(names, default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                pass
    return default


def world_size() -> int:
    """Processes in this run, as the launcher announced them (1 without a launcher)."""
    return max(1, _env_int(_WORLD_VARS, 1))


def is_launched() -> bool:
    """True under ``accelerate launch`` / ``torchrun`` with more than one process."""
    return world_size() > 1


def process_index() -> int:
    return _env_int(_RANK_VARS, 0) if is_launched() else 0


def is_main_process() -> bool:
    """The process that writes checkpoints and output and prints progress (rank 0; always true without a launcher)."""
    return process_index() == 0


_ACCELERATOR = None


def get_accelerator(mixed_precision: str = "no", cpu: bool = False):
    """The process's one ``Accelerator`` (Accelerate's state is a per-process singleton), created lazily."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        try:
            from accelerate import Accelerator
        except ImportError:
            raise UserError(f"running under a distributed launcher needs Accelerate: {INSTALL_HINT}") from None
        import atexit

        _ACCELERATOR = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
        # Gloo's worker threads still alive at interpreter exit can abort the process ("terminate called
        # without an active exception"): destroy the process group before that, for API users too (the CLI
        # also ends with cli.common.finish_distributed). No barrier here, so that a process leaving on an
        # error still dies and the launcher stops the others.
        atexit.register(shutdown, sync=False)
    return _ACCELERATOR


def shutdown(sync: bool = True) -> None:
    """End the process group, if this process has one; ``sync`` first waits for every process (call it
    when a command has finished normally, so that no process tears down while another still talks)."""
    if _ACCELERATOR is None:
        return
    import torch

    if not torch.distributed.is_initialized():
        return
    if sync:
        _ACCELERATOR.wait_for_everyone()
    _ACCELERATOR.end_training()


class Runtime:
    """Device, precision and (under a launcher) the Accelerator of one run.

    ``Runtime(device_spec, precision)``: without a launcher, the device is ``resolve_device(device_spec)``;
    with one, every process gets the device Accelerate assigns (``--device cpu`` forces CPU + gloo)."""

    def __init__(self, device_spec: str = "auto", precision: str = "fp32"):
        from .device import check_precision, resolve_device

        self.precision = precision
        self.accelerator = None
        self._scaler = None
        if is_launched():
            spec = (device_spec or "auto").strip().lower()
            if spec not in ("auto", "cpu", "cuda"):
                raise UserError(f"under a distributed launcher each process uses the device the launcher assigns: "
                                f"use --device auto, cuda or cpu (not '{device_spec}')")
            launcher_mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
            if launcher_mp not in ("no", "", {"fp32": "no"}.get(precision, precision)):
                raise UserError(f"accelerate launch --mixed_precision {launcher_mp} conflicts with --precision {precision}: "
                                f"pass --precision {launcher_mp}")
            wanted = resolve_device(spec)
            # Accelerate only sets up a CPU process group (gloo) when asked for the CPU explicitly
            acc = get_accelerator({"fp32": "no"}.get(precision, precision), cpu=wanted.type == "cpu")
            if acc.num_processes != world_size():
                raise UserError(f"the launcher started {world_size()} processes but Accelerate set up "
                                f"{acc.num_processes} on device '{acc.device}' (distributed runs need CUDA or CPU)")
            self.accelerator = acc
            self.device = acc.device
        else:
            self.device = resolve_device(device_spec)
        check_precision(precision, self.device)

    # -- who am I -----------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.accelerator is not None and self.accelerator.num_processes > 1

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- training -----------------------------------------------------------------------------------
    def autocast(self):
        from .device import autocast

        return autocast(self.device, self.precision)

    def prepare(self, module, optimizer):
        """DDP-wrap ``module`` (under a launcher) and let Accelerate drive ``optimizer`` (gradient scaling
        for fp16). Without a launcher both come back as they are."""
        if self.accelerator is None:
            return module, optimizer
        return self.accelerator.prepare(module, optimizer)

    @property
    def _scaling(self):
        """fp16 without a launcher: torch's GradScaler (created on first use); None otherwise."""
        if self._scaler is None and self.precision == "fp16" and self.accelerator is None:
            import torch

            self._scaler = torch.amp.GradScaler(self.device.type)
        return self._scaler

    def backward(self, loss) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        elif self._scaling is not None:
            self._scaling.scale(loss).backward()
        else:
            loss.backward()

    def clip_grad_norm_(self, parameters, max_norm: float, optimizer) -> None:
        import torch

        if self.accelerator is not None:
            self.accelerator.clip_grad_norm_(parameters, max_norm)
            return
        if self._scaling is not None:
            self._scaling.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def step(self, optimizer) -> bool:
        """Optimizer step; False when fp16 gradient scaling skipped it (inf/nan gradients)."""
        if self.accelerator is not None:
            optimizer.step()
            return not self.accelerator.optimizer_step_was_skipped
        if self._scaling is not None:
            before = self._scaling.get_scale()
            self._scaling.step(optimizer)
            self._scaling.update()
            return self._scaling.get_scale() >= before
        optimizer.step()
        return True

    def no_sync(self, module):
        """Context skipping DDP's gradient all-reduce (micro-batches before the last of an accumulated
        update); a no-op without a launcher."""
        import contextlib

        return self.accelerator.no_sync(module) if self.distributed else contextlib.nullcontext()

    def scaler_state(self) -> dict | None:
        """The fp16 gradient scaler's state (JSON-able), None when there is none."""
        scaler = self.accelerator.scaler if self.accelerator is not None else self._scaling
        return None if scaler is None else scaler.state_dict()

    def load_scaler_state(self, state: dict | None) -> None:
        scaler = self.accelerator.scaler if self.accelerator is not None else self._scaling
        if scaler is not None and state:
            scaler.load_state_dict(state)

    # -- sharding and gathering --------------------------------------------------------------------
    def shard(self, seq) -> list:
        """This process's strided share of ``seq``: items ``rank, rank+W, ...`` (everything without a launcher)."""
        seq = list(seq)
        return seq if not self.distributed else seq[self.rank :: self.world]

    def sum(self, value: float) -> float:
        """Sum of a number over processes."""
        if not self.distributed:
            return float(value)
        import torch

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    def gather_rows(self, local, n: int):
        """Rows of a strided shard (``local`` [len(shard(range(n))), ...], on any device) -> all ``n`` rows
        in global order, on the CPU, on every process. Shards are padded to equal length for the
        collective and the padding is dropped, so each row appears exactly once."""
        if not self.distributed:
            return local
        import torch

        W, m = self.world, -(-n // self.world)  # longest shard
        pad = m - local.shape[0]
        x = local.to(self.device)
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        g = self.accelerator.gather(x.contiguous()).cpu()  # [W*m, ...]: rank 0's rows, then rank 1's...
        # row j of rank r is global row r + j*W
        full = g.view(W, m, *g.shape[1:]).transpose(0, 1).reshape(W * m, *g.shape[1:])
        return full[:n]

    def gather_objects(self, obj) -> list:
        """One picklable object per process -> the list of all of them (rank order), on every process."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def wait_for_everyone(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()


def ordered_shards(rt: Runtime, items: Iterable, fn: Callable[[Iterator], Iterator], chunk: int = 1024) -> Iterator:
    """Spread ``items`` over the processes and bring the results back in input order.

    Every process iterates all of ``items`` (e.g. the lines of one input file) and keeps its strided share;
    ``fn`` maps an iterator of those to an iterator with exactly one result per item, in order. Rounds of
    ``chunk`` results per process are gathered; the main process yields ``(global_index, result)`` for every
    item in input order, the others yield nothing. Memory stays bounded by one round."""
    from itertools import islice

    if not rt.distributed:
        yield from enumerate(fn(iter(items)))
        return
    W, r = rt.world, rt.rank
    mine = (x for i, x in enumerate(items) if i % W == r)
    results = fn(mine)
    base = 0
    while True:
        parts = rt.gather_objects(list(islice(results, chunk)))
        total = sum(len(p) for p in parts)
        if rt.is_main:
            for j in range(max(len(p) for p in parts)):
                for k in range(W):
                    if j < len(parts[k]):
                        yield base + j * W + k, parts[k][j]
        base += total
        if total < W * chunk:  # every process is out of items
            return

