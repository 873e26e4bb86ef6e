"""Token ids to text, one id at a time, as a reply streams: TextStream.

A piece is handed out once it is final: once the ids decoded so far do not end inside a
multi-byte character (a byte-level BPE token can hold part of one; the decoder writes U+FFFD
for it until the rest arrives) nor in a run of byte-fallback tokens. Each piece is the
difference between decoding a short window of ids and decoding the window without the new ones,
so that a SentencePiece "▁" gives its space only where the whole text has it. The pieces join
to the text decoded at once.

A text that continues another (a plain prompt's) is decoded after the other's last ids
(decode_after): a SentencePiece decoder drops the first space of a text.
"""

import re

from minituner.tokenizer import Tokenizer

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte of SentencePiece's byte fallback, as the vocabulary names it


class TextStream:
    """The text of token ids given one at a time, handed out in pieces as soon as they are final
    (see the module docstring); with stop strings, held back while a stop string may still be
    completing and cut before the first one. `context`: ids the text follows (decode_after)."""

    def __init__(self, tokenizer: Tokenizer, stop_strings=(), context=()):
        self.tokenizer, self.stop_strings = tokenizer, tuple(stop_strings)
        self.hold = max(map(len, self.stop_strings), default=1) - 1  # characters a stop string may still claim
        self.ids: list[int] = list(context)
        self.start, self.read = 0, len(self.ids)  # ids[start:read] decode up to the final text's end; ids[read:] wait
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token_id: int) -> str:
        """Add the next id; the text that became final with it ("" if none)."""
        self.ids.append(token_id)
        settled, window = self._window()
        # not inside a character, and not after a byte token (SentencePiece's byte fallback, <0xE6>): the
        # decoder writes a run of them as text only once the run is whole, and as U+FFFD per byte if it never is
        if (len(window) > len(settled) and not window.endswith("\ufffd")
                and not BYTE_TOKEN.fullmatch(self.tokenizer.id_to_token(token_id) or "")):
            self._settle(settled, window)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text, once no more ids come."""
        self._settle(*self._window())
        return self._release(final=True)

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(self.ids[self.start:self.read]), decode(self.ids[self.start:])

    def _settle(self, settled: str, window: str) -> None:
        self.text += window[len(settled):]
        self.start, self.read = self.read, len(self.ids)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        found = [i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0]
        end = min(found) if found else len(self.text) if final else len(self.text) - self.hold
        self.stopped = bool(found)
        piece = self.text[self.sent:max(self.sent, end)]
        self.sent += len(piece)
        return piece


def decode_after(tokenizer: Tokenizer, context: list[int], ids: list[int]) -> str:
    """The text of `ids` where they follow `context`: a SentencePiece decoder drops the space of a
    text's first word ("▁time" alone is "time"), which after "Once upon a" is the one between them."""
    return tokenizer.decode(list(context) + list(ids))[len(tokenizer.decode(list(context))):]
