"""Unit tests for the request head parser (no sockets)."""

from __future__ import annotations

import pytest

from kongtx.proxy import request_head
from kongtx.proxy.request_head import BadRequestHead, parse_request_head


@pytest.fixture(autouse=True, params=["regex", "lines"])
def header_splitter(request, monkeypatch):
    """Both ways of splitting the header lines (the regular expression runs on
    CPython, the line loop on PyPy) are held to every test, on either."""
    monkeypatch.setattr(request_head, "_pairs", {
        "regex": request_head._pairs_by_regex,
        "lines": request_head._pairs_by_lines}[request.param])
    return request.param


def test_a_plain_get():
    method, target, version, headers, length = parse_request_head(
        b"GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.5.0\r\n"
        b"Accept: */*", 100)
    assert (method, target, version, length) == (b"GET", b"/a/b?c=d", b"HTTP/1.1", 0)
    assert headers == {b"Host": [b"example.com"], b"User-Agent": [b"curl/8.5.0"],
                       b"Accept": [b"*/*"]}


def test_names_are_twisted_web_canonical_and_repeats_keep_their_order():
    _, _, _, headers, _ = parse_request_head(
        b"POST / HTTP/1.0\r\ncontent-type: text/plain\r\nx-a: 1\r\nX-A: 2\r\nwww-authenticate: x"
        b"\r\nte: trailers\r\nContent-Length: 5", 100)
    assert headers == {b"Content-Type": [b"text/plain"], b"X-A": [b"1", b"2"],
                       b"WWW-Authenticate": [b"x"], b"TE": [b"trailers"],
                       b"Content-Length": [b"5"]}


def test_values_lose_surrounding_whitespace_keep_inner_and_may_be_empty():
    _, _, _, headers, _ = parse_request_head(
        b"GET / HTTP/1.1\r\nX-A: \t a  b \t\r\nX-Empty:\r\nX-Blank:   \r\nX-Utf8: caf\xc3\xa9", 100)
    assert headers == {b"X-A": [b"a  b"], b"X-Empty": [b""], b"X-Blank": [b""],
                       b"X-Utf8": [b"caf\xc3\xa9"]}


def test_request_line_alone():
    assert parse_request_head(b"OPTIONS * HTTP/1.1", 100) == (
        b"OPTIONS", b"*", b"HTTP/1.1", {}, 0)


@pytest.mark.parametrize("head,length", [
    (b"POST / HTTP/1.1\r\nContent-Length: 42", 42),
    (b"POST / HTTP/1.1\r\nContent-Length: 0", 0),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked", None),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked", None),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: identity", 0),
])
def test_body_length(head, length):
    assert parse_request_head(head, 100)[4] == length


BAD = [
    ("empty", b""),
    ("two spaces", b"GET  / HTTP/1.1\r\nHost: a"),
    ("no version", b"GET /\r\nHost: a"),
    ("HTTP/2 request line", b"GET / HTTP/2.0\r\nHost: a"),
    ("HTTP/0.9 request line", b"GET /"),
    ("lower-case version", b"GET / http/1.1"),
    ("method with a slash", b"GE/T / HTTP/1.1"),
    ("method with NUL", b"G\x00T / HTTP/1.1"),
    ("target with DEL", b"GET /a\x7f HTTP/1.1"),
    ("target with a byte over 0x7f", b"GET /caf\xc3\xa9 HTTP/1.1"),
    ("target with a tab", b"GET /a\tb HTTP/1.1"),
    ("whitespace before the colon", b"GET / HTTP/1.1\r\nHost : a"),
    ("no colon", b"GET / HTTP/1.1\r\nHost: a\r\nNoColon"),
    # line[:-1] is a name the splitter has just seen.
    ("no colon, a known name and one more byte", b"GET / HTTP/1.1\r\nHost: a\r\nHostX"),
    ("empty name", b"GET / HTTP/1.1\r\n: a"),
    ("space in name", b"GET / HTTP/1.1\r\nX A: b"),
    ("obs-fold with a space", b"GET / HTTP/1.1\r\nX-A: b\r\n  c"),
    ("obs-fold with a tab", b"GET / HTTP/1.1\r\nX-A: b\r\n\tc: d"),
    ("NUL in a value", b"GET / HTTP/1.1\r\nX-A: a\x00b"),
    ("bare CR in a value", b"GET / HTTP/1.1\r\nX-A: a\rb"),
    ("bare CR at the end of a value", b"GET / HTTP/1.1\r\nX-A: ab\r"),
    # A front proxy that does not end lines at a bare LF sees one Host header here.
    ("bare LF hiding a header", b"GET / HTTP/1.1\r\nHost: a\nTransfer-Encoding: chunked"),
    ("bare LF at the end of a value", b"GET / HTTP/1.1\r\nX-A: a\n"),
    ("DEL in a value", b"GET / HTTP/1.1\r\nX-A: a\x7f"),
    ("control byte in a value", b"GET / HTTP/1.1\r\nX-A: a\x01"),
    ("two Content-Length", b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1"),
    ("Content-Length list", b"POST / HTTP/1.1\r\nContent-Length: 1, 1"),
    ("signed Content-Length", b"POST / HTTP/1.1\r\nContent-Length: +1"),
    ("hex Content-Length", b"POST / HTTP/1.1\r\nContent-Length: 0x1"),
    ("empty Content-Length", b"POST / HTTP/1.1\r\nContent-Length: "),
    ("huge Content-Length", b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 19),
    ("Content-Length and Transfer-Encoding",
     b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"),
    ("Transfer-Encoding and Content-Length",
     b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3"),
    ("two Transfer-Encoding", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                              b"Transfer-Encoding: chunked"),
    ("Transfer-Encoding gzip, chunked", b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked"),
    ("Transfer-Encoding xchunked", b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked"),
]


@pytest.mark.parametrize("head", [case[1] for case in BAD], ids=[case[0] for case in BAD])
def test_refused_with_kongs_400(head):
    with pytest.raises(BadRequestHead) as info:
        parse_request_head(head, 100)
    assert (info.value.status, info.value.message) == (400, "Bad request")


def test_more_headers_than_allowed():
    head = b"GET / HTTP/1.1" + b"".join(b"\r\nX-%d: v" % i for i in range(5))
    assert len(parse_request_head(head, 5)[3]) == 5
    with pytest.raises(BadRequestHead):
        parse_request_head(head + b"\r\nX-5: v", 5)


def test_canonical_names_are_remembered_within_a_bound(monkeypatch):
    monkeypatch.setattr(request_head, "_CANONICAL", {})
    monkeypatch.setattr(request_head, "_MAX_CANONICAL", 3)
    for i in range(10):
        name = b"x-name-%d" % i
        assert request_head.canonical_name(name) == b"X-Name-%d" % i
        assert len(request_head._CANONICAL) <= 3
