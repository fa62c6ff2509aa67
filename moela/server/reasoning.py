"""`--reasoning-parser deepseek_r1`: split `<think>...</think>` off a completion into `reasoning_content`.

    split = ReasoningSplitter()
    for piece in pieces:                       # streamed deltas, or one piece holding the whole text
        reasoning, content = split.feed(piece)
    reasoning, content = split.feed("", final=True)

As with DeepSeek-R1 (whose template already opens `<think>`), everything before `</think>` is
reasoning, with a leading `<think>` dropped; a completion that never closes it is all reasoning.
The same state machine serves streamed and whole responses, so both split identically: a tag cut
across two deltas is held back until it is known whether it is a tag.
"""

from collections.abc import Callable

START, END = "<think>", "</think>"


class ReasoningSplitter:
    def __init__(self):
        self.buffer = ""
        self.thinking = True
        self.at_start = True  # a leading <think> may still come

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning delta, content delta) for the next piece of the completion."""
        self.buffer += text
        if not self.thinking:
            content, self.buffer = self.buffer, ""
            return "", content
        if self.at_start:
            if START.startswith(self.buffer) and self.buffer != START and not final:
                return "", ""  # could still be the opening tag
            if self.buffer.startswith(START):
                self.buffer = self.buffer[len(START):]
            self.at_start = False
        end = self.buffer.find(END)
        if end >= 0:
            reasoning, content = self.buffer[:end], self.buffer[end + len(END):]
            self.buffer, self.thinking = "", False
            return reasoning, content
        keep = 0 if final else _partial_suffix(self.buffer, END)
        reasoning, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return reasoning, ""


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def think_rules(token: Callable[[str], str]) -> list[str]:
    """Lark rules of a grammar's `think` part: any text, then </think> (`token` writes the tag: its special
    token, which text cannot contain, or a literal, which the text then ends at the first time it appears)."""
    end = token(END)
    return [f"think{'' if end.startswith('<[') else '[lazy]'}: THINK_TEXT {end}", r"THINK_TEXT: /(.|\n)*/"]
