"""Token ids to text, one step at a time, without breaking multi-byte characters.

GPT-2's byte-level BPE can split one UTF-8 character across tokens: decoding a prefix then
ends in U+FFFD. The detokenizer holds such a tail back until the character is complete, and
holds back the last few characters while they could still be the start of a stop string, so
a stream never sends text that the final result does not contain.
"""
from __future__ import annotations

from typing import Sequence


class Detokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.pending: list[int] = []  # ids after the last complete character
        self.text = ""  # everything decoded so far (complete characters only)
        self.sent = 0  # characters of `text` already handed out
        self.stopped_at: int | None = None  # where a stop string cut the text

    def push(self, token: int, check_stop: bool = True) -> bool:
        """Add a generated token; True when a stop string has appeared (the text is cut before it).

        check_stop=False (min_tokens not reached yet) grows the text without looking, so a stop
        string that ends at or after the min_tokens-th token is still found later, as in vLLM."""
        if self.stopped_at is not None:
            return True
        self.pending.append(token)
        # Byte-level BPE decodes by concatenating bytes, so once a piece ends on a character
        # boundary the text so far never changes: decode only what came after it.
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd"):
            return False  # an incomplete character: wait for the rest of its bytes
        self.pending = []
        start = max(0, len(self.text) - self.holdback)
        text = self.text = self.text + piece
        if self.stop and check_stop:
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped_at = min(hits)
                self.text = text[:self.stopped_at]
                return True
        return False

    def flush(self) -> None:
        """The generation ended: bytes of an unfinished character become U+FFFD, as decode() gives them."""
        if self.pending and self.stopped_at is None:
            self.text += self.tokenizer.decode(self.pending)
            self.pending = []

    def delta(self, final: bool = False) -> str:
        """Text not handed out yet; while not `final`, minus what could begin a stop string."""
        end = len(self.text) if final or self.stopped_at is not None else max(self.sent, len(self.text) - self.holdback)
        out = self.text[self.sent:end]
        self.sent = end
        return out
