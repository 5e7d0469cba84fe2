"""Tool calls in a model's text: what a parser declares, and the one scanner that applies it to a
whole text or to a stream of text deltas.

A parser only says where calls are (the markers that open a call region, the marker that closes one,
or a character that opens a region when the output starts with it) and how to read one region's
body into calls. ``ToolCallStream`` does the scanning for every parser, so the streamed and the
non-streamed parse are one code path: a whole text is one delta with ``final=True``.

What the stream promises (what OpenAI clients assume): content deltas are never taken back, and a
tool call is sent once, whole, when its region closes (or the output ends), so a malformed call can
still become plain content, exactly as the non-streamed parse leaves it. Text that may be the
beginning of an opening marker is held back until it is known not to be one."""
from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field

_ALNUM = string.ascii_letters + string.digits


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON text (an object), as OpenAI sends it
    id: str

    def as_dict(self) -> dict:
        """OpenAI's ``tool_calls`` item."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolDelta:
    """What a piece of text turned into: content to send, and calls completed in it."""

    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)  # calls that start here (sent whole, but see below)
    arguments: str = ""  # more arguments of the last call already started (a named function's stream)


@dataclass(frozen=True)
class StrictFormat:
    """How a parser's calls are written, for strict tools under "auto" (``tools.strict``)."""

    trigger: str  # where a call region begins: text before it is free
    begin: str  # a call's text before its arguments, with "{name}" for the JSON-escaped name
    end: str  # a call's text after its arguments


class ToolParser:
    """A model family's tool-call format. Subclasses set the markers and implement ``decode``."""

    name = ""
    starts: tuple[str, ...] = ()  # markers that open a call region
    end: str | None = None  # the marker that closes a region; None: it runs to the next start or the end
    bare_start: str | None = None  # an output whose first non-blank character is this opens a region
    strict_format: StrictFormat | None = None  # how a call is written, for strict tools under "auto"

    def decode(self, body: str) -> list[tuple[str, str]] | None:
        """(name, arguments JSON) of each call in one region's body; None if it is not well formed.
        For a bare region the body starts with ``bare_start`` itself."""
        raise NotImplementedError

    def new_id(self) -> str:
        return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def _held_prefix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of a marker."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


def _first_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str]:
    """(position, marker) of the earliest marker in ``text``; (-1, "") if none."""
    best, found = -1, ""
    for marker in markers:
        i = text.find(marker)
        if i >= 0 and (best < 0 or i < best):
            best, found = i, marker
    return best, found


class ToolCallStream:
    """One choice's scanner. ``feed`` takes each new piece of the text in order (``final`` with the
    last one) and returns the content and the calls that can be sent now.

    Blanks between content and a call, or between calls, are layout and are dropped (an output of
    calls alone has content None, OpenAI's shape, not a stray newline); blanks are therefore held
    until what follows them is known."""

    def __init__(self, parser: ToolParser, parallel: bool = True) -> None:
        self.parser = parser
        self.parallel = parallel  # False: only the first call is kept (parallel_tool_calls: false)
        self.buf = ""  # text received and not yet decided
        self.region: str | None = None  # the marker that opened the region we are in ("" for a bare one)
        self.at_start = True  # nothing but blanks has been seen
        self.blank = ""  # blank content held until we know whether a call follows it
        self.after_call = False  # the last thing decided was a call: blanks after it are dropped
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool = False) -> ToolDelta:
        self.buf += text
        out = ToolDelta()
        while self._step(out, final):
            pass
        if final:
            self._finish(out)
        return out

    # --- one decision at a time: True while there is more to decide ------------------------------
    def _step(self, out: ToolDelta, final: bool) -> bool:
        if self.region is not None:
            return self._in_region(out, final)
        if self.at_start and self.buf.strip() == "":
            return False  # blanks only so far: they become content once we know what follows
        if self.at_start:
            self.at_start = False
            bare = self.parser.bare_start
            stripped = self.buf.lstrip()
            if bare is not None and stripped.startswith(bare):
                self._content(out, self.buf[:len(self.buf) - len(stripped)])
                self.buf, self.region = stripped, ""
                return True
        i, marker = _first_marker(self.buf, self.parser.starts)
        if i >= 0:
            self._content(out, self.buf[:i])
            self.buf, self.region = self.buf[i + len(marker):], marker
            return True
        keep = 0 if final else _held_prefix(self.buf, self.parser.starts)
        self._content(out, self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return False

    def _in_region(self, out: ToolDelta, final: bool) -> bool:
        end = self.parser.end
        if end is not None:
            j, closing = self.buf.find(end), end
        else:
            j, closing = _first_marker(self.buf, self.parser.starts)
            closing = ""  # the next region's marker is not consumed here
        if j < 0:
            if final:
                self._region_done(out, self.buf, "")
                self.buf = ""
            return False
        body, rest = self.buf[:j], self.buf[j + len(closing):]
        self._region_done(out, body, closing)
        self.buf = rest
        if end is None:  # rest starts with the next region's marker
            i, marker = _first_marker(rest, self.parser.starts)
            self.buf, self.region = rest[i + len(marker):], marker
        return True

    def _region_done(self, out: ToolDelta, body: str, closing: str) -> None:
        opened, self.region = self.region or "", None
        decoded = self.parser.decode(body)
        if decoded is None:  # not a call after all: the text stays content, markers and all
            self._content(out, opened + body + closing)
            return
        for name, arguments in decoded:
            if self.parallel or not self.calls:
                call = ToolCall(name, arguments, self.parser.new_id())
                self.calls.append(call)
                out.calls.append(call)
        self.blank, self.after_call = "", True

    def _content(self, out: ToolDelta, text: str) -> None:
        """Blanks next to a call are layout, not content: they are held until what follows shows it."""
        core = text.strip()
        if not core:
            self.blank += text
            return
        lead, trail = text[:text.index(core)], text[text.index(core) + len(core):]
        if not self.after_call:
            out.content += self.blank + lead
        out.content += core
        self.blank, self.after_call = trail, False

    def _finish(self, out: ToolDelta) -> None:
        if self.buf:  # blanks at the very start, or a held marker prefix
            rest, self.buf = self.buf, ""
            self._content(out, rest)
        if not self.calls:
            out.content += self.blank  # no call: trailing blanks are the content's own
        self.blank = ""


def parse_tool_calls(parser: ToolParser, text: str, parallel: bool = True) -> tuple[str | None, list[ToolCall]]:
    """The whole output at once: (content, calls); content is None when the output is only calls."""
    stream = ToolCallStream(parser, parallel)
    delta = stream.feed(text, final=True)
    content = delta.content if delta.content or not delta.calls else None
    return content, delta.calls
