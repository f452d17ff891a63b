"""Strict, incremental HTTP/1.1 response parser for the upstream client.

`ResponseParser` is fed the bytes an upstream connection receives and calls
three methods on its handler:

- ``head_received(status, reason, headers)`` once per final (non-1xx) response;
- ``body_received(data)`` for each piece of (dechunked) body as it arrives;
- ``message_complete(keep_alive)`` when the response is complete.

Anything that is not a well-formed response raises `ResponseParseError`.
The parser is deliberately strict (RFC 9112, and the HTTP Garden findings in
``reference/security-and-resilience.md`` section 3):

- numbers are only parsed after checking they are plain ASCII digits (hex
  digits for chunk sizes): ``+5``, ``-5``, ``0x5``, ``5_0``, `` 5`` are errors,
  never handed to `int` unchecked;
- two different Content-Length values, Content-Length together with
  Transfer-Encoding, a Transfer-Encoding other than exactly ``chunked``, and
  Transfer-Encoding in an HTTP/1.0 response are errors;
- obsolete line folding, whitespace before the colon, control characters in
  names or values, and bare CR are errors;
- the status line plus headers are limited to `MAX_HEAD_SIZE` bytes and
  `MAX_HEADERS` header lines;
- chunk-size lines, chunk data terminators and trailer lines must end in
  CRLF exactly (a bare LF there is a known desync vector);
- 1xx interim responses are skipped, except 101 Switching Protocols, which is
  an error for now (the proxy does not tunnel upgrades yet);
- bytes received after the end of a response, in the same read, are an error
  ("body longer than declared"): nothing is pipelined, so a well-behaved
  server never sends them.

Bare LF line endings *are* accepted in the status line and header section,
as RFC 9112 section 2.2 permits a recipient to do; they are normalised, so
the handler never sees a CR.

The parser is written for the hot path: it works on `bytes` with `find`,
`split` and `translate`, keeps no per-line objects beyond the header tuples
it hands over, and passes body bytes through without copying when a read
falls entirely inside the body. The header section is accepted or refused
whole by the fastest check of the interpreter (`_split_headers`): on CPython
one regular expression (`_HEADER_LINE`, run in C); on PyPy, whose regular
expressions cost more than its JIT-compiled loops, one `translate` over the
section and a split per line, with header names already seen looked up in a
small cache. Only a head refused whole goes through the line-by-line checks,
which name the error.
"""

from __future__ import annotations

import platform
import re
from typing import Dict, List, Optional, Protocol, Tuple

__all__ = [
    "MAX_HEAD_SIZE",
    "MAX_HEADERS",
    "ResponseParseError",
    "ResponseParser",
    "IResponseHandler",
]

MAX_HEAD_SIZE = 64 * 1024
MAX_HEADERS = 200
MAX_INTERIM_RESPONSES = 32
MAX_CHUNK_LINE = 4096
MAX_TRAILER_SIZE = 64 * 1024

# Error messages (constants so tests and logs can rely on them).
ERR_HEAD_TOO_LARGE = "response head too large"
ERR_TOO_MANY_HEADERS = "too many response headers"
ERR_STATUS_LINE = "invalid status line"
ERR_HEADER = "invalid response header"
ERR_OBS_FOLD = "obsolete line folding in response header"
ERR_CONTENT_LENGTH = "invalid Content-Length"
ERR_CONFLICTING_LENGTH = "conflicting Content-Length values"
ERR_CL_AND_TE = "both Content-Length and Transfer-Encoding in response"
ERR_TRANSFER_ENCODING = "unsupported Transfer-Encoding"
ERR_TE_HTTP10 = "Transfer-Encoding in an HTTP/1.0 response"
ERR_SWITCHING_PROTOCOLS = "101 Switching Protocols is not supported"
ERR_TOO_MANY_INTERIM = "too many 1xx responses"
ERR_CHUNK_SIZE = "invalid chunk size"
ERR_CHUNK_LINE = "chunk line not terminated by CRLF"
ERR_CHUNK_END = "chunk data not followed by CRLF"
ERR_TRAILER = "invalid trailer"
ERR_EXTRA_DATA = "data after the end of the response (body longer than declared)"
ERR_INCOMPLETE = "connection closed before the response was complete"

# tchar (RFC 9110 5.6.2): the bytes allowed in a header name.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# field-value bytes: HTAB, SP, VCHAR, obs-text.  Deleting them from a value
# leaves only the forbidden bytes (NUL, CR, LF, other controls, DEL).
_FIELD_VALUE = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_DIGITS = b"0123456789"
# One valid header line (a name of tchar, a colon, a field value without its
# surrounding SP/HTAB, LF): the (name, value) pairs of a header section are
# its findall(); a section with as many matches as lines is entirely valid.
_HEADER_LINE = re.compile(
    rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?)[ \t]*\n",
    re.M,
)
#: The bytes a whole header section may hold once CRs are gone: field-value
#: bytes (names and colons are among them) and LF.
_SECTION = _FIELD_VALUE + b"\n"
#: Header names found valid by `_split_headers_by_lines` (bounded).
_VALID_NAMES: Dict[bytes, bool] = {}
_MAX_VALID_NAMES = 1000
_HEXDIGITS = b"0123456789abcdefABCDEF"
_MAX_LENGTH_DIGITS = 18  # 10**18 bytes is far beyond any real body; keeps ints small

# Parser states.
_IDLE = 0  # not expecting a response (between requests, or after an error)
_HEAD = 1
_LENGTH = 2
_CHUNK_SIZE = 3
_CHUNK_DATA = 4
_CHUNK_END = 5
_TRAILERS = 6
_UNTIL_EOF = 7
_NO_BODY = 8  # head delivered, response has no body: complete right after

Headers = List[Tuple[bytes, bytes]]


class ResponseParseError(Exception):
    """The upstream sent something that is not a valid HTTP/1.1 response."""


class IResponseHandler(Protocol):
    """What `ResponseParser` calls; the upstream connection implements it."""

    def head_received(self, status: int, reason: bytes, headers: Headers) -> None:
        ...

    def body_received(self, data: bytes) -> None:
        ...

    def message_complete(self, keep_alive: bool) -> None:
        ...


def _parse_length(value: bytes) -> int:
    """Parse one Content-Length field value: digits, or a list of identical digits."""
    if b"," in value:
        result = -1
        for part in value.split(b","):
            part = part.strip(b" \t")
            n = _parse_length(part)
            if result >= 0 and n != result:
                raise ResponseParseError(ERR_CONFLICTING_LENGTH)
            result = n
        return result
    if not value or len(value) > _MAX_LENGTH_DIGITS or value.translate(None, _DIGITS):
        raise ResponseParseError(ERR_CONTENT_LENGTH)
    return int(value)


def _tokens(value: bytes) -> List[bytes]:
    """Split a comma-separated header value into lower-cased tokens, dropping empty ones."""
    return [t for t in (p.strip(b" \t").lower() for p in value.split(b",")) if t]


#: Status lines already parsed: (status, reason, HTTP/1.1?) by line. An
#: upstream sends the same few over and over.
_STATUS_LINES: Dict[bytes, Tuple[int, bytes, bool]] = {}
_MAX_STATUS_LINES = 256


def _status_line(line: bytes) -> Tuple[int, bytes, bool]:
    """Parse and remember a status line: HTTP-version SP 3DIGIT SP reason-phrase;
    the SP before an empty reason is tolerated missing (common in the wild,
    unambiguous). Raises `ResponseParseError`."""
    if (
        len(line) < 12
        or line[:7] != b"HTTP/1."
        or line[7] not in (48, 49)
        or line[8] != 32
        or not line[9:12].isdigit()
        or (len(line) > 12 and line[12] != 32)
    ):
        raise ResponseParseError(ERR_STATUS_LINE)
    reason = line[13:]
    if reason.translate(None, _FIELD_VALUE):
        raise ResponseParseError(ERR_STATUS_LINE)
    status = int(line[9:12])
    if status < 100 or status > 599:
        raise ResponseParseError(ERR_STATUS_LINE)
    parsed = (status, reason, line[7] == 49)
    if len(_STATUS_LINES) >= _MAX_STATUS_LINES:
        _STATUS_LINES.clear()
    _STATUS_LINES[line] = parsed
    return parsed


def _split_headers_by_regex(block: bytes, count: int) -> Optional[Headers]:
    """The (name, value) pairs of a header section of *count* LF-terminated
    lines, or None when a line is not valid. One C call on CPython."""
    headers: Headers = _HEADER_LINE.findall(block)
    return headers if len(headers) == count else None


def _split_headers_by_lines(block: bytes, count: int) -> Optional[Headers]:
    """The same as `_split_headers_by_regex`, for PyPy: a quarter of the
    regular expression's time there (and twice its time on CPython)."""
    if block.translate(None, _SECTION):
        return None  # a control byte somewhere
    headers: Headers = []
    names = _VALID_NAMES
    for line in block.split(b"\n")[:-1]:
        c = line.find(b":")
        name = line[:c]
        if c <= 0:
            return None  # no colon (line[:-1] could be a known name)
        if name not in names:
            if name.translate(None, _TCHAR):
                return None
            if len(names) >= _MAX_VALID_NAMES:
                names.clear()
            names[name] = True
        headers.append((name, line[c + 1 :].strip(b" \t")))
    return headers


_split_headers = (_split_headers_by_lines if platform.python_implementation() == "PyPy"
                  else _split_headers_by_regex)


def _reject_header_lines(block: bytes) -> None:
    """Raise the error of the first bad line of a header section (LF-terminated
    lines) that `_HEADER_LINE` did not wholly accept; earlier lines' own errors
    (a bad Content-Length) come first, as they are found in order."""
    length: Optional[int] = None
    for line in block.split(b"\n")[:-1]:
        c = line.find(b":")
        if c <= 0:
            if line[:1] in (b" ", b"\t"):
                raise ResponseParseError(ERR_OBS_FOLD)
            raise ResponseParseError(ERR_HEADER)
        name = line[:c]
        if name.translate(None, _TCHAR):
            if line[0] in (32, 9):
                raise ResponseParseError(ERR_OBS_FOLD)
            raise ResponseParseError(ERR_HEADER)
        value = line[c + 1 :].strip(b" \t")
        if value.translate(None, _FIELD_VALUE):
            raise ResponseParseError(ERR_HEADER)
        if len(name) == 14 and name.lower() == b"content-length":
            v = _parse_length(value)
            if length is not None and v != length:
                raise ResponseParseError(ERR_CONFLICTING_LENGTH)
            length = v
    raise ResponseParseError(ERR_HEADER)


class ResponseParser:
    """Incremental parser for the responses on one upstream connection.

    Call `start` before each request is sent, then `feed` every read; call
    `feed_eof` when the connection closes.  `reset` stops parsing (after an
    error or an abort) so that later bytes are ignored.
    """

    __slots__ = (
        "_handler",
        "_state",
        "_parts",
        "_parts_len",
        "_head_request",
        "_remaining",
        "_keep_alive",
        "_interim",
        "_trailer_size",
    )

    def __init__(self, handler: IResponseHandler) -> None:
        self._handler = handler
        self._state = _IDLE
        self._parts: List[bytes] = []
        self._parts_len = 0
        self._head_request = False
        self._remaining = 0
        self._keep_alive = False
        self._interim = 0
        self._trailer_size = 0

    def start(self, head_request: bool) -> None:
        """Expect a new response; `head_request` says the request was HEAD (no body)."""
        self._state = _HEAD
        self._parts = []
        self._parts_len = 0
        self._head_request = head_request
        self._interim = 0

    def reset(self) -> None:
        """Stop expecting a response; subsequent `feed` calls are ignored."""
        self._state = _IDLE
        self._parts = []
        self._parts_len = 0

    @property
    def active(self) -> bool:
        """True while a response is expected or being received."""
        return self._state != _IDLE

    @property
    def until_eof(self) -> bool:
        """True when the body is delimited by the connection closing."""
        return self._state == _UNTIL_EOF

    def feed_eof(self) -> None:
        """The connection was closed cleanly.

        Completes a close-delimited body (``message_complete(False)``);
        raises `ResponseParseError` if a response was otherwise incomplete.
        """
        state = self._state
        if state == _UNTIL_EOF:
            self._state = _IDLE
            self._handler.message_complete(False)
        elif state != _IDLE:
            self._state = _IDLE
            raise ResponseParseError(ERR_INCOMPLETE)

    def feed(self, data: bytes) -> None:
        """Parse `data`, calling the handler; raises `ResponseParseError`."""
        if not data:
            return
        if self._parts:
            # Waiting for the end of a line (or of the head).  Keep
            # collecting until it arrives, then join once: a peer that
            # dribbles a 64 KiB head one byte per read costs O(n), not O(n^2).
            if not self._completes_pending(data):
                self._stash(data)
                return
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts = []
            self._parts_len = 0
        pos = 0
        n = len(data)
        handler = self._handler
        while pos < n:
            state = self._state
            if state == _LENGTH or state == _CHUNK_DATA:
                rem = self._remaining
                avail = n - pos
                if avail < rem:
                    self._remaining = rem - avail
                    handler.body_received(data[pos:] if pos else data)
                    return
                end = pos + rem
                self._remaining = 0
                if state == _LENGTH:
                    if end < n:
                        raise ResponseParseError(ERR_EXTRA_DATA)
                    handler.body_received(data[pos:] if pos else data)
                    if self._state == _LENGTH:
                        self._complete()
                    return
                self._state = _CHUNK_END
                handler.body_received(data[pos:end] if pos or end < n else data)
                if self._state != _CHUNK_END:
                    return
                pos = end
            elif state == _CHUNK_END:
                if n - pos < 2:
                    if data[pos] != 13:  # b"\r"
                        raise ResponseParseError(ERR_CHUNK_END)
                    self._stash(data[pos:])
                    return
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise ResponseParseError(ERR_CHUNK_END)
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                pos = self._chunk_size(data, pos, n)
                if pos < 0:
                    return
            elif state == _UNTIL_EOF:
                handler.body_received(data[pos:] if pos else data)
                return
            elif state == _HEAD:
                pos = self._head(data, pos, n)
                if pos < 0:
                    return
            elif state == _TRAILERS:
                pos = self._trailer(data, pos, n)
                if pos < 0:
                    return
            else:  # _IDLE / _NO_BODY: the exchange was aborted; drop what is left
                return

    # -- pieces of `feed`; each returns the new position, or -1 when it has
    # -- buffered what it needs or handed the rest of the read on.

    def _stash(self, piece: bytes) -> None:
        """Keep an unfinished line (or head) until more bytes arrive."""
        self._parts.append(piece)
        self._parts_len += len(piece)
        size = self._parts_len
        state = self._state
        if state == _HEAD:
            if size > MAX_HEAD_SIZE:
                raise ResponseParseError(ERR_HEAD_TOO_LARGE)
        elif state == _CHUNK_SIZE:
            if size > MAX_CHUNK_LINE:
                raise ResponseParseError(ERR_CHUNK_SIZE)
        elif state == _TRAILERS:
            if self._trailer_size + size > MAX_TRAILER_SIZE:
                raise ResponseParseError(ERR_TRAILER)

    def _completes_pending(self, data: bytes) -> bool:
        """Whether `data` ends the unfinished line or head kept by `_stash`."""
        state = self._state
        if state == _HEAD:
            parts = self._parts
            tail = parts[-1][-2:]
            if len(tail) < 2 and len(parts) > 1:
                tail = parts[-2][-1:] + tail
            probe = tail + data[:3]
            return (
                b"\n\n" in probe
                or b"\n\r\n" in probe
                or data.find(b"\n\n") >= 0
                or data.find(b"\n\r\n") >= 0
            )
        if state == _CHUNK_END:
            return self._parts_len + len(data) >= 2
        if state == _CHUNK_SIZE or state == _TRAILERS:
            return b"\n" in data
        return True

    def _complete(self) -> None:
        self._state = _IDLE
        self._handler.message_complete(self._keep_alive)

    def _head(self, data: bytes, pos: int, n: int) -> int:
        # The head ends at the first empty line; a line starts after any LF.
        i = data.find(b"\n\r\n", pos)
        j = data.find(b"\n\n", pos, n if i < 0 else i + 2)
        if j >= 0:
            end, body_start = j, j + 2
        elif i >= 0:
            end, body_start = i, i + 3
        else:
            if n - pos > MAX_HEAD_SIZE:
                raise ResponseParseError(ERR_HEAD_TOO_LARGE)
            self._stash(data[pos:] if pos else data)
            return -1
        if body_start - pos > MAX_HEAD_SIZE:
            raise ResponseParseError(ERR_HEAD_TOO_LARGE)
        head = data[pos : end + 1]
        if b"\r" in head:
            head = head.replace(b"\r\n", b"\n")
        first = head.find(b"\n")
        line = head[:first]
        block = head[first + 1 :]
        count = block.count(b"\n")
        if count > MAX_HEADERS:
            raise ResponseParseError(ERR_TOO_MANY_HEADERS)

        parsed = _STATUS_LINES.get(line)
        if parsed is None:
            parsed = _status_line(line)
        status, reason, http11 = parsed

        headers = _split_headers(block, count)
        if headers is None:
            _reject_header_lines(block)
            return -1  # not reached: it raises
        length: Optional[int] = None
        chunked = False
        transfer_encoding: Optional[bytes] = None
        close = False
        keep_alive_token = False
        for name, value in headers:
            nl = len(name)
            if nl == 14:
                if name.lower() == b"content-length":
                    # bytes.isdigit() is true for ASCII digits only.
                    if value.isdigit() and len(value) <= _MAX_LENGTH_DIGITS:
                        v = int(value)
                    else:
                        v = _parse_length(value)
                    if length is not None and v != length:
                        raise ResponseParseError(ERR_CONFLICTING_LENGTH)
                    length = v
            elif nl == 17:
                if name.lower() == b"transfer-encoding":
                    if transfer_encoding is None:
                        transfer_encoding = value
                    else:
                        transfer_encoding += b"," + value
            elif nl == 10:
                if name.lower() == b"connection":
                    lowered = value.lower()
                    if lowered == b"keep-alive":
                        keep_alive_token = True
                        continue
                    if lowered == b"close":
                        close = True
                        continue
                    for token in _tokens(value):
                        if token == b"close":
                            close = True
                        elif token == b"keep-alive":
                            keep_alive_token = True

        if status < 200:
            if status == 101:
                raise ResponseParseError(ERR_SWITCHING_PROTOCOLS)
            self._interim += 1
            if self._interim > MAX_INTERIM_RESPONSES:
                raise ResponseParseError(ERR_TOO_MANY_INTERIM)
            return body_start  # stay in _HEAD for the final response

        if transfer_encoding is not None:
            if not http11:
                raise ResponseParseError(ERR_TE_HTTP10)
            if length is not None:
                raise ResponseParseError(ERR_CL_AND_TE)
            if _tokens(transfer_encoding) != [b"chunked"]:
                raise ResponseParseError(ERR_TRANSFER_ENCODING)
            chunked = True

        self._keep_alive = (not close) and (http11 or keep_alive_token)
        if self._head_request or status == 204 or status == 304 or length == 0:
            if body_start < n:
                raise ResponseParseError(ERR_EXTRA_DATA)
            self._state = _NO_BODY
            self._handler.head_received(status, reason, headers)
            if self._state == _NO_BODY:
                self._complete()
            return -1
        if chunked:
            self._state = _CHUNK_SIZE
            self._trailer_size = 0
        elif length is not None:
            self._state = _LENGTH
            self._remaining = length
        else:
            self._state = _UNTIL_EOF
            self._keep_alive = False
        state = self._state
        self._handler.head_received(status, reason, headers)
        if self._state != state:
            return -1
        return body_start

    def _chunk_size(self, data: bytes, pos: int, n: int) -> int:
        i = data.find(b"\n", pos)
        if i < 0:
            if n - pos > MAX_CHUNK_LINE:
                raise ResponseParseError(ERR_CHUNK_SIZE)
            self._stash(data[pos:] if pos else data)
            return -1
        if i - pos > MAX_CHUNK_LINE:
            raise ResponseParseError(ERR_CHUNK_SIZE)
        if i == pos or data[i - 1] != 13:
            raise ResponseParseError(ERR_CHUNK_LINE)
        line = data[pos : i - 1]
        semi = line.find(b";")
        if semi >= 0:
            # chunk-ext is ignored, but must not smuggle control bytes (a CR
            # in chunk-ext whitespace is a known desync).
            if line[semi + 1 :].translate(None, _FIELD_VALUE):
                raise ResponseParseError(ERR_CHUNK_SIZE)
            line = line[:semi].rstrip(b" \t")
        if not line or len(line) > 16 or line.translate(None, _HEXDIGITS):
            raise ResponseParseError(ERR_CHUNK_SIZE)
        size = int(line, 16)
        if size:
            self._remaining = size
            self._state = _CHUNK_DATA
        else:
            self._state = _TRAILERS
        return i + 1

    def _trailer(self, data: bytes, pos: int, n: int) -> int:
        i = data.find(b"\n", pos)
        if i < 0:
            if self._trailer_size + (n - pos) > MAX_TRAILER_SIZE:
                raise ResponseParseError(ERR_TRAILER)
            self._stash(data[pos:] if pos else data)
            return -1
        if i == pos or data[i - 1] != 13:
            raise ResponseParseError(ERR_CHUNK_LINE)
        self._trailer_size += i + 1 - pos
        if self._trailer_size > MAX_TRAILER_SIZE:
            raise ResponseParseError(ERR_TRAILER)
        if i - 1 == pos:  # the empty line: end of the message
            if i + 1 < n:
                raise ResponseParseError(ERR_EXTRA_DATA)
            self._complete()
            return -1
        line = data[pos : i - 1]
        c = line.find(b":")
        if c <= 0 or line[:c].translate(None, _TCHAR) or line[c + 1 :].translate(None, _FIELD_VALUE):
            raise ResponseParseError(ERR_TRAILER)
        return i + 1
