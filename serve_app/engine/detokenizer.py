"""Incremental detokenization with stop strings.

Text is released only when it is final: never half a multi-byte character
(a trailing U+FFFD means the bytes are incomplete), never the beginning of
what may turn out to be a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._tok = tokenizer
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all final text so far (stop string excluded)
        self._emitted = 0  # how much of `text` the caller has been given
        self.stopped = False

    def add_token(self, token_id: int) -> str:
        """Append a token; return the newly releasable text (maybe empty)."""
        self._ids.append(token_id)
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self._tok.decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            # Decode only from the last released chunk on; decoding the chunk itself
            # as a prefix keeps leading-space rules identical in both decodes.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        if self._stop:
            self._check_stop()
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """At the end of generation, release whatever was held back."""
        return self._release(final=True)

    def _check_stop(self) -> None:
        longest = max(len(s) for s in self._stop)
        start = max(0, self._emitted - longest)
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final and self._stop:
            end -= self._held_back()
        end = max(end, self._emitted)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that begins some stop string.

        Only prefixes that end with the text's last character can match, so each
        stop string is probed at those positions alone (not at every length: that
        was quadratic in the stop string's length, per token, per row).
        """
        text = self.text
        if not text:
            return 0
        last = text[-1]
        best = 0
        for s in self._stop:
            n = min(len(s) - 1, len(text))
            while n > best:
                n = s.rfind(last, 0, n) + 1  # longest candidate prefix s[:n] ending in `last`
                if n <= best:
                    break
                if text.endswith(s[:n]):
                    best = n
                    break
                n -= 1
        return best
