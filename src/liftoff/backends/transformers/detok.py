"""Text out of token ids: streaming deltas that never split a multi-byte character, and vocabulary lookups.

The prefix-offset method of vLLM and TGI: each stream keeps its token ids, a ``prefix`` offset and a ``read``
offset. A step decodes ``ids[prefix:read]`` (text already sent, with some context) and ``ids[prefix:]``; the
difference is the new text. When the new text ends in U+FFFD the last token is an incomplete character (a byte
of it): the text waits for the tokens that complete it. Decoding a few tokens of context (the end of the prompt
at first) keeps tokenizers that drop a leading space at the start of a decode (SentencePiece) right.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from liftoff.core.errors import InvalidRequestError

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5


class TextStream:
    """The decoding state of one sequence."""

    __slots__ = ("ids", "prefix", "read")

    def __init__(self, prompt: list[int]) -> None:
        self.ids = prompt[-CONTEXT_TOKENS:]
        self.prefix = 0
        self.read = len(self.ids)


class Detokenizer:
    """Turns each stream's new tokens into text; special tokens never appear in it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.decode: Callable[[list[int]], str]
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            # The Rust tokenizer directly: about 1 us per call instead of 8 through the Python wrapper.
            def decode(ids: list[int]) -> str:
                text: str = backend.decode(ids, skip_special_tokens=True)
                return text

            self.decode = decode
        else:

            def decode_slow(ids: list[int]) -> str:
                text = tokenizer.decode(ids, skip_special_tokens=True)
                return text if isinstance(text, str) else "".join(text)

            self.decode = decode_slow

    def next(self, stream: TextStream, *, final: bool = False) -> str:
        """The text the tokens appended to ``stream.ids`` since the last call complete (all of it when ``final``)."""
        ids = stream.ids
        if stream.read >= len(ids) and not final:
            return ""
        before = self.decode(ids[stream.prefix : stream.read])
        text = self.decode(ids[stream.prefix :])
        if len(text) <= len(before) or (text.endswith(REPLACEMENT) and not final):
            return ""
        stream.prefix = stream.read
        stream.read = len(ids)
        return text[len(before) :]


def token_ids(tokenizer: PreTrainedTokenizerBase, tokens: list[int] | list[str]) -> list[int]:
    """Vocabulary ids of ``tokens`` (ids, checked, or vocabulary strings such as ``Ġworld``)."""
    size = len(tokenizer)
    if all(isinstance(token, int) for token in tokens):
        ids = [int(token) for token in tokens]
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary (0..{size - 1})", param="tokens")
        return ids
    if not all(isinstance(token, str) for token in tokens):
        raise InvalidRequestError("pass token ids or token strings, not a mix of both", param="tokens")
    strings = [str(token) for token in tokens]
    found = tokenizer.convert_tokens_to_ids(strings)
    ids = found if isinstance(found, list) else [found]
    unk = tokenizer.unk_token_id
    unknown = [s for s, i in zip(strings, ids, strict=True) if i is None or (i == unk and s != tokenizer.unk_token)]
    if unknown:
        raise InvalidRequestError(f"tokens {unknown[:5]!r} are not in the vocabulary", param="tokens")
    return [int(i) for i in ids]
