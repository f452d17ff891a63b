"""Responses the gateway produces itself (no route, upstream errors ...), in Kong's shapes.

Kong 3.x renders its own errors according to the request's ``Accept`` header (JSON by
default) and includes the request id. The message strings are Kong's.
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Tuple

NO_ROUTE = "no Route matched with those values"
NO_SERVICE = "no Service found with those values"
BAD_GATEWAY = "An invalid response was received from the upstream server"
GATEWAY_TIMEOUT = "The upstream server is timing out"
UNEXPECTED = "An unexpected error occurred"
BAD_REQUEST = "Bad request"
PAYLOAD_TOO_LARGE = "Payload too large"
HEADERS_TOO_LARGE = "Request header or cookie too large"
USE_HTTPS = "Please use HTTPS protocol"

#: Kong's bodies for statuses produced by the proxy itself.
DEFAULT_MESSAGES: Dict[int, str] = {
    400: BAD_REQUEST,
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    411: "Length required",
    412: "Precondition failed",
    413: PAYLOAD_TOO_LARGE,
    414: "URI too long",
    417: "Expectation failed",
    426: USE_HTTPS,
    500: UNEXPECTED,
    502: BAD_GATEWAY,
    503: "The upstream server is currently unavailable",
    504: GATEWAY_TIMEOUT,
}

_JSON = b"application/json; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"
_HTML = b"text/html; charset=utf-8"
_XML = b"application/xml; charset=utf-8"

_HTML_TEMPLATE = (
    "<!doctype html>\n<html>\n  <head>\n"
    '    <meta charset="utf-8">\n    <title>Error</title>\n  </head>\n'
    "  <body>\n    <h1>Error</h1>\n    <p>%s.</p>\n    <p>request_id: %s</p>\n"
    "  </body>\n</html>\n"
)
_XML_TEMPLATE = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<error>\n  <message>%s</message>\n'
    "  <requestid>%s</requestid>\n</error>\n"
)


def _escape_markup(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def _negotiate(accept: Optional[bytes], default: bytes) -> bytes:
    """The first acceptable type Kong knows, in the order the client listed them."""
    if not accept:
        return default
    for item in accept.split(b","):
        media = item.split(b";", 1)[0].strip().lower()
        if media in (b"application/json", b"*/*", b"application/*"):
            return _JSON if media != b"*/*" else default
        if media in (b"text/plain", b"text/*"):
            return _TEXT
        if media == b"text/html":
            return _HTML
        if media == b"application/xml":
            return _XML
    return default


def default_type(error_default_type: str) -> bytes:
    """Map the ``error_default_type`` property to a Content-Type value."""
    return {
        "application/json": _JSON,
        "text/html": _HTML,
        "application/xml": _XML,
    }.get(error_default_type, _TEXT)


def render_error(
    status: int,
    message: Optional[str],
    request_id: str,
    accept: Optional[bytes],
    default: bytes = _JSON,
) -> Tuple[bytes, bytes]:
    """``(content_type, body)`` of a gateway-produced error, Kong 3.x style."""
    text = message if message is not None else DEFAULT_MESSAGES.get(
        status, "The upstream server responded with %d" % (status,)
    )
    content_type = _negotiate(accept, default)
    if content_type is _JSON:
        body = '{\n  "message":%s,\n  "request_id":"%s"\n}' % (json.dumps(text), request_id)
    elif content_type is _HTML:
        body = _HTML_TEMPLATE % (_escape_markup(text), request_id)
    elif content_type is _XML:
        body = _XML_TEMPLATE % (_escape_markup(text), request_id)
    else:
        body = "%s\nrequest_id: %s\n" % (text, request_id)
    return content_type, body.encode("utf-8")
