"""The onnx runtime: the graphs written by ``deebert export`` run by ONNX Runtime on the CPU, with no
torch, transformers or datasets imported (tokenizers, onnxruntime and numpy only).

An export lives in ``<checkpoint>/onnx/`` (or a folder of its own, ``deebert export --output DIR``)::

    manifest.json          what produced it: hashes of model.safetensors and highway.safetensors, the
                           deebert.json fields that shape the graphs, opset, precisions, versions
    fp32/model.onnx        the steps of the highway model in one graph, chosen by its ``step`` input:
                           step 0: input_ids [+ token_type_ids] -> hidden_out (the embeddings);
                           step k: (hidden, attention_mask) -> (hidden_out, exit logits [, learned exit
                           score]) of layer k; the last layer ends in the family's own head -> logits
    fp32/model.onnx.data   its weights
    int8/...               the same after onnxruntime.quantization.quantize_dynamic (--quantize int8)
    config.json, tokenizer.json, tokenizer_config.json, deebert.json   copies, so the folder stands alone

:class:`OnnxModel` is itself the engine's backend (:class:`~.engine.Backend`): one session call per
layer returns the new hidden states and that layer's exit, all in one session (one thread pool).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import UserError
from ..files import check_readable, read_json
from ..model.checkpoint import META_FILE, META_TODO, RAMPS_FILE, Checkpoint, ramp_config, read_checked

EXPORT_DIR = "onnx"
MANIFEST = "manifest.json"
EXPORT_FORMAT = 2  # 1: one graph per step (slower: a thread pool per layer); 2: the steps composed
MODEL_GRAPH = "model.onnx"
STEP_OUTPUTS = ("hidden_out", "logits", "score")
MODEL_FILE = "model.safetensors"
# the deebert.json fields that change the graphs (thresholds and metrics do not)
META_KEYS = ("family", "num_layers", "ramp", "stage", "task")
PRECISIONS = ("fp32", "int8")
INSTALL_HINT = "pip install 'deebert-cli[onnx]'"
# the manifest's fields the loader reads, and their JSON types
MANIFEST_SHAPE = {"format": int, "precisions": list, "num_layers": int, "num_labels": int, "family": str,
                  "inputs": dict, "graphs": dict, "pad_token_id": int, "learned_exit": bool, "max_tokens": int}


def require_onnxruntime():
    """onnxruntime, or one clear UserError naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"the onnx runtime needs ONNX Runtime: {INSTALL_HINT}") from None
    return onnxruntime


# ------------------------------------------------------------------------------------------------
# what produced an export, and whether it still matches its checkpoint
# ------------------------------------------------------------------------------------------------
def file_digest(path: Path) -> dict:
    """sha256, size and mtime of a file (the stat lets a later check skip re-hashing an unchanged file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    st = path.stat()
    return {"sha256": h.hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def meta_digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps({k: meta.get(k) for k in META_KEYS}, sort_keys=True).encode()).hexdigest()


def source_fingerprint(ckpt_dir: Path, meta: dict) -> dict:
    """What an export of ``ckpt_dir`` depends on."""
    ramps = ckpt_dir / RAMPS_FILE
    return {MODEL_FILE: file_digest(ckpt_dir / MODEL_FILE),
            RAMPS_FILE: file_digest(ramps) if ramps.is_file() else None,
            "meta_sha256": meta_digest(meta), "meta": {k: meta.get(k) for k in META_KEYS}}


def _same_file(path: Path, recorded: dict | None) -> bool:
    if recorded is None or not path.is_file():
        return recorded is None and not path.is_file()
    st = path.stat()
    if st.st_size != recorded["size"]:
        return False
    if st.st_mtime_ns == recorded["mtime_ns"]:
        return True  # untouched since the export: no need to hash 100s of MB at every start
    return file_digest(path)["sha256"] == recorded["sha256"]


def stale_reasons(ckpt_dir: Path, manifest: dict, meta: dict) -> list:
    """Why the export described by ``manifest`` no longer matches ``ckpt_dir`` (empty: it matches)."""
    src = manifest.get("source", {})
    reasons = []
    if manifest.get("format") != EXPORT_FORMAT:
        reasons.append(f"export format {manifest.get('format')} (this deebert writes {EXPORT_FORMAT})")
    for name in (MODEL_FILE, RAMPS_FILE):
        if not _same_file(ckpt_dir / name, src.get(name)):
            reasons.append(f"{name} changed")
    if src.get("meta_sha256") != meta_digest(meta):
        reasons.append(f"{META_FILE} ({', '.join(META_KEYS)}) changed")
    return reasons


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def find_export(path: Path) -> tuple:
    """``path`` is a checkpoint (its export in ``path/onnx``) or an export folder -> (export dir,
    checkpoint dir or None for a standalone export)."""
    if (path / EXPORT_DIR / MANIFEST).is_file():
        return path / EXPORT_DIR, path
    if (path / MANIFEST).is_file():
        parent = path.parent
        inside = path.name == EXPORT_DIR and (parent / META_FILE).is_file() and (parent / MODEL_FILE).is_file()
        return path, parent if inside else None
    if not path.is_dir():
        raise UserError(f"no checkpoint at '{path}' (run `deebert finetune` first, or pass --checkpoint DIR)")
    raise UserError(f"'{path}' has no ONNX export: run `deebert export --checkpoint {path}` first")


def load_onnx(path, precision: str = "fp32", threads: int | None = None) -> Checkpoint:
    """A checkpoint for :func:`~.stream.predict_stream` whose model runs the exported graphs. A stale
    export (the checkpoint's weights or off-ramp config changed since) is refused with one line naming
    ``deebert export``."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown ONNX precision '{precision}': use {' or '.join(PRECISIONS)}")
    ort = require_onnxruntime()
    odir, ckdir = find_export(Path(path))
    again = f"run `deebert export --checkpoint {ckdir or '<checkpoint>'}` again"
    manifest = read_json(odir / MANIFEST, "ONNX export manifest", again, MANIFEST_SHAPE)
    missing = sorted(set(MANIFEST_SHAPE) - set(manifest) - {"learned_exit", "max_tokens"})
    if missing:
        raise UserError(f"ONNX export manifest '{odir / MANIFEST}' is damaged: no {', '.join(missing)}; {again}")
    # a damaged deebert.json is not fixed by exporting again (export reads the same file)
    meta = read_checked((ckdir or odir) / META_FILE, META_TODO if ckdir is not None else
                        f"restore it from a copy of the export, or export the checkpoint again once its {META_FILE} is sound")
    if ckdir is not None:
        reasons = stale_reasons(ckdir, manifest, meta)
        if reasons:
            raise UserError(f"the ONNX export in '{odir}' is stale ({'; '.join(reasons)}): "
                            f"run `deebert export --checkpoint {ckdir}` again")
    if precision not in manifest["precisions"]:
        raise UserError(f"the ONNX export in '{odir}' has no {precision} graphs: "
                        f"run `deebert export --checkpoint {ckdir or '<checkpoint>'} --quantize {precision}`")
    config = read_json(odir / "config.json", "model config", again, {"id2label": dict})
    model = OnnxModel(ort, odir, manifest, precision, config, meta, threads)
    tok = None
    if (odir / "tokenizer.json").is_file():
        from .tokenizer import FastTokenizer

        tok = FastTokenizer(odir / "tokenizer.json", manifest["pad_token_id"], model.takes_token_type_ids)
    return Checkpoint(model=model, tokenizer=tok, meta=meta, path=Path(path))


def session_options(ort, threads: int | None = None):
    """Intra-op threads = the cores, full graph optimisation, sequential execution, ORT's default thread
    spinning (between the layer calls of one text the pool stays hot)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or _cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def open_session(ort, graph: Path, options):
    """An ONNX Runtime session of ``graph`` on the CPU; a missing, unreadable or damaged graph or weights
    file (``model.onnx.data`` cut short) is one UserError line saying to export again."""
    odir = graph.parent.parent
    again = f"run `deebert export --checkpoint {odir.parent if odir.name == EXPORT_DIR else '<checkpoint>'}` again"
    for f in (graph, graph.with_name(graph.name + ".data")):
        if not f.is_file():
            raise UserError(f"the ONNX export is missing '{f}': {again}")
        check_readable(f, "ONNX export file", again)
    try:
        return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (Fail, InvalidProtobuf, ...) derive from Exception
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the ONNX export '{graph}' is damaged or incomplete ({first[:300]}): {again}") from None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class OnnxModel:
    """The exported highway model: one session, one call per step (the embeddings, then each layer with
    its exit)."""

    runtime = "onnx"
    xp = np
    device = "cpu"
    call_tokens = 32  # a layer call in padded tokens (benchmarks/bench_refill_groups.py, docs/BENCHMARKS.md)

    def __init__(self, ort, odir: Path, manifest: dict, precision: str, config: dict, meta: dict,
                 threads: int | None = None):
        self.manifest, self.precision = manifest, precision
        self.num_layers = manifest["num_layers"]
        self.num_labels = manifest["num_labels"]
        self.max_tokens = manifest.get("max_tokens")  # the longest input the position embeddings cover
        self.family = manifest["family"]
        self.ramp_cfg = ramp_config(meta, odir)
        id2label = {int(k): v for k, v in config.get("id2label", {}).items()} or {i: str(i) for i in range(self.num_labels)}
        self.config = SimpleNamespace(id2label=id2label, num_labels=self.num_labels, model_type=config.get("model_type"))
        self._session = open_session(ort, odir / precision / str(manifest["graphs"].get("model", MODEL_GRAPH)),
                                     session_options(ort, threads))
        self._steps = [np.array(k, dtype=np.int64) for k in range(self.num_layers + 1)]
        # the graph's own inputs say whether it reads token type ids (DeBERTa-v3, DistilBERT: not, though
        # their tokenizers may emit them; those are dropped in embed)
        self.takes_token_type_ids = "token_type_ids" in {i.name for i in self._session.get_inputs()}
        # what a step does not read is still a required input of the one model: fed a 1-element dummy
        ids = np.zeros((1, 1), dtype=np.int64)
        self._idle_ids = {"input_ids": ids, "token_type_ids": ids} if self.takes_token_type_ids else {"input_ids": ids}
        self._idle_layer = {"hidden": np.zeros((1, 1, 1), dtype=np.float32), "attention_mask": ids}
        last = self.num_layers - 1
        self._scored = [bool(manifest.get("learned_exit")) and i < last for i in range(self.num_layers)]
        self._fetch = [["logits"] if i == last else ["hidden_out", "logits"] for i in range(self.num_layers)]
        self._fetch_scored = [f + ["score"] if self._scored[i] else f for i, f in enumerate(self._fetch)]

    def backend(self, device=None, precision: str = "fp32"):
        if precision != "fp32":
            raise UserError("--precision (autocast) applies to --runtime torch; the onnx runtime takes --onnx-precision")
        return self

    # -- Backend ------------------------------------------------------------------------------------
    @staticmethod
    def put(a: np.ndarray) -> np.ndarray:
        return a

    @staticmethod
    def to_numpy(a) -> np.ndarray:
        return np.asarray(a)

    def embed(self, input_ids: np.ndarray, token_type_ids: np.ndarray | None = None) -> np.ndarray:
        feeds = {"step": self._steps[0], "input_ids": input_ids, **self._idle_layer}
        if self.takes_token_type_ids:  # else dropped: the graph does not read them
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        return self._session.run(["hidden_out"], feeds)[0]

    def layer(self, i: int, hidden: np.ndarray, attention_mask: np.ndarray, score: bool = False,
              exit: bool = True) -> tuple:
        """One step of the composed graph (its exit logits come with it, so ``exit`` changes nothing)."""
        feeds = {"step": self._steps[i + 1], "hidden": np.ascontiguousarray(hidden),
                 "attention_mask": np.ascontiguousarray(attention_mask), **self._idle_ids}
        if i == self.num_layers - 1:
            return hidden, self._session.run(self._fetch[i], feeds)[0], None
        if score:
            if not self._scored[i]:
                raise UserError("this export has no learned exits: re-run `deebert export` after `train-exits --learned-exits`")
            h, logits, s = self._session.run(self._fetch_scored[i], feeds)
            return h, logits, s
        h, logits = self._session.run(self._fetch[i], feeds)
        return h, logits, None
