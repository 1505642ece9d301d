"""Off-ramp parameters next to the plain classifier, for base-size configs of every supported family.

    .venv/bin/python benchmarks/param_counts.py

Builds each model on the meta device (no weights, no download) from the shapes of the released
checkpoint named in the first column, with 2 classes, and prints a markdown table.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from deebert_cli.core.model.highway import HighwayModel

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
CONFIGS = {  # name: (model_type, shapes of the released config)
    "bert-base-uncased": ("bert", dict(BASE, vocab_size=30522)),
    "roberta-base": ("roberta", dict(BASE, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)),
    "microsoft/deberta-v3-base": ("deberta-v2", dict(
        BASE, vocab_size=128100, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type="p2c|c2p", position_biased_input=False, type_vocab_size=0)),
    "answerdotai/ModernBERT-base": ("modernbert", dict(
        hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152, vocab_size=50368)),
    "microsoft/mpnet-base": ("mpnet", dict(BASE, vocab_size=30527, max_position_embeddings=514)),
    "albert-base-v2": ("albert", dict(BASE, vocab_size=30000, embedding_size=128)),
    "albert-large-v2": ("albert", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                       intermediate_size=4096, vocab_size=30000, embedding_size=128)),
}


def main() -> None:
    print("| backbone | exits | plain classifier | off-ramps | overhead |")
    print("|---|---|---|---|---|")
    for name, (model_type, shapes) in CONFIGS.items():
        cfg = AutoConfig.for_model(model_type, num_labels=2, **shapes)
        with torch.device("meta"):
            hw = HighwayModel(AutoModelForSequenceClassification.from_config(cfg), init_from_pooler=False)
        c = hw.parameter_counts()
        print(f"| {name} | {hw.num_layers} | {c.backbone / 1e6:.1f}M | {c.ramps / 1e6:.2f}M | +{100 * c.overhead:.1f}% |")


if __name__ == "__main__":
    main()
