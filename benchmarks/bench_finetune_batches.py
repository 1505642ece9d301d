"""Stage-1 cost of random vs length-grouped batches (``deebert finetune --group-by-length``), side by side.

For each ordering, one epoch's batches are drawn exactly as ``deebert finetune`` draws them (seed 42);
``--sample`` batches spread evenly over that epoch are timed (forward, backward, AdamW step) on the
default backbone, the two orderings interleaved, ``--repeats`` times, fastest kept. Also prints the tokens
one whole epoch computes (padding included) under each ordering, which needs no timing.

    .venv/bin/python benchmarks/bench_finetune_batches.py [--dataset movie_snippets] [--sample 24]
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="movie_snippets")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sample", type=int, default=24, help="batches timed per ordering")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from deebert_cli.core.config import DEFAULT_MODEL
    from deebert_cli.core.data.examples import DataSpec, prepare_data
    from deebert_cli.core.data.encoding import encode, pad_batch
    from deebert_cli.core.model.highway import HighwayModel
    from deebert_cli.core.train.common import resolve_model_path
    from deebert_cli.core.train.stage1 import _final_logits

    path = resolve_model_path(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    data = prepare_data(DataSpec(args.dataset))
    enc = encode(tok, data.train.texts, None, 128)
    lengths, n, bs = enc.lengths(), len(enc), args.batch_size
    labels = torch.tensor(data.train.labels)

    def batches(grouped: bool) -> list:
        g = torch.Generator().manual_seed(42)
        order = get_length_grouped_indices(lengths, bs, generator=g) if grouped else torch.randperm(n, generator=g).tolist()
        return [order[k : k + bs] for k in range(0, n, bs)]

    plans = {"random": batches(False), "grouped": batches(True)}
    for name, plan in plans.items():
        tokens = sum(max(lengths[i] for i in b) * len(b) for b in plan)
        print(f"{name:8s} tokens per epoch incl. padding: {tokens} (real tokens {sum(lengths)})")

    torch.manual_seed(0)
    model = HighwayModel.from_backbone(path, data.label_names).model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    best = {k: float("inf") for k in plans}
    for _ in range(args.repeats):
        for name, plan in plans.items():
            step = max(1, len(plan) // args.sample)
            picked = plan[::step][: args.sample]
            t0 = time.perf_counter()
            for b in picked:
                batch = pad_batch(enc, b, tok.pad_token_id)
                loss = torch.nn.functional.cross_entropy(_final_logits(model, batch), labels[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            best[name] = min(best[name], (time.perf_counter() - t0) / len(picked) * len(plan))
    for name, s in best.items():
        print(f"{name:8s} estimated seconds per epoch (fastest of {args.repeats}): {s:.1f}")
    print(f"grouped / random: {best['grouped'] / best['random']:.3f}")


if __name__ == "__main__":
    main()
