"""`deebert export`: write the highway model as ONNX graphs for `--runtime onnx`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import CONFIG_OPT, err, make_config, out, quiet_libraries, user_errors


def export(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(Path("deebert-checkpoint"), help="Checkpoint to export (from `deebert train-exits`)."),
    output: Optional[Path] = typer.Option(None, help="Folder to write (default: CHECKPOINT/onnx, where `--runtime onnx` finds it and checks it is not stale)."),
    quantize: Optional[str] = typer.Option(None, help="int8: also write dynamically quantized graphs (`--onnx-precision int8`)."),
    opset: int = typer.Option(17, help="ONNX opset."),
    optimize: bool = typer.Option(True, help="Apply ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, BiasGelu) to the layer graphs."),
    config: Optional[Path] = CONFIG_OPT,
):
    """Export the embeddings, each layer with its exit (off-ramp, learned exit where trained, the family's
    own head after the last layer) as ONNX graphs with dynamic batch and sequence axes, plus a manifest of
    what produced them. `deebert predict --runtime onnx` then runs the same early exit on ONNX Runtime
    (needs pip install 'deebert-cli[onnx]')."""
    values = dict(locals())
    for k in ("ctx", "config"):
        values.pop(k)
    values["checkpoint"] = str(checkpoint)
    values["output"] = str(output) if output else None
    quiet_libraries()
    with user_errors("nothing was written"):
        from ..core.config import ExportConfig
        from ..core.runtime.export import export_checkpoint

        cfg = make_config(ctx, ExportConfig, config, values)
        m = export_checkpoint(cfg, log=lambda msg: err.print(f"[dim]{msg}[/]"))
    render(cfg, m)


def render(cfg, m: dict) -> None:
    where = cfg.output or str(Path(cfg.checkpoint) / "onnx")
    out.print(f"[bold]exported[/] {m['family']}, {m['num_layers']} layers with their exits"
              f"{' and learned exits' if m['learned_exit'] else ''} -> {where} "
              f"({', '.join(m['precisions'])}; opset {m['opset']}; {m['seconds']:.0f} s)")
    fused = {}
    for stats in (m.get("fusions") or {}).values():
        for k, v in stats.items():
            if k != "error":
                fused[k] = fused.get(k, 0) + v
    if fused:
        out.print("fused: " + ", ".join(f"{k} x{v}" for k, v in sorted(fused.items())), soft_wrap=True)
    errors = sorted({s["error"] for s in (m.get("fusions") or {}).values() if "error" in s})
    for e in errors:
        err.print(f"[yellow]warning:[/] ONNX Runtime's fusions did not apply ({e}); the unfused graphs are kept")
    checks = ", ".join(f"{k.split('_')[0]} {v:.2g}" for k, v in sorted(m["check"].items()))
    out.print(f"max |ONNX - torch| of the exit logits on a sample batch: {checks}", soft_wrap=True)
    out.print(f"use it: deebert predict --checkpoint {cfg.checkpoint if not cfg.output else where} --runtime onnx"
              + (" --onnx-precision int8" if "int8" in m["precisions"] else ""))
