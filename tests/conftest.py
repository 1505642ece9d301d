"""Tiny deterministic models and data for fast component tests (no network)."""
from __future__ import annotations

import json
import random

import os

import pytest

# tiny models gain nothing from threads, and oversubscribed OpenMP threads crawl on a busy 2-core box
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DEEBERT_NO_PROGRESS", "1")
# tests never touch the network: hub names must fail fast and clearly
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)

WORDS = (
    "good great fine superb lovely brilliant moving fun charming smart "
    "bad awful dull boring poor weak messy tedious bland lame "
    "the a film movie plot story acting cast it is was very not quite so and but"
).split()
POSITIVE, NEGATIVE = WORDS[:10], WORDS[10:20]


def write_vocab(path) -> str:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path.write_text("\n".join(specials + WORDS) + "\n")
    return str(path)


# families with a tiny config below; "deberta-v2-conv" and "modernbert-cls" are variants of their family
FAMILIES = ["bert", "roberta", "xlm-roberta", "camembert", "data2vec-text", "distilbert", "electra",
            "deberta-v2", "deberta-v2-conv", "modernbert", "modernbert-cls", "albert", "mpnet"]
ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert", "data2vec-text", "mpnet")  # <s>=0 <pad>=1 </s>=2


def pad_id(family: str) -> int:
    return 1 if family in ROBERTA_LIKE else 0


def tiny_config(family: str, num_labels: int = 2, layers: int = 4, vocab_size: int = 64):
    """A tiny random config of ``family`` (hidden 32), close to the family's released models in every
    switch that changes the layer-by-layer code path."""
    from transformers import AutoConfig

    common = dict(num_labels=num_labels, vocab_size=vocab_size)
    if family == "distilbert":
        return AutoConfig.for_model("distilbert", dim=32, n_layers=layers, n_heads=4, hidden_dim=64,
                                    max_position_embeddings=128, **common)
    kw = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=130, type_vocab_size=2, **common)
    if family == "electra":
        kw["embedding_size"] = 16  # exercises embeddings_project
    if family in ROBERTA_LIKE:
        kw.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if family == "deberta-v2":  # DeBERTa-v3-base's switches: bucketed, shared-key, layer-normed relative attention
        kw.update(relative_attention=True, position_buckets=16, max_relative_positions=-1, norm_rel_ebd="layer_norm",
                  share_att_key=True, pos_att_type="p2c|c2p", position_biased_input=False, type_vocab_size=0)
    if family == "deberta-v2-conv":  # DeBERTa-v2-xlarge's: absolute positions too, separate position keys, conv
        family = "deberta-v2"
        kw.update(relative_attention=True, max_relative_positions=-1, pos_att_type="p2c|c2p",
                  position_biased_input=True, conv_kernel_size=3, conv_act="gelu", type_vocab_size=0)
    if family.startswith("modernbert"):  # layer 1 and 4 global, 2 and 3 a 4-token sliding window
        pooling = "cls" if family == "modernbert-cls" else "mean"
        family = "modernbert"
        kw = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                  global_attn_every_n_layers=3, local_attention=4, classifier_pooling=pooling,
                  pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3, **common)
    if family == "albert":  # factorised embeddings; 2 weight groups shared over the layer positions
        kw.update(embedding_size=16, num_hidden_groups=2, inner_group_num=1)
    return AutoConfig.for_model(family, **kw)


def tiny_classifier(family: str, num_labels: int = 2, layers: int = 4, seed: int = 0, attn: str | None = None):
    """``attn``: an attention implementation (eager, sdpa) instead of transformers' default."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    kw = {} if attn is None else {"attn_implementation": attn}
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels, layers), **kw)
    return model.eval()


def make_tiny_backbone(tmp_path, layers: int = 4, seed: int = 0, name: str = "tiny-bert") -> str:
    """A saved tiny BERT (with pooler) + WordPiece tokenizer, usable as --model."""
    import torch
    from transformers import BertForSequenceClassification, BertTokenizer

    out = tmp_path / name
    out.mkdir()
    vocab = write_vocab(tmp_path / f"{name}-vocab.txt")
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = tiny_config("bert", 2, layers, vocab_size=len(tok))
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _unigram(specials: list) -> list:
    """A SentencePiece-style Unigram vocabulary: specials, '▁word' pieces, then single letters."""
    return ([(t, 0.0) for t in specials] + [("\u2581" + w, -2.0) for w in WORDS] + [("\u2581", -3.0)]
            + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"])


def family_tokenizer(family: str):
    """A tiny tokenizer of the family's own class where transformers has one (built from an in-code vocab,
    special tokens at the ids the family's config expects); BERT's WordPiece for the rest."""
    from transformers import AlbertTokenizer, BertTokenizer, CamembertTokenizer, DebertaV2Tokenizer, MPNetTokenizer

    if family.startswith("deberta-v2"):  # SentencePiece Unigram, as DeBERTa-v3's spm.model
        return DebertaV2Tokenizer(vocab=_unigram(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]))
    if family == "albert":
        return AlbertTokenizer(vocab=_unigram(["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]))
    if family == "camembert":
        return CamembertTokenizer(vocab=_unigram(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    if family == "mpnet":  # WordPiece with RoBERTa's special tokens
        return MPNetTokenizer(vocab={t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "[UNK]", "<mask>"] + WORDS)})
    if family in ROBERTA_LIKE:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        names = dict(cls_token="<s>", pad_token="<pad>", sep_token="</s>", unk_token="<unk>", mask_token="<mask>")
    else:
        specials, names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], {}
    return BertTokenizer(vocab={t: i for i, t in enumerate(specials + WORDS)}, do_lower_case=True, **names)


def make_family_backbone(tmp_path, family: str, layers: int = 4, seed: int = 0) -> str:
    """A saved tiny random classifier of ``family`` + its tiny tokenizer, usable as --model."""
    import torch
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / f"tiny-{family}"
    out.mkdir()
    tok = family_tokenizer(family)
    assert tok.pad_token_id == pad_id(family)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, 2, layers, vocab_size=len(tok)))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def make_sentiment_rows(n: int, seed: int = 0, with_score: bool = True) -> list[dict]:
    """Synthetic sentiment rows: label follows the majority of polar words; some rows are easy
    (many polar words), some hard (mixed), so exits really fire at different layers."""
    rng = random.Random(seed)
    filler = WORDS[20:]
    rows = []
    for i in range(n):
        label = i % 2
        k = rng.randint(1, 6)
        own = POSITIVE if label else NEGATIVE
        other = NEGATIVE if label else POSITIVE
        words = [rng.choice(own) for _ in range(k)] + [rng.choice(other) for _ in range(rng.randint(0, k - 1))]
        words += [rng.choice(filler) for _ in range(rng.randint(1, 12))]
        rng.shuffle(words)
        row = {"text": " ".join(words), "label": "positive" if label else "negative"}
        if with_score:
            row["score"] = round((1 if label else -1) * (0.5 + k / 2), 3)
        rows.append(row)
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    return make_tiny_backbone(tmp_path_factory.mktemp("backbone"))


def make_data_dir(tmp_path, n_train: int = 200, n_val: int = 60, name: str = "data") -> str:
    d = tmp_path / name
    d.mkdir()
    write_jsonl(d / "train.jsonl", make_sentiment_rows(n_train, 0))
    write_jsonl(d / "validation.jsonl", make_sentiment_rows(n_val, 1))
    write_jsonl(d / "test.jsonl", make_sentiment_rows(n_val, 2))
    return str(d)


def train_tiny_checkpoint(tmp_path, exits: bool = True, name: str = "ckpt", **ft) -> str:
    """Stage 1 (+ stage 2) on synthetic sentiment data with a tiny BERT: a few seconds."""
    from deebert_cli.core.config import FinetuneConfig, TrainExitsConfig
    from deebert_cli.core.train.stage1 import finetune
    from deebert_cli.core.train.stage2 import train_exits

    backbone = make_tiny_backbone(tmp_path, name=f"{name}-backbone")
    data = make_data_dir(tmp_path, name=f"{name}-data")
    out = str(tmp_path / name)
    # the stage-1 recipe these fixtures were tuned with (no warmup, random batches): tests downstream rely
    # on exits firing at several layers of this tiny model
    kw = dict(model=backbone, dataset=data, output=out, epochs=8, lr=3e-3, batch_size=16, device="cpu",
              warmup_ratio=0.0, group_by_length=False)
    kw.update(ft)
    finetune(FinetuneConfig(**kw))
    if exits:
        # the plain DeeBERT recipe: the fixtures test exits, not the recipe search (tests/test_recipes.py)
        train_exits(TrainExitsConfig(checkpoint=out, epochs=10, lr=3e-3, device="cpu", ramp_pooling="cls"))
    return out


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory) -> str:
    """A tiny checkpoint with trained off-ramps (shared, read-only by convention)."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("trained"))


def export_copy(src: str, tmp_path_factory, name: str, quantize: str | None = "int8") -> str:
    """A copy of checkpoint ``src`` with its ONNX export in ``copy/onnx`` (skips without the onnx extra)."""
    import shutil

    pytest.importorskip("onnxruntime", reason="the onnx runtime needs pip install 'deebert-cli[onnx]'")
    pytest.importorskip("onnx", reason="deebert export needs pip install 'deebert-cli[onnx]'")
    from deebert_cli.core.config import ExportConfig
    from deebert_cli.core.runtime.export import export_checkpoint

    dst = tmp_path_factory.mktemp(name) / "ckpt"
    shutil.copytree(src, dst)
    export_checkpoint(ExportConfig(checkpoint=str(dst), quantize=quantize))
    return str(dst)


@pytest.fixture(scope="session")
def exported_ckpt(trained_ckpt, tmp_path_factory) -> str:
    """``trained_ckpt`` copied, with fp32 and int8 ONNX graphs in ``onnx/``."""
    return export_copy(trained_ckpt, tmp_path_factory, "exported")


RUNTIMES = ("torch", "onnx")


def load_runtime(runtime: str, request, torch_fixture: str = "trained_ckpt", onnx_fixture: str = "exported_ckpt"):
    """The checkpoint of ``torch_fixture`` on the torch runtime, or its export (``onnx_fixture``) on onnx."""
    from deebert_cli.core.runtime.stream import load_for_inference

    if runtime == "torch":
        return load_for_inference(request.getfixturevalue(torch_fixture), "torch")
    return load_for_inference(request.getfixturevalue(onnx_fixture), "onnx")


@pytest.fixture(scope="session")
def stage1_ckpt(tmp_path_factory) -> str:
    return train_tiny_checkpoint(tmp_path_factory.mktemp("stage1"), exits=False)


def mixed_lines(n: int, seed: int = 5) -> list:
    """Inputs of very different lengths for batching tests."""
    rng = random.Random(seed)
    rows = make_sentiment_rows(n, seed, with_score=False)
    out = []
    for r in rows:
        words = r["text"].split()
        reps = rng.choice([1, 1, 2, 4])
        out.append(" ".join(words * reps))
    return out


# ------------------------------------------------------------------------------------------------
# CLI checks shared by the tests of bad inputs
# ------------------------------------------------------------------------------------------------
def invoke(*args, **kw):
    """`deebert ARGS` in-process (every argument as text)."""
    from typer.testing import CliRunner

    from deebert_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def one_line_error(r, *needles, alone: bool = True):
    """Exit 2, no traceback, and one ``error:`` line holding ``needles``; ``alone``: nothing else was
    printed (no work was done), else the error line comes last after the command's own progress."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    if alone:
        assert len(lines) == 1, r.output
    assert lines[-1].startswith("error:") and sum(l.startswith("error:") for l in lines) == 1, r.output
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


def interrupt_after_first_save(monkeypatch, args) -> None:
    """Run `deebert ARGS` (a finetune with --save-every) and stop it like Ctrl-C right after it first
    saves its resumable state."""
    import deebert_cli.core.train.stage1 as stage1

    real = stage1.save_state

    def save_then_stop(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(stage1, "save_state", save_then_stop)
        assert invoke(*args).exit_code == 130
