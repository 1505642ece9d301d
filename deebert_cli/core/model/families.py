"""Family adapters: the pieces of one transformers family (embeddings, layers, mask preparation, its own
classification head) that a layer-by-layer forward needs, one small class per supported family."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


class FamilyAdapter:
    """Exposes the pieces of one transformers family that a layer-by-layer forward needs.

    Every piece is traceable: per-forward extras (relative positions, rotary cos/sin, attention masks)
    are computed in ``prepare_mask`` from the 2-D mask and the hidden states' shape only."""

    family = "?"
    base_attr = "?"  # attribute of the *ForSequenceClassification model holding the base model

    def __init__(self, model: nn.Module):
        self.model = model
        self.base = getattr(model, self.base_attr)

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.encoder.layer

    @property
    def num_layers(self) -> int:
        """Layer positions, each with an exit (ALBERT: more positions than distinct weight sets)."""
        return len(self.layers)

    @property
    def ramp_pooling(self) -> str:
        """What the off-ramps read by default: the token summary this family's own head reads."""
        return "cls"

    @property
    def takes_token_type_ids(self) -> bool:
        """Whether the model reads token type ids (has segment embeddings). Tokenizers emit them for models
        that have none (DeBERTa-v3: ``type_vocab_size`` 0; DistilBERT saved with a BERT tokenizer): the
        ``embed`` of such a model drops them, and its ONNX export takes no such input."""
        return (getattr(self.model.config, "type_vocab_size", 0) or 0) > 0

    def embed(self, input_ids, token_type_ids=None) -> torch.Tensor:
        """[batch, seq] ids -> [batch, seq, hidden] (token type ids only where the model takes them)."""
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None and self.takes_token_type_ids else {}
        return self.base.embeddings(input_ids=input_ids, **kw)

    def prepare_mask(self, attention_mask: torch.Tensor, hidden: torch.Tensor):
        """[batch, seq] 0/1 mask -> whatever this family's layers take (4D bias, bool mask or None)."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.base.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def run_layer(self, i: int, hidden: torch.Tensor, mask) -> torch.Tensor:
        """[batch, seq, hidden] -> [batch, seq, hidden] through layer i (0-based)."""
        out = self.layers[i](hidden, mask)
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The family's own classification head on the last layer: [batch, seq, hidden] -> [batch, C]."""
        return self.model.classifier(hidden)

    def pretrained_pooler(self) -> nn.Linear | None:
        """The backbone's pretrained pooler Linear(H,H), if the family has one (off-ramps start from it)."""
        return None

    def max_tokens(self) -> int | None:
        """The longest input (in tokens, special tokens included) the position embeddings cover."""
        return getattr(self.model.config, "max_position_embeddings", None)


class BertAdapter(FamilyAdapter):
    family, base_attr = "bert", "bert"

    def head(self, hidden, attention_mask):
        # BertForSequenceClassification: pooler (dense+tanh on [CLS]) -> dropout -> classifier
        return self.model.classifier(self.model.dropout(self.base.pooler(hidden)))

    def pretrained_pooler(self):
        return self.base.pooler.dense if self.base.pooler is not None else None


class RobertaAdapter(FamilyAdapter):
    family, base_attr = "roberta", "roberta"
    takes_token_type_ids = False  # positions from input_ids; segments unused

    def embed(self, input_ids, token_type_ids=None):
        # RoBERTa derives position ids from input_ids (padding_idx), so always pass input_ids
        return self.base.embeddings(input_ids=input_ids)

    def max_tokens(self):
        # positions start after padding_idx (pad_token_id + 1): 514 embeddings hold 512 tokens
        n = super().max_tokens()
        return None if n is None else n - (self.model.config.pad_token_id or 0) - 1


class XLMRobertaAdapter(RobertaAdapter):
    family = "xlm-roberta"


class CamembertAdapter(RobertaAdapter):
    family = "camembert"  # CamembertForSequenceClassification is RoBERTa's code under another name


class Data2VecTextAdapter(RobertaAdapter):
    family, base_attr = "data2vec-text", "data2vec_text"  # RoBERTa's layout and head


class ElectraAdapter(FamilyAdapter):
    family, base_attr = "electra", "electra"

    def embed(self, input_ids, token_type_ids=None):
        h = super().embed(input_ids, token_type_ids)
        if hasattr(self.base, "embeddings_project"):
            h = self.base.embeddings_project(h)
        return h


class DistilBertAdapter(FamilyAdapter):
    family, base_attr = "distilbert", "distilbert"
    takes_token_type_ids = False  # no segment embeddings

    @property
    def layers(self):
        return self.base.transformer.layer

    def embed(self, input_ids, token_type_ids=None):
        # DistilBERT has no segment embeddings: token_type_ids are ignored
        return self.base.embeddings(input_ids)

    def head(self, hidden, attention_mask):
        m = self.model
        x = torch.relu(m.pre_classifier(hidden[:, 0]))
        return m.classifier(m.dropout(x))


class DebertaV2Adapter(FamilyAdapter):
    """DeBERTa-v2 and v3 (transformers ``deberta-v2``): disentangled attention over relative positions.

    ``DebertaV2Model`` zeroes padded embeddings (``embeddings * mask``) and, in v2-xlarge style configs,
    adds a convolution beside layer 1 that reads those embeddings; layer 1 here does both, so that padding
    never reaches a real token. The final exit is ``ContextPooler`` (dense + GELU on [CLS]) -> dropout ->
    classifier."""

    family, base_attr = "deberta-v2", "deberta"

    def prepare_mask(self, attention_mask, hidden):
        enc = self.base.encoder
        return {
            "input_mask": attention_mask,  # [b, s]
            "mask": enc.get_attention_mask(attention_mask),  # [b, 1, s, s]: query and key both real
            "relative_pos": enc.get_rel_pos(hidden),  # [1, s, s] (bucketed) or None
            "rel_embeddings": enc.get_rel_embedding(),  # [2 * span, H] (layer-normed in v3) or None
        }

    def run_layer(self, i, hidden, mask):
        enc = self.base.encoder
        if i == 0:
            hidden = hidden * mask["input_mask"].unsqueeze(-1).to(hidden.dtype)
        out = self.layers[i](hidden, mask["mask"], relative_pos=mask["relative_pos"],
                             rel_embeddings=mask["rel_embeddings"])[0]
        if i == 0 and enc.conv is not None:
            out = enc.conv(hidden, out, mask["input_mask"])
        return out

    def head(self, hidden, attention_mask):
        m = self.model
        return m.classifier(m.dropout(m.pooler(hidden)))

    def pretrained_pooler(self):
        return self.model.pooler.dense


class ModernBertAdapter(FamilyAdapter):
    """ModernBERT: pre-norm layers with rotary embeddings, alternating global and sliding-window attention
    (``config.layer_types``), and a final norm, applied here as the end of the last layer (as transformers
    reports that layer's hidden state). Off-ramps read the other layers' un-normalised residual stream
    (``--ramp-norm`` adds a LayerNorm). The head pools by ``config.classifier_pooling`` (cls, or mean over
    real tokens), so the off-ramps' default pooling follows it."""

    family, base_attr = "modernbert", "model"
    takes_token_type_ids = False  # no segment embeddings

    @property
    def layers(self):
        return self.base.layers

    @property
    def ramp_pooling(self):
        return self.base.config.classifier_pooling

    def embed(self, input_ids, token_type_ids=None):
        return self.base.embeddings(input_ids=input_ids)  # no segment embeddings

    def prepare_mask(self, attention_mask, hidden):
        """-> {layer type: (attention mask, (cos, sin))}, as ``ModernBertModel.forward`` builds them."""
        from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

        cfg = self.base.config
        kw = dict(config=cfg, inputs_embeds=hidden, attention_mask=attention_mask)
        masks = {"full_attention": create_bidirectional_mask(**kw),
                 "sliding_attention": create_bidirectional_sliding_window_mask(**kw)}
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return {t: (masks[t], self.base.rotary_emb(hidden, position_ids, t)) for t in set(cfg.layer_types)}

    def run_layer(self, i, hidden, mask):
        layer = self.layers[i]
        attn_mask, rotary = mask[layer.attention_type]
        out = layer(hidden, attention_mask=attn_mask, position_embeddings=rotary)
        return self.base.final_norm(out) if i == len(self.layers) - 1 else out

    def head(self, hidden, attention_mask):
        m = self.model
        if m.config.classifier_pooling == "mean":  # as ModernBertForSequenceClassification pools
            h = (hidden * attention_mask.unsqueeze(-1)).sum(dim=1) / attention_mask.sum(dim=1, keepdim=True)
        else:
            h = hidden[:, 0]
        return m.classifier(m.drop(m.head(h)))


class AlbertAdapter(FamilyAdapter):
    """ALBERT: factorised embeddings projected to the hidden size, and ``num_hidden_groups`` weight sets
    shared over ``num_hidden_layers`` layer positions. Every position gets its own exit (and off-ramp),
    even where the layer weights are shared."""

    family, base_attr = "albert", "albert"

    @property
    def layers(self):
        return self.base.encoder.albert_layer_groups  # distinct weight sets, not positions

    @property
    def num_layers(self):
        return self.base.config.num_hidden_layers

    def embed(self, input_ids, token_type_ids=None):
        h = super().embed(input_ids, token_type_ids)
        return self.base.encoder.embedding_hidden_mapping_in(h)

    def run_layer(self, i, hidden, mask):
        cfg = self.base.config
        group = int(i / (cfg.num_hidden_layers / cfg.num_hidden_groups))  # AlbertTransformer's own rule
        return self.layers[group](hidden, mask)

    def head(self, hidden, attention_mask):
        m = self.model
        return m.classifier(m.dropout(self.base.pooler_activation(self.base.pooler(hidden[:, 0]))))

    def pretrained_pooler(self):
        return self.base.pooler


class MPNetAdapter(FamilyAdapter):
    """MPNet: RoBERTa-style embeddings (positions from the padding id) plus a relative position bias,
    shared by every layer, computed once per forward. The head is RoBERTa's (no pretrained pooler)."""

    family, base_attr = "mpnet", "mpnet"
    takes_token_type_ids = False  # no segment embeddings

    def embed(self, input_ids, token_type_ids=None):
        return self.base.embeddings(input_ids=input_ids)  # no segment embeddings

    def prepare_mask(self, attention_mask, hidden):
        return super().prepare_mask(attention_mask, hidden), self.base.encoder.compute_position_bias(hidden)

    def run_layer(self, i, hidden, mask):
        attn_mask, position_bias = mask
        return self.layers[i](hidden, attn_mask, position_bias)[0]


ADAPTERS = {a.family: a for a in (
    BertAdapter, RobertaAdapter, XLMRobertaAdapter, CamembertAdapter, Data2VecTextAdapter, ElectraAdapter,
    DistilBertAdapter, DebertaV2Adapter, ModernBertAdapter, AlbertAdapter, MPNetAdapter,
)}


def adapter_for(model: nn.Module) -> FamilyAdapter:
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise UserError(
            f"model family '{model_type}' is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](model)
