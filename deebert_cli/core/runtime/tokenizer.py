"""The checkpoint's tokenizer.json through the ``tokenizers`` library alone (no transformers): what the
onnx runtime tokenizes with. It answers the calls deebert makes of a transformers tokenizer (``tok(texts,
pairs, truncation=..., max_length=...)`` -> ``input_ids`` [+ ``token_type_ids``], ``pad_token_id``) and
gives the same ids: special tokens added, longest-first truncation, pairs, token type ids (tested against
transformers' tokenizer)."""
from __future__ import annotations

from pathlib import Path


class FastTokenizer:
    def __init__(self, path: str | Path, pad_token_id: int, token_type_ids: bool):
        from tokenizers import Tokenizer

        from ..errors import UserError
        from ..files import check_readable

        check_readable(path, "tokenizer file", "run `deebert export` again")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception for a file it cannot parse
            raise UserError(f"tokenizer file '{path}' is damaged ({str(e)[:200]}): run `deebert export` again") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        self._truncation = None  # (max_length, side) the tokenizer is set to
        self.truncation_side = "right"  # as transformers' tokenizers: "left" keeps a long text's end
        self.pad_token_id = pad_token_id
        self.with_token_type_ids = token_type_ids  # transformers returns them only for some families

    def _truncate_at(self, max_length: int | None) -> None:
        if (max_length, self.truncation_side) == self._truncation:
            return
        if max_length is None:
            self._tok.no_truncation()
        else:
            self._tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        self._truncation = (max_length, self.truncation_side)

    def __call__(self, texts: list, pairs: list | None = None, truncation: bool = False, max_length: int | None = None,
                 padding: bool = False, verbose: bool = True) -> dict:
        if padding:
            raise ValueError("FastTokenizer returns unpadded ids (the engine pads)")
        self._truncate_at(max_length if truncation else None)
        encs = self._tok.encode_batch(list(texts) if pairs is None else list(zip(texts, pairs)))
        out = {"input_ids": [e.ids for e in encs]}
        if self.with_token_type_ids:
            out["token_type_ids"] = [e.type_ids for e in encs]
        return out
