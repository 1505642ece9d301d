"""``deebert export``: the highway model as ONNX graphs that the early-exit engine drives layer by layer
on ONNX Runtime (see :mod:`.onnx_runtime` for the layout and the loader).

Each layer is exported together with its exit (off-ramp, or the family's own head after the last layer,
plus the learned exit head where trained), taking the 2-D attention mask and building the family's mask
inside (the adapter's ``prepare_mask``), so one session call per layer returns the new hidden states and
the exit's logits, and any family whose adapter traces exports. Batch and sequence axes are dynamic.
ONNX Runtime's own transformer fusions (``onnxruntime.transformers.optimizer``: Attention,
SkipLayerNormalization, BiasGelu, ...) are applied to the layer graphs, and ``--quantize int8`` adds the
graphs after ``onnxruntime.quantization.quantize_dynamic``. The folder is written atomically."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint import META_FILE, RAMPS_FILE, atomic_dir, load_checkpoint
from .config import ExportConfig
from .errors import UserError
from .onnx_runtime import EXPORT_DIR, EXPORT_FORMAT, INSTALL_HINT, MANIFEST, source_fingerprint

COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", META_FILE)
SAMPLE_TEXTS = ("a short one", "a somewhat longer example text, so that the batch has padding in it")


class _Embed(nn.Module):
    def __init__(self, model, token_type_ids: bool):
        super().__init__()
        self.m, self.tt = model, token_type_ids

    def forward(self, input_ids, token_type_ids=None):
        return self.m.embed(input_ids, token_type_ids if self.tt else None)


class _LayerExit(nn.Module):
    """Layer i and its exit: (hidden, 2-D attention mask) -> (hidden, logits[, score]); the last layer
    -> logits of the family's own head."""

    def __init__(self, model, i: int, score: bool):
        super().__init__()
        self.m, self.i, self.score = model, i, score

    def forward(self, hidden, attention_mask):
        m = self.m
        hidden = m.run_layer(self.i, hidden, m.prepare_mask(attention_mask, hidden))
        if self.i == m.num_layers - 1:
            return m.exit_logits(self.i, hidden, attention_mask)
        if self.score:
            logits, s = m.exit_logits_and_score(self.i, hidden, attention_mask)
            return hidden, logits, s
        return hidden, m.exit_logits(self.i, hidden, attention_mask)


def _require_onnx():
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError(f"deebert export needs ONNX and ONNX Runtime: {INSTALL_HINT}") from None


def _torch_export(module: nn.Module, args: tuple, path: Path, inputs: list, outputs: list, opset: int) -> None:
    axes = {n: {0: "batch", 1: "sequence"} for n in inputs + outputs if n not in ("logits", "score")}
    axes.update({n: {0: "batch"} for n in outputs if n in ("logits", "score")})
    import warnings

    module.eval()  # a wrapper starts in training mode, and export restores the mode it found (dropout!)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def _optimize(path: Path, num_heads: int, hidden_size: int) -> dict:
    """onnxruntime.transformers fusions, in place -> the fused operator counts (or the error that stopped
    them: the unfused graph is kept, and is still correct)."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
        opt.save_model_to_file(str(path))
        return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    except Exception as e:  # an unfamiliar graph pattern: fusions are an optimisation, not a must
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def _quantize(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization (int8 weights, activations quantized at run time)."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process, printed once per graph
    try:
        # fused (com.microsoft) operators defeat ONNX shape inference: their outputs are float
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)


def _heads_and_width(cfg) -> tuple:
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_heads", None) or 0
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None) or 0
    return heads, width


def export_checkpoint(cfg: ExportConfig, log=None) -> dict:
    """Write the export of ``cfg.checkpoint`` (to ``cfg.output``, default ``<checkpoint>/onnx``) -> the
    manifest written."""
    _require_onnx()
    log = log or (lambda msg: None)
    ckdir = Path(cfg.checkpoint)
    ckpt = load_checkpoint(ckdir)
    if ckpt.tokenizer is None:
        raise UserError(f"'{ckdir}' has no tokenizer files: the onnx runtime tokenizes with its tokenizer.json")
    if not (ckdir / "tokenizer.json").is_file():
        raise UserError(f"'{ckdir}' has no tokenizer.json (a fast tokenizer): the onnx runtime needs one")
    out = Path(cfg.output) if cfg.output else ckdir / EXPORT_DIR
    model = ckpt.model.cpu().eval()
    try:  # eager attention exports as the pattern ONNX Runtime fuses into its Attention operator
        model.model.set_attn_implementation("eager")
    except Exception:
        pass
    L, learned = model.num_layers, bool(model.ramp_cfg.learned_exit and ckpt.exits_trained)
    with_tt = "token_type_ids" in getattr(ckpt.tokenizer, "model_input_names", [])
    enc = ckpt.tokenizer(list(SAMPLE_TEXTS), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    tt = enc.get("token_type_ids") if with_tt else None
    heads, width = _heads_and_width(model.config)
    t0 = time.perf_counter()
    names = {"embed": "embed.onnx", "layers": [f"layer_{i + 1:02d}.onnx" for i in range(L)]}
    fused = {}
    with atomic_dir(out) as tmp:
        fp32 = tmp / "fp32"
        fp32.mkdir()
        log(f"exporting embeddings and {L} layers with their exits (opset {cfg.opset})")
        _torch_export(_Embed(model, with_tt), (ids, tt) if with_tt else (ids,), fp32 / names["embed"],
                      ["input_ids", "token_type_ids"] if with_tt else ["input_ids"], ["hidden"], cfg.opset)
        with torch.no_grad():
            hidden = model.embed(ids, tt)
        for i in range(L):
            last = i == L - 1
            outs = ["logits"] if last else ["hidden_out", "logits"] + (["score"] if learned else [])
            _torch_export(_LayerExit(model, i, learned), (hidden, mask), fp32 / names["layers"][i],
                          ["hidden", "attention_mask"], outs, cfg.opset)
            if cfg.optimize and heads and width:
                fused[names["layers"][i]] = _optimize(fp32 / names["layers"][i], heads, width)
            with torch.no_grad():
                hidden = model.run_layer(i, hidden, model.prepare_mask(mask, hidden))
        precisions = ["fp32"]
        if cfg.quantize == "int8":
            log("quantizing (dynamic int8)")
            (tmp / "int8").mkdir()
            for g in [names["embed"], *names["layers"]]:
                _quantize(fp32 / g, tmp / "int8" / g)
            precisions.append("int8")
        for f in COPIED:
            if (ckdir / f).is_file():
                shutil.copy2(ckdir / f, tmp / f)
        manifest = {
            "format": EXPORT_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checkpoint": str(ckdir.resolve()),
            "source": source_fingerprint(ckdir, ckpt.meta),
            "opset": cfg.opset,
            "precisions": precisions,
            "family": model.family,
            "num_layers": L,
            "num_labels": model.num_labels,
            "hidden_size": width,
            "learned_exit": learned,
            "pad_token_id": ckpt.tokenizer.pad_token_id if ckpt.tokenizer.pad_token_id is not None else 0,
            "inputs": {"token_type_ids": with_tt},
            "graphs": names,
            "fusions": fused if cfg.optimize else None,
            "versions": _versions(),
            "seconds": None,
        }
        manifest["check"] = check_export(model, tmp, manifest, ids, mask, tt)
        manifest["seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def check_export(model, odir: Path, manifest: dict, ids, mask, tt) -> dict:
    """Max |ONNX - torch| of every exit's logits on the sample batch, per precision."""
    from .onnx_runtime import OnnxModel, require_onnxruntime

    ort = require_onnxruntime()
    meta = json.loads((odir / META_FILE).read_text()) if (odir / META_FILE).is_file() else {}
    config = json.loads((odir / "config.json").read_text())
    with torch.no_grad():
        want = model(ids, mask, tt).numpy()  # [L, b, C]
    out = {}
    for p in manifest["precisions"]:
        om = OnnxModel(ort, odir, manifest, p, config, meta, threads=1)
        h = om.embed(ids.numpy(), None if tt is None else tt.numpy())
        worst = 0.0
        for i in range(manifest["num_layers"]):
            h, logits, _ = om.layer(i, h, mask.numpy())
            worst = max(worst, float(abs(logits - want[i]).max()))
        out[f"{p}_max_abs_logit_diff"] = worst
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    got = {}
    for pkg in ("deebert-cli", "torch", "transformers", "onnx", "onnxruntime", "tokenizers"):
        try:
            got[pkg] = version(pkg)
        except PackageNotFoundError:
            got[pkg] = None
    return got
