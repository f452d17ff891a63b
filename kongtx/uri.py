"""Request path normalisation, strip_path / path_handling, upstream escaping.

Pure functions, values in and values out, on the proxy's hot path. They follow
Kong 3.x: ``kong/tools/uri.lua`` (``normalize``, ``escape``) and
``kong/router/utils.lua`` (``sanitize_uri_postfix``, ``get_upstream_uri_v0``)
plus the v1 branch of ``kong/router/traditional.lua``.

How bytes live in a ``str``: a request path is bytes on the wire. kongtx keeps
it as a ``str`` decoded with ``"utf-8"`` and the ``"surrogateescape"`` error
handler (see :func:`from_wire`). Valid UTF-8 becomes ordinary characters
(``%C3%A4`` decodes to ``"ä"``); every byte that is not part of valid UTF-8
becomes the lone surrogate ``U+DC80 + byte`` (``%99`` decodes to
``"\\udc99"``). The mapping is lossless: :func:`escape_path` encodes the
string back with the same handler, so upstream receives exactly the bytes
Kong would send (``%99`` again).
"""

from __future__ import annotations

from typing import Dict, List, Optional

__all__ = [
    "RESERVED",
    "escape_path",
    "from_wire",
    "normalize",
    "sanitize_postfix",
    "upstream_path",
]

#: RFC 3986 reserved characters plus ``%`` (Kong's ``RESERVED_CHARS``): their
#: escapes stay encoded (upper-cased) by :func:`normalize`.
RESERVED = "!*'();:@&=+$,/?%#[]"

#: The message of the ``ValueError`` raised for ``%zz`` / ``%4``.
INVALID_ESCAPE = "invalid url-encoded value: '%s'"

_HEX = "0123456789abcdefABCDEF"


def _build_escape_table() -> Dict[bytes, bytes]:
    """Map every two-hex-digit pair (any case) to what replaces ``%XX``."""
    table: Dict[bytes, bytes] = {}
    reserved = {ord(c) for c in RESERVED}
    for hi in _HEX:
        for lo in _HEX:
            pair = (hi + lo).encode("ascii")
            value = int(pair, 16)
            if value in reserved:
                table[pair] = b"%" + pair.upper()
            else:
                table[pair] = bytes((value,))
    return table


_DECODE = _build_escape_table()

# Bytes forwarded as they are by escape_path(): Kong's ESCAPE_PATTERN
# complement (reserved, unreserved and "%"), minus "#" which kongtx escapes.
_SAFE = frozenset(
    b"!$&'()*+,/:;=?@[]"
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~%"
)
_QUOTE = tuple(
    chr(b) if b in _SAFE else "%%%02X" % b for b in range(256)
)


def from_wire(raw: bytes) -> str:
    """Decode a raw request path (bytes) the way kongtx stores paths."""
    return raw.decode("utf-8", "surrogateescape")


def _percent_decode(path: str) -> str:
    """Decode unreserved and "other" escapes, upper-case reserved ones.

    Raises ``ValueError`` on a ``%`` that is not followed by two hex digits.
    """
    raw = path.encode("utf-8", "surrogateescape")
    parts = raw.split(b"%")
    out: List[bytes] = [parts[0]]
    for part in parts[1:]:
        replacement = _DECODE.get(part[:2])
        if replacement is None:
            bad = b"%" + part[:2]
            raise ValueError(INVALID_ESCAPE % bad.decode("ascii", "replace"))
        out.append(replacement)
        out.append(part[2:])
    return b"".join(out).decode("utf-8", "surrogateescape")


def _remove_dot_segments_absolute(path: str) -> str:
    """RFC 3986 5.2.4 plus merged slashes, for a path starting with ``/``."""
    segments = path.split("/")
    last = len(segments) - 1
    out: List[str] = []
    for i in range(1, last + 1):
        segment = segments[i]
        if segment == "." or segment == "..":
            if segment == ".." and out:
                out.pop()
            if i == last:
                out.append("")
        elif segment or i == last:
            out.append(segment)
    return "/" + "/".join(out)


def _remove_dot_segments_relative(uri: str) -> str:
    """Kong's loop for the rare path that does not start with ``/``."""
    output: List[str] = []
    while uri:
        if uri == "/.":
            uri = "/"
        elif uri == "/..":
            uri = "/"
            if output:
                output.pop()
        elif uri == "." or uri == "..":
            uri = ""
        elif uri.startswith("../"):
            uri = uri[3:]
        elif uri.startswith("./"):
            uri = uri[2:]
        elif uri.startswith("/./"):
            uri = uri[2:]
        elif uri.startswith("/../"):
            uri = uri[3:]
            if output:
                output.pop()
        elif uri.startswith("//"):
            uri = uri[1:]
        else:
            i = uri.find("/", 1)
            if i == -1:
                output.append(uri)
                uri = ""
            else:
                output.append(uri[:i])
                uri = uri[i:]
    return "".join(output)


def normalize(path: str) -> str:
    """Return Kong's ``normalize(path, true)`` of a path (no query string).

    Percent-decodes every escape except the reserved characters (whose hex is
    upper-cased and kept encoded: ``%2f`` becomes ``%2F``), removes dot
    segments and merges ``//``. Raises ``ValueError`` on a malformed escape
    (``%zz``, ``%4``); the proxy answers 400.
    """
    if path == "" or path == "/":
        return path
    if "%" in path:
        path = _percent_decode(path)
    if "." not in path and "//" not in path:
        return path
    if path[0] == "/":
        return _remove_dot_segments_absolute(path)
    return _remove_dot_segments_relative(path)


def escape_path(path: str) -> str:
    """Return ``path`` as a valid, ASCII-only upstream request target path.

    Like Kong's ``escape``: reserved and unreserved characters and ``%`` (the
    reserved escapes :func:`normalize` kept) pass through; every other byte of
    the UTF-8 (surrogateescape) encoding becomes ``%XX``, so spaces, control
    characters and non-ASCII are re-escaped. Unlike Kong, ``#`` is escaped as
    well, so a raw ``#`` can never turn into a fragment upstream.
    """
    if path.isascii():
        for ch in path:
            if ord(ch) not in _SAFE:
                break
        else:
            return path
    quote = _QUOTE
    return "".join([quote[b] for b in path.encode("utf-8", "surrogateescape")])


def sanitize_postfix(postfix: str) -> str:
    """Kong's ``sanitize_uri_postfix``: drop a leading ``.``/``..`` segment.

    The postfix is what follows the matched prefix; ``/route./req`` matched by
    ``/route`` leaves ``./req``, which is forwarded as ``req``.
    """
    if not postfix:
        return postfix
    if postfix == "." or postfix == "..":
        return ""
    if postfix.startswith("./"):
        return postfix[2:]
    if postfix.startswith("../"):
        return postfix[3:]
    return postfix


def _upstream_v0(strip_path: bool, postfix: str, request_path: str,
                 base: str) -> str:
    """``get_upstream_uri_v0``: join with exactly one ``/``."""
    if base.endswith("/"):
        if strip_path:
            if postfix == "":
                if base == "/":
                    return "/"
                if request_path.endswith("/"):
                    return base
                return base[:-1]
            if postfix[0] == "/":
                return base[:-1] + postfix
            return base + postfix
        return base + request_path[1:]

    if strip_path:
        if postfix == "":
            if len(request_path) > 1 and request_path.endswith("/"):
                return base + "/"
            return base
        if postfix[0] == "/":
            return base + postfix
        return base + "/" + postfix

    if request_path == "/":
        return base
    return base + request_path


def upstream_path(service_path: Optional[str], request_path: str,
                  matched_prefix: Optional[str], strip_path: bool,
                  path_handling: str) -> str:
    """Return the path sent upstream (normalised form, no query string).

    ``request_path`` is the normalised request path; ``matched_prefix`` is the
    matched prefix of a prefix path, the whole match of a regex path, or None
    when the route matched without a path. ``path_handling`` is ``"v0"`` or
    ``"v1"`` (Kong's deprecated plain concatenation). The result still needs
    :func:`escape_path` before it goes on the wire.
    """
    base = service_path or "/"
    if matched_prefix is None:
        postfix = request_path[1:]
    else:
        postfix = sanitize_postfix(request_path[len(matched_prefix):])

    if path_handling == "v1":
        if strip_path:
            if base.endswith("/") and postfix.startswith("/"):
                return base[:-1] + postfix
            return base + postfix
        return base + request_path[1:]

    return _upstream_v0(strip_path, postfix, request_path, base)
