"""Tokenisation and batching: :class:`Encoded` token ids, right-padded batches, length-sorted order."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Encoded:
    """Token ids of n texts, unpadded: input_ids [n][len], token_type_ids [n][len] or None."""

    input_ids: list
    token_type_ids: list | None
    truncated: int = 0  # how many texts lost tokens to max_length

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list:
        return [len(x) for x in self.input_ids]

    def subset(self, idx) -> "Encoded":
        idx = list(idx)
        tt = None if self.token_type_ids is None else [self.token_type_ids[i] for i in idx]
        return Encoded([self.input_ids[i] for i in idx], tt)


def fit_max_length(requested: int, limit: int | None, what: str = "--max-length") -> tuple:
    """Tokens per input: ``requested``, but at most ``limit`` (what the model takes: its position
    embeddings) -> (tokens, the warning to show when it was lowered, else None). Every command that
    tokenises for a model uses this one rule."""
    if limit and requested and requested > limit:
        return limit, f"{what} {requested} is more than this model takes ({limit} tokens, its position embeddings); using {limit}"
    return requested, None


def encode(tokenizer, texts: list, pairs: list | None, max_length: int) -> Encoded:
    """Tokenise with truncation to ``max_length`` and count the texts that were cut."""
    kw = dict(truncation=True, max_length=max_length, padding=False)
    out = tokenizer(texts, pairs, **kw) if pairs is not None else tokenizer(texts, **kw)
    ids = out["input_ids"]
    ttype = out.get("token_type_ids")
    # only texts that hit the limit can have been cut: re-check just those without truncation
    full = [i for i, x in enumerate(ids) if len(x) >= max_length]
    truncated = 0
    if full:
        sub_t = [texts[i] for i in full]
        sub_p = [pairs[i] for i in full] if pairs is not None else None
        raw = tokenizer(sub_t, sub_p, truncation=False, padding=False, verbose=False) if sub_p is not None \
            else tokenizer(sub_t, truncation=False, padding=False, verbose=False)
        truncated = sum(len(x) > max_length for x in raw["input_ids"])
    return Encoded(ids, ttype, truncated)


def pad_batch(enc: Encoded, idx, pad_id: int) -> dict:
    """Rows ``idx`` of ``enc`` -> right-padded tensors {input_ids, attention_mask[, token_type_ids]} [b, s]."""
    import torch

    rows = [enc.input_ids[i] for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if enc.token_type_ids is not None:
        tt = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(idx):
            t = enc.token_type_ids[i]
            tt[j, : len(t)] = torch.tensor(t, dtype=torch.long)
        out["token_type_ids"] = tt
    return out


def length_sorted_batches(lengths: list, batch_size: int) -> list:
    """Index batches with rows of similar length together (less padding); order is deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
