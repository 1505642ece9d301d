"""Early exit on a GPU: deebert's torch runtime against the plain transformers classifier, side by side.

    python benchmarks/bench_gpu.py --checkpoint CK --data DIR --json gpu.json

Rows, for each precision (fp32, bf16, fp16: autocast, as ``--precision`` does) and batch size (1, 32,
256), over the texts of DIR/test.jsonl (the movie-review test split), every row length-sorting its texts
and tokenising inside the timing, as deebert's engine does within its window:

* ``eager``: the checkpoint's final exit as a plain ``AutoModelForSequenceClassification`` (what a user
  runs instead of deebert);
* ``threshold 0``: deebert at full depth (every layer called one by one, no exit check: the engine's
  own overhead);
* ``checks, no exit``: deebert with a threshold so small that no row leaves, so every layer's off-ramp,
  entropy and exit decision (and the host-device sync that reads it) run as at a real threshold;
* ``threshold T``: the stored threshold, ``--engine shrink`` (the default) and ``--engine refill``;
* ``threshold T, sync every k``: a variant of shrink that decides exits on the device at every layer
  but reads them (one sync) and compacts the batch only every k layers; rows that left keep being
  computed until then, their results frozen at their own exit layer. Same answers, fewer syncs.

Configurations are interleaved and repeated (the fastest run kept) after one warm-up pass. It prints the
ratios: speedup over eager, the ideal (L / mean exit layer) and the fraction of it reached, and what the
checks cost (``checks, no exit`` vs ``threshold 0``). ``--layer-costs`` adds one transformer layer's time
against its rows (is a smaller batch cheaper on this device?).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NO_EXIT = 1e-9  # a normalized-entropy threshold no real row goes below: every check runs, nobody leaves


def rows_of(path: Path) -> tuple:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# the rows
# ------------------------------------------------------------------------------------------------
class Eager:
    """The plain classifier: tokenise, length-sort, pad each batch, one forward, argmax."""

    def __init__(self, ckpt, device, precision):
        self.model = ckpt.model.model.to(device).eval()  # the wrapped transformers classifier, as saved
        self.tok, self.device, self.precision = ckpt.tokenizer, device, precision

    @torch.no_grad()
    def __call__(self, texts, bs) -> tuple:
        from deebert_cli.core.data.encoding import encode
        from deebert_cli.core.device import autocast
        from deebert_cli.core.runtime.engine import pad_rows

        enc = encode(self.tok, texts, None, 128)
        order = sorted(range(len(texts)), key=lambda i: (len(enc.input_ids[i]), i))
        pred = [0] * len(texts)
        for s in range(0, len(order), bs):
            part = order[s : s + bs]
            tt = [enc.token_type_ids[i] for i in part] if enc.token_type_ids is not None else None
            a, m, t = pad_rows([enc.input_ids[i] for i in part], self.tok.pad_token_id, tt)
            kw = {} if t is None else {"token_type_ids": torch.from_numpy(t).to(self.device)}
            with autocast(self.device, self.precision):
                logits = self.model(input_ids=torch.from_numpy(a).to(self.device),
                                    attention_mask=torch.from_numpy(m).to(self.device), **kw).logits
            for i, p in zip(part, logits.argmax(-1).tolist()):
                pred[i] = p
        return pred, None


def deebert(ckpt, device, precision, thr, engine="shrink", every=1):
    from deebert_cli.core.runtime.rules import ExitRule
    from deebert_cli.core.runtime.stream import PredictStats, predict_stream

    rule = ExitRule([thr] * ckpt.model.num_layers)

    def run(texts, bs):
        stats = PredictStats(ckpt.model.num_layers)
        if every > 1:
            out = _deferred(ckpt, rule, device, precision, texts, bs, every)
        else:
            out = list(predict_stream(ckpt, texts, rule, device, batch_size=bs, stats=stats, engine=engine,
                                      precision=precision))
        return [r.label for r in out], [r.exit_layer for r in out]

    return run


def _deferred(ckpt, rule, device, precision, texts, bs, every):
    """predict_stream's shrink engine with exits read every ``every`` layers (see the module docstring)."""
    from deebert_cli.core.runtime.engine import EarlyExitEngine
    from deebert_cli.core.runtime.stream import predict_stream

    class Deferred(EarlyExitEngine):
        def run_batch(self, batch):
            return deferred_run_batch(self, batch, every)

    import deebert_cli.core.runtime.stream as inf

    orig = inf.EarlyExitEngine
    inf.EarlyExitEngine = Deferred
    try:
        return list(predict_stream(ckpt, texts, rule, device, batch_size=bs, precision=precision))
    finally:
        inf.EarlyExitEngine = orig


def deferred_run_batch(eng, batch, every: int) -> tuple:
    """EarlyExitEngine.run_batch with one host-device sync per ``every`` layers instead of one per layer:
    exits are decided on the device at every layer and each row's exit layer and logits frozen there
    (``torch.where``); at a sync the rows that left are read back and dropped from the batch."""
    be = eng.backend
    ids, mask, tt = batch["input_ids"], np.asarray(batch["attention_mask"]), batch.get("token_type_ids")
    b = mask.shape[0]
    hidden = be.embed(be.put(np.asarray(ids)), None if tt is None else be.put(np.asarray(tt)))
    attn = be.put(mask)
    active = np.arange(b)
    lengths = mask.sum(1)
    state = eng.policy.init_state(b, eng.device, eng.xp)
    exit_layer = np.full(b, eng.L - 1, dtype=np.int64)
    out_logits = np.empty((b, eng.C), dtype=np.float32)
    left = torch.zeros(b, dtype=torch.bool, device=eng.device)  # rows that left, still in the batch
    at = torch.full((b,), eng.L - 1, dtype=torch.int64, device=eng.device)
    kept = torch.zeros((b, eng.C), dtype=torch.float32, device=eng.device)
    for i in range(eng.L):
        last = i == eng.L - 1
        hidden, logits, score = be.layer(i, hidden, attn, eng.policy.needs_score and not last)
        if last:
            done = torch.ones_like(left)
        else:
            done, state = eng.policy.step(i, logits, state, score)
        new = done & ~left
        at = torch.where(new, i, at)
        kept = torch.where(new[:, None], logits, kept)
        left = left | done
        if last or (i + 1) % every == 0:
            fin = left.cpu().numpy()  # the one sync of these layers
            if fin.any():
                exit_layer[active[fin]] = at.cpu().numpy()[fin]
                out_logits[active[fin]] = kept.cpu().numpy()[fin]
                keep = ~fin
                if not keep.any():
                    break
                sel = be.put(keep)
                hidden, attn, active, lengths = hidden[sel], attn[sel], active[keep], lengths[keep]
                left, at, kept = left[sel], at[sel], kept[sel]
                state = tuple(t[sel] for t in state)
                width = int(lengths.max())
                if width < hidden.shape[1]:
                    hidden, attn = hidden[:, :width], attn[:, :width]
    return exit_layer, out_logits, eng._entropy(out_logits)


# ------------------------------------------------------------------------------------------------
# one transformer layer against its rows
# ------------------------------------------------------------------------------------------------
def bert_base():
    """A randomly initialised BERT-base-sized highway model (768 wide, 12 layers): timing only."""
    from transformers import BertConfig, BertForSequenceClassification

    from deebert_cli.core.model.highway import HighwayModel

    return HighwayModel(BertForSequenceClassification(BertConfig(num_labels=2)))


@torch.no_grad()
def layer_costs(m, device, precision, rows=(1, 8, 32, 64, 128, 256, 512, 1024), width=32, reps=50) -> dict:
    """Milliseconds of one layer (+ its off-ramp) of model ``m`` at ``rows`` x ``width`` tokens: how the
    cost of a step falls as rows leave."""
    from deebert_cli.core.device import autocast

    m = m.to(device).eval()
    out = {}
    for b in rows:
        hidden = torch.randn(b, width, m.hidden_size, device=device)
        attn = torch.ones(b, width, dtype=torch.int64, device=device)
        with autocast(device, precision):
            mask = m.prepare_mask(attn, hidden)
            for _ in range(5):
                m.run_layer(0, hidden, mask)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                h = m.run_layer(0, hidden, mask)
                m.exit_logits(0, h, attn)
            sync(device)
        out[b] = (time.perf_counter() - t0) / reps * 1e3
    return out


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def bench(args) -> dict:
    from deebert_cli.core.model.checkpoint import load_checkpoint
    from deebert_cli.core.device import resolve_device

    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    L = ckpt.model.num_layers
    stored = ckpt.meta.get("thresholds", {}).get("values", [0.3])[0]
    thr = args.threshold if args.threshold is not None else stored
    texts, labels = rows_of(Path(args.data) / "test.jsonl")
    texts, labels = texts[: args.n], labels[: args.n]
    y = [ckpt.label_names.index(l) for l in labels]
    out = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "checkpoint": args.checkpoint, "n": len(texts), "layers": L, "threshold": thr, "repeats": args.repeats,
           "results": {}, "layer_costs": {}}
    print(f"{out['gpu']}: torch {out['torch']}, CUDA {out['cuda']}; {len(texts)} texts, L={L}, threshold {thr:g}",
          flush=True)
    for precision in args.precisions:
        configs = {"eager": Eager(ckpt, device, precision),
                   "threshold 0": deebert(ckpt, device, precision, 0.0),
                   "checks, no exit": deebert(ckpt, device, precision, NO_EXIT),
                   f"threshold {thr:g}": deebert(ckpt, device, precision, thr),
                   f"threshold {thr:g}, refill": deebert(ckpt, device, precision, thr, "refill")}
        for k in args.every:
            configs[f"threshold {thr:g}, sync every {k}"] = deebert(ckpt, device, precision, thr, every=k)
        for bs in args.batch_sizes:
            best, got = {k: math.inf for k in configs}, {}
            n = min(len(texts), args.b1_n) if bs == 1 and args.b1_n else len(texts)
            for name, run in configs.items():  # warm-up: CUDA context, cuBLAS plans, autocast caches
                run(texts[:64], bs)
            for _ in range(args.repeats):
                for name, run in configs.items():
                    if bs == 1 and "refill" in name:
                        continue  # one row per step: the engines coincide
                    sync(device)
                    t0 = time.perf_counter()
                    pred, exits = run(texts[:n], bs)
                    sync(device)
                    best[name] = min(best[name], time.perf_counter() - t0)
                    got.setdefault(name, (pred, exits))
            rows = {}
            ref = got[f"threshold {thr:g}"][1]
            for name in got:
                pred, exits = got[name]
                rows[name] = {"seconds": best[name], "ex_per_s": n / best[name], "n": n,
                              "accuracy": sum(int(p == t) for p, t in zip(pred, y)) / n,
                              "mean_exit_layer": float(np.mean(exits)) if exits else float(L)}
                if exits and name.startswith(f"threshold {thr:g},"):  # the same answers as the default engine?
                    rows[name]["exit_layers_differ"] = sum(a != b for a, b in zip(exits, ref))
            out["results"][f"{precision} b{bs}"] = rows
            print_rows(precision, bs, rows, L, thr, flush=True)
        if args.layer_costs:
            for name, m in (("checkpoint", ckpt.model), ("bert-base size", bert_base())):
                got = out["layer_costs"].setdefault(name, {})[precision] = layer_costs(m, device, precision)
                print(f"{precision}, {name}: one layer + off-ramp, ms at 32 tokens by rows: "
                      + ", ".join(f"{b}: {ms:.3f}" for b, ms in got.items()), flush=True)
    return out


def print_rows(precision, bs, rows, L, thr, flush=True) -> None:
    base = rows["eager"]["seconds"]
    print(f"\n{precision}, batch {bs} ({next(iter(rows.values()))['n']} texts): {'row':<30} {'texts/s':>9} {'vs eager':>9} {'accuracy':>9} {'mean exit':>9} "
          f"{'ideal':>6} {'of ideal':>8}")
    for name, r in rows.items():
        ideal = L / r["mean_exit_layer"]
        speed = base / r["seconds"]
        print(f"{'':>18}{name:<30} {r['ex_per_s']:>9.0f} {speed:>8.2f}x {100 * r['accuracy']:>8.2f}% "
              f"{r['mean_exit_layer']:>9.2f} {ideal:>5.2f}x {speed / ideal:>8.2f}"
              + (f"  ({r['exit_layers_differ']} exit layers differ)" if "exit_layers_differ" in r else ""), flush=flush)
    if "checks, no exit" in rows:
        c, z = rows["checks, no exit"]["seconds"], rows["threshold 0"]["seconds"]
        print(f"{'':>18}exit checks at every layer cost {100 * (c / z - 1):+.1f}% at full depth", flush=flush)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="/work/shared/datasets/movie_snippets", help="folder with test.jsonl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 256])
    p.add_argument("--every", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="sync-every-k variants to time (empty: none)")
    p.add_argument("--threshold", type=float, default=None, help="default: the checkpoint's stored threshold")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n", type=int, default=None, help="first N texts only")
    p.add_argument("--b1-n", type=int, default=None, help="batch 1 on the first N texts only")
    p.add_argument("--layer-costs", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out = bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
