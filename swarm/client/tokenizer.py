"""Text <-> token ids with the tokenizer embedded in the KNOT file (tokenizer.json, HF `tokenizers`)."""

from __future__ import annotations

from swarm.errors import SwarmError


class Tokenizer:
    def __init__(self, tokenizer_json: bytes | None, model_name: str):
        self.model_name = model_name
        self._tok = None
        if tokenizer_json:
            from tokenizers import Tokenizer as HFTokenizer
            try:
                self._tok = HFTokenizer.from_str(tokenizer_json.decode("utf-8"))
            except Exception as e:  # tokenizers raises plain Exception subclasses
                raise SwarmError(f"model {model_name!r}: embedded tokenizer.json is invalid: {e}") from None

    @property
    def available(self) -> bool:
        return self._tok is not None

    def encode(self, text: str) -> list[int]:
        if self._tok is None:
            raise SwarmError(f"model {self.model_name!r} has no tokenizer: pass token ids "
                             "(--prompt-ids 1,2,3) instead of text")
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self._tok is None:
            return " ".join(str(i) for i in ids)
        return self._tok.decode(ids)

