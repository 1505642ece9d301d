"""The highway model: any encoder-only transformers classifier plus one off-ramp per layer.

The wrapped ``AutoModelForSequenceClassification`` stays intact (its own head is the final exit), so a
checkpoint's final exit loads as a plain transformers classifier; off-ramps for layers 1..L-1 live beside
it. A small per-family adapter (:mod:`.families`) exposes embeddings, layers, mask preparation and the family's own head.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import UserError
from .families import adapter_for
from .policies import AUTO, RampConfig
from .ramps import OffRamp


@dataclass
class ParameterCounts:
    backbone: int  # the plain classifier: encoder + its own head
    ramps: int  # off-ramps of layers 1..L-1

    @property
    def overhead(self) -> float:
        return self.ramps / self.backbone


class HighwayModel(nn.Module):
    """A sequence classifier with an off-ramp after every layer.

    ``model`` is a transformers ``*ForSequenceClassification``; its head is the exit of the last layer.
    ``ramps[i]`` is the off-ramp after layer i+1 (i = 0..L-2)."""

    def __init__(self, model: nn.Module, ramp_cfg: RampConfig | None = None, init_from_pooler: bool = True):
        super().__init__()
        self.model = model
        self.adapter = adapter_for(model)
        self.ramp_cfg = ramp_cfg or RampConfig(pooling=AUTO, dropout=_hidden_dropout(model.config))
        cfg = model.config
        self.hidden_size = cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.dim
        self.build_ramps(self.ramp_cfg, init_from_pooler)

    def build_ramps(self, ramp_cfg: RampConfig, init_from_pooler: bool = True) -> None:
        """Fresh off-ramps for layers 1..L-1, each pooler a copy of the model's pooler where the family
        has one (DeeBERT's ``init_highway_pooler``). Pooling ``auto`` becomes the family's own."""
        if ramp_cfg.pooling == AUTO:
            ramp_cfg = replace(ramp_cfg, pooling=self.adapter.ramp_pooling)
        self.ramp_cfg = ramp_cfg
        self.ramps = nn.ModuleList(
            OffRamp(self.hidden_size, self.model.config.num_labels, ramp_cfg) for _ in range(self.num_layers - 1)
        )
        pooler = self.adapter.pretrained_pooler()
        if init_from_pooler and pooler is not None:
            with torch.no_grad():
                for ramp in self.ramps:  # a copy per layer: no shared tensors
                    ramp.pooler.weight.copy_(pooler.weight)
                    ramp.pooler.bias.copy_(pooler.bias)

    # ---- facts ------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def num_labels(self) -> int:
        return self.model.config.num_labels

    @property
    def takes_token_type_ids(self) -> bool:
        """Whether the model reads token type ids; where not, ``embed`` drops any it is given."""
        return self.adapter.takes_token_type_ids

    @property
    def max_tokens(self) -> int | None:
        """The longest input in tokens this model takes (its position embeddings; the family's offset)."""
        return self.adapter.max_tokens()

    def parameter_counts(self) -> ParameterCounts:
        """Off-ramp parameters vs the plain classifier (backbone + final head)."""
        return ParameterCounts(
            backbone=sum(p.numel() for p in self.model.parameters()),
            ramps=sum(p.numel() for p in self.ramps.parameters()),
        )

    def backbone_parameters(self):
        return self.model.parameters()

    # ---- layer-by-layer pieces (the early-exit engine drives these) -----------------------------
    def embed(self, input_ids, token_type_ids=None) -> torch.Tensor:
        """[batch, seq] -> [batch, seq, hidden]."""
        return self.adapter.embed(input_ids, token_type_ids)

    def prepare_mask(self, attention_mask, hidden):
        return self.adapter.prepare_mask(attention_mask, hidden)

    def run_layer(self, i: int, hidden, mask) -> torch.Tensor:
        """Layer i (0-based): [batch, seq, hidden] -> [batch, seq, hidden]."""
        return self.adapter.run_layer(i, hidden, mask)

    def exit_logits(self, i: int, hidden, attention_mask) -> torch.Tensor:
        """Logits of the exit after layer i (0-based): off-ramp, or the model's own head at the last layer.
        [batch, seq, hidden] -> [batch, classes]."""
        if i == self.num_layers - 1:
            return self.adapter.head(hidden, attention_mask)
        return self.ramps[i](hidden, attention_mask)

    def exit_logits_and_score(self, i: int, hidden, attention_mask) -> tuple:
        """(logits [batch, classes], learned exit score [batch]) of the exit after layer i; the last layer
        (the model's own head, no predictor) scores 1 and always exits anyway."""
        if i == self.num_layers - 1:
            logits = self.adapter.head(hidden, attention_mask)
            return logits, torch.ones(logits.shape[0], device=logits.device)
        ramp = self.ramps[i]
        return ramp.classify_and_score(ramp.pool(hidden, attention_mask))

    # ---- whole passes -----------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, token_type_ids=None, return_hidden: bool = False):
        """Logits of every exit in one pass: -> [layers, batch, classes]
        (and, with return_hidden, the hidden states [layers + 1, batch, seq, hidden])."""
        hidden = self.embed(input_ids, token_type_ids)
        mask = self.prepare_mask(attention_mask, hidden)
        logits, states = [], [hidden]
        for i in range(self.num_layers):
            hidden = self.run_layer(i, hidden, mask)
            states.append(hidden)
            logits.append(self.exit_logits(i, hidden, attention_mask))
        out = torch.stack(logits)
        return (out, torch.stack(states)) if return_hidden else out

    def pooled_states(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """What each off-ramp reads before its trainable part: [layers - 1, batch, hidden]. Stage 2 caches
        this once, since the backbone is frozen."""
        hidden = self.embed(input_ids, token_type_ids)
        mask = self.prepare_mask(attention_mask, hidden)
        pooled = []
        for i in range(self.num_layers - 1):
            hidden = self.run_layer(i, hidden, mask)
            pooled.append(self.ramps[i].pool(hidden, attention_mask))
        return torch.stack(pooled)

    def final_logits(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """The plain classifier's logits (what stage 1 trains): [batch, classes]."""
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None and self.takes_token_type_ids else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits

    @classmethod
    def from_backbone(
        cls, name_or_path: str, label_names: list[str], ramp_cfg: RampConfig | None = None,
        task: str = "classification",
    ) -> "HighwayModel":
        """A fresh highway model over a pretrained backbone (hub name or local folder), with a new head
        for ``label_names`` (regression: one output, ``problem_type="regression"``) and off-ramps whose
        poolers copy the pretrained pooler where there is one."""
        from transformers import AutoModelForSequenceClassification

        kw = {"problem_type": "regression"} if task == "regression" else {}
        model = load_hf(
            AutoModelForSequenceClassification,
            name_or_path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a saved classifier head of another size is replaced by a fresh one
            **kw,
        )
        adapter_for(model)  # fail early on an unsupported family
        return cls(model, ramp_cfg)


def _hidden_dropout(cfg) -> float:
    for name in ("hidden_dropout_prob", "dropout", "seq_classif_dropout"):
        v = getattr(cfg, name, None)
        if isinstance(v, float):
            return v
    return 0.1


def load_hf(loader, name_or_path: str, **kw):
    """``loader.from_pretrained`` with safetensors only and one clear error when the model can't be had:
    a local folder's file that cannot be read is named; a hub name fails at once, with advice that fits,
    when the hub is off (HF_HUB_OFFLINE set) or cannot be reached (a copy in the cache still loads then)."""
    import os

    from safetensors import SafetensorError

    local, unreachable = os.path.isdir(name_or_path), None
    if local:
        _check_folder_readable(name_or_path)
    elif not _hub_offline():
        unreachable = hub_unreachable()
        if unreachable:  # no minute of retries: the cache or nothing
            kw = {**kw, "local_files_only": True}
    try:
        return loader.from_pretrained(name_or_path, use_safetensors=True, **kw) if _is_model(loader) else loader.from_pretrained(name_or_path, **kw)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a damaged weights file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(_load_failure(name_or_path, local, unreachable, first)) from None


def _load_failure(name: str, local: bool, unreachable: str | None, first: str) -> str:
    if local:
        return f"cannot load '{name}' (local folder): {first}"
    if unreachable:
        return (f"cannot load '{name}': it is neither a local folder nor reachable on the Hugging Face Hub "
                f"({unreachable}), and no copy is in the cache; check the name and the network")
    if _hub_offline():
        return (f"cannot load '{name}': it is no local folder, and HF_HUB_OFFLINE is set (offline mode: the Hugging "
                f"Face Hub is not asked and no copy is in the cache); give a local folder, or unset HF_HUB_OFFLINE")
    return f"cannot load '{name}' (no such local folder; as a Hugging Face Hub name): {first}"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub (``HF_ENDPOINT``) cannot be reached, in a few seconds at most; None when
    it can (a TCP connection to it opens), or when a proxy is set (the way there is then the proxy's)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host} cannot be reached: {e.strerror or e}"
    return None


def _check_folder_readable(folder: str) -> None:
    """The model's files in ``folder`` (weights, configs, tokenizer) can be read: libraries report a file
    they may not read as missing."""
    from pathlib import Path

    from ..files import check_readable

    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json", ".model") or f.name in ("vocab.txt", "merges.txt")):
            check_readable(f, "model file", f"check its permissions (the folder '{folder}' is loaded whole)")


def _is_model(loader) -> bool:
    return "Model" in getattr(loader, "__name__", "")
