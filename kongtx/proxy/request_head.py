"""A client's request head, checked and parsed whole.

twisted.web reads a request head line by line (``LineReceiver``), splits and
canonicalises each header on its own and checks Content-Length and
Transfer-Encoding as they go by. :class:`kongtx.proxy.resource.ProxyChannel`
instead waits for the end of the head (it nearly always comes in the read that
started it) and hands it to :func:`parse_request_head`, which accepts or
refuses it in a few passes over the bytes, the same way the upstream response
parser does (``kongtx.proxy.http11``).

What it refuses, with the status Kong (nginx) gives:

- a request line that is not ``method SP request-target SP HTTP/1.x``, a method
  that is not a token, a request-target with anything but visible ASCII: 400;
- a header line that is not ``name ":" value``: whitespace before the colon,
  obsolete line folding, a name that is not a token, a control byte (NUL, a bare
  CR or LF, DEL...) in a value: 400 (twisted.web joins folded lines and lets bare
  CR through; a proxy in front of kongtx could read such a head differently);
- two Content-Length headers, Content-Length with Transfer-Encoding, a
  Content-Length that is not plain digits, a Transfer-Encoding other than
  ``chunked`` (or twisted.web's tolerated ``identity``): 400;
- more than ``max_headers`` header lines: 400.

The size limit is the caller's: it sees the head grow before its end arrives.
"""

from __future__ import annotations

import platform
import re
from typing import Dict, List, Optional, Tuple

from twisted.web.http_headers import Headers

from kongtx.proxy.responses import BAD_REQUEST

__all__ = ["BadRequestHead", "RawHeaders", "canonical_name", "parse_request_head"]

RawHeaders = Dict[bytes, List[bytes]]

# tchar (RFC 9110 5.6.2): the bytes of a method or a header name.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: A request-target's bytes: visible ASCII (twisted.web lets DEL and 0x80-0xB0 by).
_TARGET = bytes(range(0x21, 0x7F))
#: field-value bytes (HTAB, SP, VCHAR, obs-text) and the CRLFs between lines.
_SECTION = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)) + b"\r\n"
_DIGITS = b"0123456789"
_MAX_LENGTH_DIGITS = 18
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
#: Methods known to be tokens without looking.
_METHODS = frozenset([b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"])

#: One valid CRLF-terminated header line; a header section whose findall() has
#: as many matches as the section has LFs is entirely valid (a bare LF or CR
#: leaves a line without a match).
_HEADER_LINE = re.compile(
    rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?)[ \t]*\r\n",
    re.M,
)

#: twisted.web's name for a header (``content-type`` -> ``Content-Type``) by the
#: name as clients send it (bounded: names are the client's to choose).
_CANONICAL: Dict[bytes, bytes] = {}
_MAX_CANONICAL = 1000


class BadRequestHead(Exception):
    """The head is refused: answer ``status`` with Kong's ``message``, then close."""

    def __init__(self, status: int = 400, message: str = BAD_REQUEST) -> None:
        Exception.__init__(self, status, message)
        self.status = status
        self.message = message


def canonical_name(name: bytes) -> bytes:
    """The name twisted.web's ``Headers`` keeps ``name`` under, remembered (a
    client or upstream sends the same few names over and over). ``name`` must
    be a token."""
    canonical = _CANONICAL.get(name)
    if canonical is None:
        probe = Headers()
        probe.addRawHeader(name, b"")
        canonical = next(iter(probe.getAllRawHeaders()))[0]
        if len(_CANONICAL) >= _MAX_CANONICAL:
            _CANONICAL.clear()
        _CANONICAL[name] = canonical
    return canonical


def _pairs_by_regex(section: bytes) -> List[Tuple[bytes, bytes]]:
    """(name, value) of every line of ``section`` (CRLF-terminated lines); one C
    call on CPython."""
    pairs: List[Tuple[bytes, bytes]] = _HEADER_LINE.findall(section)
    if len(pairs) != section.count(b"\n"):
        raise BadRequestHead()
    return pairs


def _pairs_by_lines(section: bytes) -> List[Tuple[bytes, bytes]]:
    """The same for PyPy, where regular expressions cost more than a JIT-compiled
    loop: one ``translate`` for control bytes, counts for bare CR or LF, then a
    split per line."""
    if section.translate(None, _SECTION):
        raise BadRequestHead()
    lines = section.split(b"\r\n")
    count = len(lines) - 1
    if section.count(b"\r") != count or section.count(b"\n") != count:
        raise BadRequestHead()  # a bare CR or LF
    pairs = []
    known = _CANONICAL
    for i in range(count):
        line = lines[i]
        c = line.find(b":")
        name = line[:c]
        if c <= 0 or (name not in known and name.translate(None, _TCHAR)):
            raise BadRequestHead()
        pairs.append((name, line[c + 1:].strip(b" \t")))
    return pairs


_pairs = _pairs_by_lines if platform.python_implementation() == "PyPy" else _pairs_by_regex


def _request_line(line: bytes) -> Tuple[bytes, bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadRequestHead()
    method, target, version = parts
    if version not in _VERSIONS:
        raise BadRequestHead()
    if method not in _METHODS and (not method or method.translate(None, _TCHAR)):
        raise BadRequestHead()
    if not target or target.translate(None, _TARGET):
        raise BadRequestHead()
    return method, target, version


def _body_length(headers: RawHeaders) -> Optional[int]:
    """The body's length, None when chunked, from the framing headers."""
    lengths = headers.get(b"Content-Length")
    codings = headers.get(b"Transfer-Encoding")
    if codings is not None:
        if lengths is not None or len(codings) != 1:
            raise BadRequestHead()
        coding = codings[0].lower()
        if coding == b"chunked":
            return None
        if coding != b"identity":
            raise BadRequestHead()
        return 0
    if lengths is None:
        return 0
    if len(lengths) != 1:
        raise BadRequestHead()
    value = lengths[0]
    if not value or len(value) > _MAX_LENGTH_DIGITS or value.translate(None, _DIGITS):
        raise BadRequestHead()
    return int(value)


def parse_request_head(head: bytes, max_headers: int) -> Tuple[
        bytes, bytes, bytes, RawHeaders, Optional[int]]:
    """``(method, target, version, headers, length)`` of a request head: the
    request line and header lines, without the empty line that ends them.

    ``headers`` is a ``Headers._rawHeaders`` dict (canonical names, values in
    order); ``length`` is the body's length, None for a chunked body. Raises
    :class:`BadRequestHead`.
    """
    end = head.find(b"\r\n")
    if end < 0:
        return _request_line(head) + ({}, 0)
    method, target, version = _request_line(head[:end])
    pairs = _pairs(head[end + 2:] + b"\r\n")
    if len(pairs) > max_headers:
        raise BadRequestHead()
    headers: RawHeaders = {}
    known = _CANONICAL
    for name, value in pairs:
        canonical = known.get(name)
        if canonical is None:
            canonical = canonical_name(name)
        values = headers.get(canonical)
        if values is None:
            headers[canonical] = [value]
        else:
            values.append(value)
    return method, target, version, headers, _body_length(headers)
