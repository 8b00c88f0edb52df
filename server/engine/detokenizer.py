"""Incremental detokenisation: the text each new token adds, in O(1) per token.

Backed by ``tokenizers``' ``DecodeStream`` (it keeps the few tokens a piece depends on and
returns nothing while a UTF-8 character is incomplete), so the pieces concatenate to
``decode(generated, skip_special_tokens=True)``. Special tokens are not fed to it: their
text is the token's own string, reported on the token but not part of the completion.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


class SpecialTokens:
    """The tokenizer's special ids as a set, with each one's text decoded once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.text = {token_id: tokenizer.decode([token_id]) for token_id in tokenizer.all_special_ids}

    def __contains__(self, token_id: int) -> bool:
        return token_id in self.text


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        """The text ``token_id`` completes ("" while a multi-byte character is still partial)."""
        return self._stream.step(self._backend, token_id) or ""
