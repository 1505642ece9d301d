"""Where batch-1 time goes on the onnx runtime, against the plain ONNX Runtime classifier.

    .venv/bin/python benchmarks/bench_batch1_budget.py --checkpoint /work/runs/i11-minilm [--precision int8]

The ideal layer speedup (L / mean exit layer) counts transformer layers only. At batch 1 the early-exit
model also pays, per layer it runs, for a session call and its off-ramp, and per text for the engine.
Rows (the movie-review test split, one text per call, length-sorted as predict sorts them; interleaved,
fastest of --repeats; microseconds per text):

  * the plain classifier (bench_runtime.py's graph: torch.onnx.export + ORT fusions [+ int8]);
  * the exported steps at full depth, called in a bare loop (embeddings, then every layer);
  * the same steps with the off-ramps cut out of layers 1..L-1 (onnx.utils.Extractor; the logits output
    becomes a 1-element stand-in), composed the way `deebert export` composes them;
  * `predict_stream` at full depth (threshold 0) and at --threshold, batch 1 (the engine);
  * a bare loop at --threshold: the same exit decisions (exits.exit_entropy) with no engine around them;
  * the engine's batch call alone (`EarlyExitEngine.run_rows` on the pre-tokenised rows) at --threshold:
    between it and predict_stream lie tokenising, the reorder buffer and the result objects;
  * the same steps chained into one graph per depth k (embeddings, then layers 1..k with the off-ramps
    the exit decisions read; onnx.compose): each text in one call to the layer where it exits at
    --threshold (texts grouped by depth, so one session runs at a time), and every text to full depth.
    No call between layers and no exit logic: what an engine that ran a text in one call (exit
    decisions inside the graph) could at best gain over the bare loop.

The differences are the off-ramps' cost, the per-step call cost (session call, the If tree, the
embeddings' own call) and the engine's cost per text."""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx_sessions import per_step_graphs  # noqa: E402
from bench_runtime import DATA, plain_onnx, rows_of  # noqa: E402


def cut_ramps(parts: Path, out: Path, num_layers: int) -> list:
    """Layer graphs 1..L-1 without their off-ramps -> the step files (embeddings, layers) to compose."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.utils import Extractor

    out.mkdir(parents=True, exist_ok=True)
    files = [parts / "embed.onnx"]
    for k in range(1, num_layers):
        sub = Extractor(onnx.load(str(parts / f"layer_{k:02d}.onnx"))).extract_model(["hidden", "attention_mask"], ["hidden_out"])
        g = sub.graph
        g.node.extend([helper.make_node("Cast", ["attention_mask"], ["stand_in_f"], to=TensorProto.FLOAT, name="stand_in_cast"),
                       helper.make_node("ReduceSum", ["stand_in_f"], ["logits"], keepdims=1, name="stand_in_sum")])
        g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
        onnx.save(sub, str(out / f"layer_{k:02d}.onnx"))
        files.append(out / f"layer_{k:02d}.onnx")
    return files + [parts / f"layer_{num_layers:02d}.onnx"]


def chain(steps: list, depth: int, out: Path) -> Path:
    """Embeddings and layers 1..depth of ``steps`` as one graph: inputs input_ids[, token_type_ids],
    attention_mask; outputs every layer's logits (so no off-ramp on the way is pruned)."""
    import onnx
    from onnx import compose

    model = compose.add_prefix(onnx.load(str(steps[0])), "e_")
    for k in range(1, depth + 1):
        layer = compose.add_prefix(onnx.load(str(steps[k])), f"l{k}_")
        model = compose.merge_models(model, layer, io_map=[("e_hidden" if k == 1 else f"l{k - 1}_hidden_out", f"l{k}_hidden")])
    g = model.graph
    masks = {f"l{k}_attention_mask" for k in range(1, depth + 1)}
    for node in g.node:
        node.input[:] = ["attention_mask" if x in masks else x for x in node.input]
    inputs = [i for i in g.input if i.name not in masks]
    mask = next(i for i in g.input if i.name in masks)
    mask.name = "attention_mask"
    del g.input[:]
    g.input.extend(inputs + [mask])
    logits = [o for o in g.output if o.name.endswith("_logits")]
    del g.output[:]
    g.output.extend(logits)
    onnx.save(model, str(out))
    return out


def build(ckpt_dir: Path, work: Path, precision: str) -> dict:
    """The per-step graphs (as `deebert export` writes them), composed with and without off-ramps, and
    chained into one graph per depth."""
    from deebert_cli.core.runtime.export import compose_steps

    steps = per_step_graphs(ckpt_dir, work, precision)  # embeddings, layers 1..L
    compose_steps(steps, work / "with_ramps" / "model.onnx")
    compose_steps(cut_ramps(steps[0].parent, work / "cut", len(steps) - 1), work / "without_ramps" / "model.onnx")
    graphs = {"with": work / "with_ramps" / "model.onnx", "without": work / "without_ramps" / "model.onnx"}
    for k in range(1, len(steps)):
        graphs[f"chain{k}"] = chain(steps, k, work / f"chain_{k}.onnx")
    return graphs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, help="a checkpoint with trained off-ramps and an ONNX export")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/bench_runtime", help="where the plain classifier graphs go")
    args = ap.parse_args()

    import onnxruntime as ort

    from deebert_cli.core.data.encoding import encode
    from deebert_cli.core.model.policies import exit_entropy
    from deebert_cli.core.runtime.engine import EarlyExitEngine, pad_rows
    from deebert_cli.core.runtime.rules import ExitRule
    from deebert_cli.core.runtime.stream import load_for_inference, predict_stream
    from deebert_cli.core.runtime.onnx_backend import session_options

    ck = Path(args.checkpoint)
    texts, _ = rows_of(DATA / "test.jsonl")
    onnx_ck = load_for_inference(ck, "onnx", precision=args.precision, threads=args.threads)
    tok, L = onnx_ck.tokenizer, onnx_ck.model.num_layers
    enc = encode(tok, texts, None, onnx_ck.meta.get("max_length", 128))
    order = sorted(range(len(texts)), key=lambda i: (len(enc.input_ids[i]), i))
    rows = [pad_rows([enc.input_ids[i]], tok.pad_token_id, [enc.token_type_ids[i]]) for i in order]
    plain = ort.InferenceSession(str(plain_onnx(ck, Path(args.work) / "plain")[args.precision]),
                                 session_options(ort, args.threads), providers=["CPUExecutionProvider"])
    tmp = tempfile.TemporaryDirectory()
    graphs = build(ck, Path(tmp.name), args.precision)
    sessions = {k: ort.InferenceSession(str(p), session_options(ort, args.threads), providers=["CPUExecutionProvider"])
                for k, p in graphs.items()}
    steps = [np.array(k, dtype=np.int64) for k in range(L + 1)]
    one_id, one_h = np.zeros((1, 1), np.int64), np.zeros((1, 1, 1), np.float32)
    thr = args.threshold

    def classifier():
        for a, m, t in rows:
            plain.run(None, {"input_ids": a, "attention_mask": m, "token_type_ids": t})

    def walk(sess, a, m, t, threshold: float) -> int:
        """One text through the steps in a bare loop, stopping where the entropy falls below
        ``threshold`` (0: full depth) -> its exit layer (1-based)."""
        h = sess.run(["hidden_out"], {"step": steps[0], "input_ids": a, "token_type_ids": t,
                                      "hidden": one_h, "attention_mask": one_id})[0]
        for k in range(1, L + 1):
            feeds = {"step": steps[k], "input_ids": one_id, "token_type_ids": one_id, "hidden": h, "attention_mask": m}
            if k == L:
                sess.run(["logits"], feeds)
                return k
            h, logits = sess.run(["hidden_out", "logits"], feeds)
            if threshold > 0 and float(exit_entropy(logits)[0]) < threshold:
                return k

    def bare(sess, threshold=0.0):
        def run():
            for a, m, t in rows:
                walk(sess, a, m, t, threshold)
        return run

    def chained(depths):
        by_depth = [(k, [r for r, d in zip(rows, depths) if d == k]) for k in range(1, L + 1)]

        def run():  # depth by depth: one session at a time, as the other rows run one (hot) session
            for k, part in by_depth:
                sess = sessions[f"chain{k}"]
                for a, m, t in part:
                    sess.run(None, {"e_input_ids": a, "e_token_type_ids": t, "attention_mask": m})
        return run

    def batch_calls(threshold):
        eng = EarlyExitEngine(onnx_ck, ExitRule([threshold] * L), "cpu", batch_size=1)
        ids = [([enc.input_ids[i]], [enc.token_type_ids[i]]) for i in order]

        def run():
            for a, t in ids:
                eng.run_rows(a, t)
        return run

    def engine(threshold):
        def run():
            list(predict_stream(onnx_ck, texts, ExitRule([threshold] * L), "cpu", batch_size=1))
        return run

    exits = [walk(sessions["with"], a, m, t, thr) for a, m, t in rows]  # the chained rows' depths
    mean_exit = sum(exits) / len(exits)
    configs = {
        "ORT classifier (plain)": classifier,
        "steps, full depth, bare loop": bare(sessions["with"]),
        "steps without off-ramps, full depth, bare loop": bare(sessions["without"]),
        "predict_stream, full depth": engine(0.0),
        f"steps, threshold {thr:g}, bare loop": bare(sessions["with"], thr),
        f"EarlyExitEngine.run_rows, threshold {thr:g}": batch_calls(thr),
        f"predict_stream, threshold {thr:g}": engine(thr),
        "chained: one call per text, full depth": chained([L] * len(rows)),
        f"chained: one call per text, to its exit at {thr:g}": chained(exits),
    }
    best = {k: math.inf for k in configs}
    for _ in range(args.repeats):
        for name, fn in configs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    us = {k: 1e6 * v / len(texts) for k, v in best.items()}
    base = us["ORT classifier (plain)"]
    print(f"{ck}, {args.precision}, {len(texts)} test texts at batch 1, {args.threads} threads, fastest of {args.repeats}")
    print("| configuration | us per text | classifier time / this |\n|---|---:|---:|")
    for k, v in us.items():
        print(f"| {k} | {v:.0f} | {base / v:.2f} |")
    full, cut = us["steps, full depth, bare loop"], us["steps without off-ramps, full depth, bare loop"]
    ideal = L / mean_exit
    print(json.dumps({
        "mean_exit_layer": round(mean_exit, 4), "ideal_speedup": round(ideal, 4),
        "bare_loop_fraction_of_ideal": round(base / us[f"steps, threshold {thr:g}, bare loop"] / ideal, 3),
        "chained_fraction_of_ideal": round(base / us[f"chained: one call per text, to its exit at {thr:g}"] / ideal, 3),
        "predict_stream_fraction_of_ideal": round(base / us[f"predict_stream, threshold {thr:g}"] / ideal, 3),
        "off_ramps_share_of_full_depth": round((full - cut) / full, 3),
        "steps_without_ramps_vs_classifier": round(base / cut, 3),
        "engine_share_at_full_depth": round((us["predict_stream, full depth"] - full) / us["predict_stream, full depth"], 3),
        "engine_share_at_threshold": round((us[f"predict_stream, threshold {thr:g}"] - us[f"steps, threshold {thr:g}, bare loop"])
                                           / us[f"predict_stream, threshold {thr:g}"], 3)}))


if __name__ == "__main__":
    main()
