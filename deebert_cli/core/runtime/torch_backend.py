"""The torch runtime's backend for the early-exit engine: a :class:`~..model.highway.HighwayModel` on a device,
with autocast for ``--precision bf16|fp16`` entered around each call (never across a ``yield``)."""
from __future__ import annotations

import numpy as np
import torch
from array_api_compat import torch as xp_torch

from ..device import autocast


class TorchBackend:
    """:class:`~.engine.Backend` over a HighwayModel (torch tensors through ``array_api_compat``)."""

    xp = xp_torch

    def __init__(self, model, device=None, precision: str = "fp32"):
        self.device = torch.device(device if device is not None else "cpu")
        self.model = model.to(self.device).eval()
        self.precision = precision
        self.num_layers = model.num_layers
        self.num_labels = model.num_labels
        # what one more layer call costs, in padded tokens (engine.width_groups): on the CPU the fastest
        # value measured for the serving core (benchmarks/bench_refill_groups.py, docs/BENCHMARKS.md).
        # On an accelerator a call costs about the same for few or many tokens (not measured here).
        self.call_tokens = 64 if self.device.type == "cpu" else 1024
        self.autocast_cache = True  # False under CUDA graph capture (the static engine)
        self._mask_cache = None  # ((mask tensor, (b, s), dtype), prepared mask) of the batch in flight

    def put(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def to_numpy(self, a: torch.Tensor) -> np.ndarray:
        if a.dtype in (torch.bfloat16, torch.float16):
            a = a.float()
        return a.detach().cpu().numpy()

    @torch.no_grad()
    def embed(self, input_ids, token_type_ids=None):
        with autocast(self.device, self.precision):
            return self.model.embed(input_ids, token_type_ids)

    def _mask(self, attention_mask, hidden):
        """The family's prepared mask for this batch, built once and reused while the batch (the same
        mask tensor, shape and dtype of the hidden states) stays: a layer step on a GPU is a few hundred
        microseconds, and rebuilding the mask at every layer cost a noticeable share of it."""
        key = (attention_mask, tuple(hidden.shape[:2]), hidden.dtype)
        cached = self._mask_cache
        if cached is None or cached[0][0] is not key[0] or cached[0][1:] != key[1:]:
            self._mask_cache = cached = (key, self.model.prepare_mask(attention_mask, hidden))
        return cached[1]

    @torch.no_grad()
    def layer(self, i: int, hidden, attention_mask, score: bool = False, exit: bool = True) -> tuple:
        m = self.model
        with autocast(self.device, self.precision, self.autocast_cache):
            hidden = m.run_layer(i, hidden, self._mask(attention_mask, hidden))
            if not exit:
                return hidden, None, None
            if score:
                logits, s = m.exit_logits_and_score(i, hidden, attention_mask)
                return hidden, logits.float(), s.float()
            return hidden, m.exit_logits(i, hidden, attention_mask).float(), None
