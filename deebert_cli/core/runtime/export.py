"""``deebert export``: the highway model as ONNX graphs that the early-exit engine drives layer by layer
on ONNX Runtime (see :mod:`.onnx_backend` for the layout and the loader).

Each layer is exported together with its exit (off-ramp, or the family's own head after the last layer,
plus the learned exit head where trained), taking the 2-D attention mask and building the family's mask
inside (the adapter's ``prepare_mask``), so one session call per layer returns the new hidden states and
the exit's logits, and any family whose adapter traces exports. Batch and sequence axes are dynamic.
ONNX Runtime's own transformer fusions (``onnxruntime.transformers.optimizer``: Attention,
SkipLayerNormalization, BiasGelu, ...) are applied to the layer graphs, and ``--quantize int8`` quantizes
them with ``onnxruntime.quantization.quantize_dynamic``.

The per-step graphs (embeddings, layer 1, ..., layer L) are then composed into one model whose ``step``
input picks the step through a tree of ONNX ``If`` nodes (:func:`compose_steps`), so that every layer runs
in one ONNX Runtime session with one thread pool. One session per step was measured slower
(benchmarks/bench_onnx_sessions.py, MiniLM, 2 threads, batch 1, against the plain classifier: 0.13x with
thread spinning on, where the pools of the sessions that just ran spin on the cores the next step needs;
0.71x with spinning off, where every call wakes its pool; the composed model 0.92x). The weights are
stored beside the graph (``model.onnx.data``): held inside it, the model took 0.20 s to load instead of
0.05 s (the same benchmark). The folder is written atomically."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ..config import ExportConfig
from ..errors import UserError
from ..files import atomic_dir, check_output_folder, usual_mode
from ..model.checkpoint import META_FILE, load_checkpoint
from .onnx_backend import EXPORT_DIR, EXPORT_FORMAT, INSTALL_HINT, MANIFEST, MODEL_GRAPH, STEP_OUTPUTS, source_fingerprint

COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", META_FILE)
# what an export owns and replaces; anything else in the folder it writes over is carried over
EXPORT_OWNED = frozenset((MANIFEST, "fp32", "int8", "parts", *COPIED))
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
    """Write the export of ``cfg.checkpoint`` (to ``cfg.output``, default ``<checkpoint>/onnx``) atomically
    -> the manifest written."""
    _require_onnx()
    log = log or (lambda msg: None)
    ckdir = Path(cfg.checkpoint)
    target = Path(cfg.output) if cfg.output else ckdir / EXPORT_DIR
    check_export_folder(target, ckdir)
    ckpt = load_checkpoint(ckdir)
    if ckpt.tokenizer is None or not (ckdir / "tokenizer.json").is_file():
        raise UserError(f"'{ckdir}' has no tokenizer.json (a fast tokenizer): the onnx runtime tokenizes with it")
    model = ckpt.model.cpu().eval()
    learned = bool(model.ramp_cfg.learned_exit and ckpt.exits_trained)
    enc = ckpt.tokenizer(list(SAMPLE_TEXTS), padding=True, return_tensors="pt")
    sample = (enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))  # what the tokenizer emits
    t0 = time.perf_counter()
    with atomic_dir(target, owned=EXPORT_OWNED.__contains__) as tmp:
        log(f"exporting embeddings and {model.num_layers} layers with their exits (opset {cfg.opset})")
        parts = tmp / "parts"  # the per-step graphs, composed below, then removed
        names, fused = write_graphs(model, parts / "fp32", sample, learned, cfg.opset, cfg.optimize)
        with_tt = "token_type_ids" in graph_inputs(parts / "fp32" / names["embed"])
        steps = [names["embed"], *names["layers"]]
        precisions = ["fp32"]
        if cfg.quantize == "int8":
            log("quantizing (dynamic int8)")
            (parts / "int8").mkdir()
            for g in steps:
                _quantize(parts / "fp32" / g, parts / "int8" / g)
            precisions.append("int8")
        log("composing the steps into one model per precision")
        for p in precisions:
            compose_steps([parts / p / g for g in steps], tmp / p / MODEL_GRAPH)
        shutil.rmtree(parts)
        steps = [g.removesuffix(".onnx") for g in steps]
        for f in COPIED:
            if (ckdir / f).is_file():
                shutil.copy2(ckdir / f, tmp / f)
        manifest = {
            "format": EXPORT_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checkpoint": str(ckdir.resolve()),
            "config": dataclasses.asdict(cfg),
            "source": source_fingerprint(ckdir, ckpt.meta),
            "opset": cfg.opset,
            "precisions": precisions,
            "family": model.family,
            "num_layers": model.num_layers,
            "max_tokens": model.max_tokens,
            "num_labels": model.num_labels,
            "hidden_size": _heads_and_width(model.config)[1],
            "learned_exit": learned,
            "pad_token_id": ckpt.tokenizer.pad_token_id if ckpt.tokenizer.pad_token_id is not None else 0,
            "inputs": {"token_type_ids": with_tt},
            "graphs": {"model": MODEL_GRAPH, "data": MODEL_GRAPH + ".data", "steps": steps},
            "fusions": fused if cfg.optimize else None,
            "versions": _versions(),
        }
        manifest["check"] = check_export(model, tmp, manifest, *sample)
        manifest["seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def check_export_folder(target: Path, ckdir: Path) -> None:
    """The export replaces ``target`` as a whole: only an earlier export may stand there, and never the
    checkpoint itself or a folder holding it; and the place must be writable."""
    t, ck = target.resolve(), ckdir.resolve()
    if t == ck or t in ck.parents:
        raise UserError(f"export folder '{target}' (--output) is the checkpoint or holds it: pick a folder of its own")
    check_output_folder(target, "--output", owned=lambda p: (p / MANIFEST).is_file(), kind="an earlier deebert export")


def write_graphs(model, out: Path, sample: tuple, learned: bool, opset: int = 17, optimize: bool = True) -> tuple:
    """The embeddings graph and one graph per layer with its exit, traced on ``sample`` (input_ids,
    attention_mask with padding, token_type_ids or None, as the tokenizer emits them) into folder ``out``
    -> (file names, fused operator counts per layer graph). The embeddings graph takes token_type_ids
    only where the model reads them (``takes_token_type_ids``): DeBERTa-v3 and DistilBERT, whose
    tokenizers may emit them, get a graph of input_ids alone."""
    out.mkdir(parents=True, exist_ok=True)
    try:  # eager attention exports as the pattern ONNX Runtime fuses into its Attention operator
        model.model.set_attn_implementation("eager")
    except Exception:  # a family without the choice keeps its own
        pass
    ids, mask, tt = sample
    tt = tt if model.takes_token_type_ids else None
    L = model.num_layers
    heads, width = _heads_and_width(model.config)
    names = {"embed": "embed.onnx", "layers": [f"layer_{i + 1:02d}.onnx" for i in range(L)]}
    _torch_export(_Embed(model, tt is not None), (ids, tt) if tt is not None else (ids,), out / names["embed"],
                  ["input_ids", "token_type_ids"] if tt is not None else ["input_ids"], ["hidden"], opset)
    fused = {}
    with torch.no_grad():
        hidden = model.embed(ids, tt)
    for i in range(L):
        outs = ["logits"] if i == L - 1 else ["hidden_out", "logits"] + (["score"] if learned else [])
        _torch_export(_LayerExit(model, i, learned), (hidden, mask), out / names["layers"][i],
                      ["hidden", "attention_mask"], outs, opset)
        if optimize and heads and width:
            fused[names["layers"][i]] = _optimize(out / names["layers"][i], heads, width)
        with torch.no_grad():
            hidden = model.run_layer(i, hidden, model.prepare_mask(mask, hidden))
    return names, fused


def graph_inputs(path: Path) -> set:
    """The names of the inputs of the ONNX graph at ``path`` (its weights are not read)."""
    import onnx

    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}


# ------------------------------------------------------------------------------------------------
# one model from the per-step graphs
# ------------------------------------------------------------------------------------------------
def compose_steps(files: list, out: Path) -> None:
    """Compose the step graphs ``files`` (embeddings, layer 1, ..., layer L) into one model at ``out``:
    inputs ``step`` (int64 scalar: 0 embeds, k runs layer k) and the union of the steps' inputs; outputs
    ``hidden_out, logits, score`` (an empty tensor where a step has no such output). Weights go to
    ``out.data``."""
    import onnx
    from onnx import TensorProto, helper

    graphs = [onnx.load(str(f)) for f in files]
    bodies = [_step_body(m.graph, k, last=k == len(files) - 1) for k, m in enumerate(graphs)]
    top = _if_tree(bodies, 0, len(bodies))
    top.node[-1].output[:] = STEP_OUTPUTS  # the root If's outputs are the model's
    seen, inputs = set(), [helper.make_tensor_value_info("step", TensorProto.INT64, [])]
    for m in graphs:
        for i in m.graph.input:
            if i.name not in seen:
                seen.add(i.name)
                inputs.append(_free_dims(i))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in STEP_OUTPUTS]
    opsets = {}
    for m in graphs:
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(helper.make_graph(list(top.node), "deebert_steps", inputs, outputs),
                              opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              ir_version=max(m.ir_version for m in graphs))
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data", size_threshold=1024)
    usual_mode(out.parent / (out.name + ".data"))  # onnx writes it 0600


def _free_dims(value_info):
    """The input with every dimension symbolic and named for that input alone (the dummy fed to the
    inputs a step does not read has its own shape)."""
    from onnx import helper

    t = value_info.type.tensor_type
    dims = [f"{value_info.name}_{j}" for j in range(len(t.shape.dim))]
    return helper.make_tensor_value_info(value_info.name, t.elem_type, dims)


def _step_body(graph, k: int, last: bool):
    """Step graph ``k`` as an If branch: its own names prefixed (branches share one namespace), its
    inputs read from the outer scope, outputs (hidden_out, logits, score) with empty tensors for those
    it lacks (the embeddings have no logits, the last layer no hidden states)."""
    import onnx
    from onnx import TensorProto, helper

    p = f"step{k}/"
    outer = {i.name for i in graph.input} | {""}  # "" = an optional input left out
    ren = lambda n: n if n in outer else p + n  # noqa: E731
    nodes = []
    for n in graph.node:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.input[:] = [ren(x) for x in n.input]
        c.output[:] = [ren(x) for x in n.output]
        c.name = p + (n.name or "node")
        nodes.append(c)
    inits = []
    for t in graph.initializer:  # kept inside the branch: from the outer scope ORT ran the model slower here
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = p + t.name
        inits.append(c)
    produced = {o.name: ren(o.name) for o in graph.output}
    empty = lambda name: helper.make_node("Constant", [], [p + name], value=helper.make_tensor(p + name, TensorProto.FLOAT, [0], []))  # noqa: E731
    if k == 0:
        outs = [produced["hidden"], p + "no_logits", p + "no_score"]
        nodes += [empty("no_logits"), empty("no_score")]
    elif last:
        outs = [p + "no_hidden", produced["logits"], p + "no_score"]
        nodes += [empty("no_hidden"), empty("no_score")]
    else:
        outs = [produced["hidden_out"], produced["logits"], produced.get("score", p + "no_score")]
        nodes += [] if "score" in produced else [empty("no_score")]
    return helper.make_graph(nodes, f"step{k}", [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                      for o in outs], initializer=inits)


def _if_tree(bodies: list, lo: int, hi: int):
    """A graph that runs ``bodies[step]`` for lo <= step < hi: If(step < mid) halves, depth log2(L + 1)."""
    from onnx import TensorProto, helper

    if hi - lo == 1:
        return bodies[lo]
    mid, tag = (lo + hi) // 2, f"{lo}_{hi}"
    outs = [f"{n}_{tag}" for n in STEP_OUTPUTS]
    nodes = [helper.make_node("Constant", [], [f"mid_{tag}"], value=helper.make_tensor(f"mid_{tag}", TensorProto.INT64, [], [mid])),
             helper.make_node("Less", ["step", f"mid_{tag}"], [f"below_{tag}"]),
             helper.make_node("If", [f"below_{tag}"], outs, then_branch=_if_tree(bodies, lo, mid),
                              else_branch=_if_tree(bodies, mid, hi))]
    return helper.make_graph(nodes, f"steps_{tag}", [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs])


def check_export(model, odir: Path, manifest: dict, ids, mask, tt) -> dict:
    """Max |ONNX - torch| of every exit's logits on the sample batch, per precision."""
    from .onnx_backend import OnnxModel, require_onnxruntime

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
