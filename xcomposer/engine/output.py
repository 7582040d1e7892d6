"""From generated ids to the text a client sees: whole characters only, stop strings cut, the
tail that could still start a stop string held back until it cannot."""
from __future__ import annotations

from typing import Sequence

from ..llm.tokenizer import IncrementalDecoder


class TextStream:
    """Incremental detokenization and stop strings of one sequence.

    `push(token)` returns (text to send now, whether a stop string ended the reply); `flush()`
    does the same for the decoder's held bytes at the end."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.text = ""
        self.sent = 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def push(self, token: int) -> tuple[str, bool]:
        self.text += self.decoder.push([token])
        return self._emit()

    def flush(self) -> tuple[str, bool]:
        self.text += self.decoder.flush()
        self.hold = 0
        return self._emit()

    def _emit(self) -> tuple[str, bool]:
        if self.stop:
            begin = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, begin) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                piece = self.text[self.sent:cut] if cut > self.sent else ""
                self.sent = len(self.text)
                return piece, True
        safe = len(self.text) - self.hold
        if safe > self.sent:
            piece, self.sent = self.text[self.sent:safe], safe
            return piece, False
        return "", False


__all__ = ["TextStream"]
