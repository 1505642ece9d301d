"""A profile of one layer step (torch.profiler), for bench_gpu.py: where a step's time goes.

Variants, each at ``rows`` x ``width`` tokens of layer 1, ``reps`` steps after a warm-up:

* ``old engine step``: ``EarlyExitEngine._step`` (layer, off-ramp, entropy, decision, and the blocking
  read of the decision that every layer of the shrink engine does);
* ``static step, lag 0``: the static engine's step (copy into the static buffers, the captured graph on
  CUDA, the decision sent through pinned memory) and its decision read at once;
* ``static step, lag 1``: the same, with each decision read one step later (the engine's default on CUDA).

Per step: wall milliseconds, operator calls on the host, device kernels (and graph launches), device busy
milliseconds, the gap (wall minus busy: launch and host time the device waits for), and synchronising
calls (stream/device/event synchronize, blocking copies).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from deebert_cli.core.runtime.engine import EarlyExitEngine
from deebert_cli.core.runtime.rules import ExitRule
from deebert_cli.core.runtime.static_engine import StaticEngine

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ", "cudaMemcpy")


def _inputs(ckpt, device, precision, rows: int, width: int) -> tuple:
    vocab = ckpt.model.config.vocab_size
    ids = np.random.default_rng(0).integers(min(5, vocab - 1), vocab, size=(rows, width)).tolist()
    eng = EarlyExitEngine(ckpt, ExitRule([1e-9] * ckpt.model.num_layers), device, rows, precision=precision)
    hidden = eng.backend.embed(eng.backend.put(np.asarray(ids, dtype=np.int64)))
    return eng, hidden, eng.backend.put(np.ones((rows, width), dtype=np.int64))


def _variants(ckpt, device, precision, rows, width) -> dict:
    old, hidden, attn = _inputs(ckpt, device, precision, rows, width)
    state = old.policy.init_state(rows, old.device, old.xp)
    new = StaticEngine(ckpt, ExitRule([1e-9] * ckpt.model.num_layers), device, rows, precision=precision,
                       max_length=max(width, 8))
    nstate = new.policy.init_state(rows, new.device, new.xp)
    take = [(j, hidden[j], tuple(x[j] for x in nstate)) for j in range(rows)]
    pending = []

    def old_step():
        old._step(0, hidden, attn, state)

    def static_step(lag):
        def run():
            _, logits, done, _ = new._run_step(0, take, [width] * rows)
            pending.append(new.decisions.send(done, logits))
            while len(pending) > lag:
                new.decisions.read(pending.pop(0))
        return run

    return {"old engine step": old_step, "static step, lag 0": static_step(0), "static step, lag 1": static_step(1)}


def profile_step(ckpt, device, precision: str, rows: int, width: int = 32, reps: int = 20) -> dict:
    """-> {variant: {wall_ms, host_ops, kernels, device_ms, gap_ms, syncs}} per step."""
    out = {}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        for name, fn in _variants(ckpt, device, precision, rows, width).items():
            for _ in range(3):  # the engines enter autocast themselves; the static step captures here
                fn()
            _sync(device)
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                for _ in range(reps):
                    fn()
                _sync(device)
            wall = (time.perf_counter() - t0) / reps * 1e3
            out[name] = _summary(prof.events(), reps, wall)
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(events, reps: int, wall: float) -> dict:
    kernels = [e for e in events if getattr(e, "device_type", None) is not None and e.device_type.name == "CUDA"]
    busy = sum(getattr(e, "device_time", 0.0) or 0.0 for e in kernels) / 1e3 / reps
    host = [e for e in events if e.device_type.name == "CPU"]
    ops = sum(1 for e in host if e.name.startswith("aten::"))
    syncs = sum(1 for e in host if e.name.startswith(SYNCS))
    launches = sum(1 for e in host if e.name in ("cudaLaunchKernel", "cudaGraphLaunch", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return {"wall_ms": round(wall, 4), "host_ops": round(ops / reps, 1), "kernels": round(len(kernels) / reps, 1),
            "launches": round(launches / reps, 1), "device_ms": round(busy, 4),
            "gap_ms": round(max(wall - busy, 0.0), 4) if kernels else None, "syncs": round(syncs / reps, 2)}


def print_profile(title: str, prof: dict) -> None:
    print(f"\n{title}\n  {'variant':<22} {'wall ms':>8} {'host ops':>8} {'kernels':>8} {'launches':>8} "
          f"{'device ms':>9} {'gap ms':>8} {'syncs':>6}")
    for name, r in prof.items():
        gap = "-" if r["gap_ms"] is None else f"{r['gap_ms']:.3f}"
        print(f"  {name:<22} {r['wall_ms']:>8.3f} {r['host_ops']:>8.1f} {r['kernels']:>8.1f} {r['launches']:>8.1f} "
              f"{r['device_ms']:>9.3f} {gap:>8} {r['syncs']:>6.2f}", flush=True)
