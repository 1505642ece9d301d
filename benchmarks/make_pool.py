"""The data behind the guarantee benchmark (docs/BENCHMARKS.md, "Thresholds with a guarantee"): split a
labelled dataset folder into a training folder for stage 1 (N random training texts and the validation
split) and a pool of labelled texts nothing trains or tunes on (the other training texts and the test split).

    python benchmarks/make_pool.py --dataset ../shared/datasets/movie_snippets --train 6000 --out runs/data
      -> runs/data/movie_snippets-6000/{train,validation}.jsonl and runs/data/movie_snippets-6000-pool.jsonl

Deterministic (--seed): the same folder and seed give the same split."""
from __future__ import annotations

import argparse
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="folder with train/validation/test .jsonl")
    ap.add_argument("--train", type=int, required=True, help="training texts kept for stage 1")
    ap.add_argument("--out", default="runs/data")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    src = Path(a.dataset)
    lines = {s: [l for l in (src / f"{s}.jsonl").read_text(encoding="utf-8").split("\n") if l.strip()]
             for s in ("train", "validation", "test")}
    train = lines["train"][:]
    random.Random(a.seed).shuffle(train)
    name = f"{src.name}-{a.train}"
    folder = Path(a.out) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("\n".join(train[:a.train]) + "\n", encoding="utf-8")
    (folder / "validation.jsonl").write_text("\n".join(lines["validation"]) + "\n", encoding="utf-8")
    pool = train[a.train:] + lines["test"]
    (Path(a.out) / f"{name}-pool.jsonl").write_text("\n".join(pool) + "\n", encoding="utf-8")
    print(f"{folder}: {a.train} train, {len(lines['validation'])} validation; pool {len(pool)} texts")


if __name__ == "__main__":
    main()
