"""Unit tests for the strict upstream response parser (no sockets)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest

from kongtx.proxy import http11
from kongtx.proxy.http11 import ResponseParseError, ResponseParser


@pytest.fixture(autouse=True, params=["regex", "lines"])
def header_splitter(request, monkeypatch):
    """Every test runs with both ways of splitting a header section (the parser
    uses one per interpreter: the regular expression on CPython, the line
    loop on PyPy), so both are held to every fact below on either."""
    monkeypatch.setattr(http11, "_split_headers", {
        "regex": http11._split_headers_by_regex,
        "lines": http11._split_headers_by_lines}[request.param])
    return request.param


class Recorder:
    """A parser handler that records what it is told."""

    def __init__(self) -> None:
        self.heads: List[Tuple[int, bytes, List[Tuple[bytes, bytes]]]] = []
        self.body: List[bytes] = []
        self.complete: Optional[bool] = None

    def head_received(self, status: int, reason: bytes, headers: List[Tuple[bytes, bytes]]) -> None:
        self.heads.append((status, reason, headers))

    def body_received(self, data: bytes) -> None:
        assert self.complete is None
        self.body.append(data)

    def message_complete(self, keep_alive: bool) -> None:
        assert self.complete is None
        self.complete = keep_alive


def parse(raw: bytes, *, head: bool = False, bytewise: bool = False, eof: bool = False) -> Recorder:
    rec = Recorder()
    parser = ResponseParser(rec)
    parser.start(head)
    if bytewise:
        for i in range(len(raw)):
            parser.feed(raw[i : i + 1])
    else:
        parser.feed(raw)
    if eof:
        parser.feed_eof()
    return rec


# (name, raw response, HEAD request?, status, headers, body, keep_alive, needs EOF)
VALID = [
    (
        "content-length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
        False, 200, [(b"Content-Length", b"5"), (b"X-A", b"b")], b"hello", True, False,
    ),
    (
        "identical content-lengths",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\ncontent-length: 3, 3\r\n\r\nabc",
        False, 200, [(b"Content-Length", b"3"), (b"content-length", b"3, 3")], b"abc", True, False,
    ),
    (
        "chunked with extensions and trailers",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n6 ; ext\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        False, 200, [(b"Transfer-Encoding", b"chunked")], b"hello world", True, False,
    ),
    (
        "chunked, upper-case hex, case-insensitive coding",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n",
        False, 200, [(b"Transfer-Encoding", b"Chunked")], b"0123456789", True, False,
    ),
    (
        "close-delimited",
        b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nuntil the end",
        False, 200, [(b"X", b"y")], b"until the end", False, True,
    ),
    (
        "HEAD response has no body despite Content-Length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n",
        True, 200, [(b"Content-Length", b"50")], b"", True, False,
    ),
    (
        "204 has no body",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        False, 204, [], b"", True, False,
    ),
    (
        "304 has no body despite Content-Length",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        False, 304, [(b"Content-Length", b"10")], b"", True, False,
    ),
    (
        "100 Continue and 103 Early Hints are skipped",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        False, 201, [(b"Content-Length", b"2")], b"ok", True, False,
    ),
    (
        "Connection: close forbids reuse",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
        False, 200, [(b"Connection", b"close"), (b"Content-Length", b"1")], b"x", False, False,
    ),
    (
        "HTTP/1.0 is not reused by default",
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
        False, 200, [(b"Content-Length", b"1")], b"x", False, False,
    ),
    (
        "HTTP/1.0 with Connection: keep-alive is reused",
        b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\nx",
        False, 200, [(b"Connection", b"Keep-Alive"), (b"Content-Length", b"1")], b"x", True, False,
    ),
    (
        "bare LF line endings in the head are accepted",
        b"HTTP/1.1 200 OK\nContent-Length: 2\nX-Y:  z \n\nhi",
        False, 200, [(b"Content-Length", b"2"), (b"X-Y", b"z")], b"hi", True, False,
    ),
    (
        "mixed CRLF and bare LF, empty line as bare LF",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\nhi",
        False, 200, [(b"Content-Length", b"2")], b"hi", True, False,
    ),
    (
        "status line without reason phrase",
        b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n",
        False, 404, [(b"Content-Length", b"0")], b"", True, False,
    ),
    (
        "a value keeps its inner whitespace and loses the outer",
        b"HTTP/1.1 200 OK\r\nX-A: \t a \t b \t\r\nX-B:c\r\nContent-Length: 0\r\n\r\n",
        False, 200, [(b"X-A", b"a \t b"), (b"X-B", b"c"), (b"Content-Length", b"0")], b"", True, False,
    ),
    (
        "empty header value and obs-text",
        b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Latin: caf\xe9\r\nContent-Length: 0\r\n\r\n",
        False, 200, [(b"X-Empty", b""), (b"X-Latin", b"caf\xe9"), (b"Content-Length", b"0")], b"", True, False,
    ),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(
    "raw,head,status,headers,body,keep_alive,eof",
    [case[1:] for case in VALID],
    ids=[case[0] for case in VALID],
)
def test_valid_responses(raw, head, status, headers, body, keep_alive, eof, bytewise):
    """Valid responses parse to the same status, headers, body and reusability,
    whether they arrive in one read or split at every byte boundary."""
    rec = parse(raw, head=head, bytewise=bytewise, eof=eof)
    assert [(s, h) for s, _, h in rec.heads] == [(status, headers)]
    assert b"".join(rec.body) == body
    assert rec.complete is keep_alive


def test_reason_phrase_is_passed_through():
    """The reason phrase is handed over as sent."""
    rec = parse(b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 0\r\n\r\n")
    assert rec.heads[0][1] == b"I'm a teapot"


def test_close_delimited_needs_eof():
    """A body without length or chunking is only complete when the connection closes."""
    rec = parse(b"HTTP/1.1 200 OK\r\n\r\npartial")
    assert rec.complete is None
    assert b"".join(rec.body) == b"partial"


def test_content_length_body_is_streamed_without_copy():
    """A read that falls entirely inside a Content-Length body is handed over as is."""
    rec = Recorder()
    parser = ResponseParser(rec)
    parser.start(False)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    piece = b"abcdefg"
    parser.feed(piece)
    assert rec.body[-1] is piece
    parser.feed(b"hij")
    assert rec.complete is True


def test_parser_is_reusable_for_the_next_response():
    """After `start`, the same parser parses the next response on the connection."""
    rec = Recorder()
    parser = ResponseParser(rec)
    for _ in range(2):
        rec.complete = None
        parser.start(False)
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert rec.complete is True
    assert len(rec.heads) == 2


def _many_headers(count: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(count)) + b"Content-Length: 0\r\n\r\n"


INVALID = [
    ("two different Content-Lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", http11.ERR_CONFLICTING_LENGTH),
    ("differing Content-Length list", b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello", http11.ERR_CONFLICTING_LENGTH),
    ("Content-Length with Transfer-Encoding", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", http11.ERR_CL_AND_TE),
    ("Content-Length +5", b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", http11.ERR_CONTENT_LENGTH),
    ("Content-Length -5", b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello", http11.ERR_CONTENT_LENGTH),
    ("Content-Length 0x5", b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello", http11.ERR_CONTENT_LENGTH),
    ("Content-Length 5_0", b"HTTP/1.1 200 OK\r\nContent-Length: 5_0\r\n\r\nhello", http11.ERR_CONTENT_LENGTH),
    ("Content-Length with inner space", b"HTTP/1.1 200 OK\r\nContent-Length: 5 0\r\n\r\nhello", http11.ERR_CONTENT_LENGTH),
    ("Content-Length empty", b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n", http11.ERR_CONTENT_LENGTH),
    ("Content-Length unicode digit", "HTTP/1.1 200 OK\r\nContent-Length: \u0665\r\n\r\n".encode("utf-8"), http11.ERR_CONTENT_LENGTH),
    ("Content-Length huge", b"HTTP/1.1 200 OK\r\nContent-Length: 1" + b"0" * 30 + b"\r\n\r\n", http11.ERR_CONTENT_LENGTH),
    ("chunk size Z", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZ\r\n", http11.ERR_CHUNK_SIZE),
    ("chunk size 0x5", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", http11.ERR_CHUNK_SIZE),
    ("chunk size +5", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n", http11.ERR_CHUNK_SIZE),
    ("chunk size -5", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", http11.ERR_CHUNK_SIZE),
    ("chunk size 5_0", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5_0\r\n", http11.ERR_CHUNK_SIZE),
    ("chunk size with leading space", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n", http11.ERR_CHUNK_SIZE),
    ("chunk size empty", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", http11.ERR_CHUNK_SIZE),
    ("chunk size line with bare LF", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", http11.ERR_CHUNK_LINE),
    ("chunk data not followed by CRLF", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", http11.ERR_CHUNK_END),
    ("chunk data followed by bare LF", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n", http11.ERR_CHUNK_END),
    ("CR in chunk extension", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n", http11.ERR_CHUNK_SIZE),
    ("chunk size too long", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n", http11.ERR_CHUNK_SIZE),
    ("Transfer-Encoding gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", http11.ERR_TRANSFER_ENCODING),
    ("Transfer-Encoding chunked, chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", http11.ERR_TRANSFER_ENCODING),
    ("Transfer-Encoding chunked then identity", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n", http11.ERR_TRANSFER_ENCODING),
    ("Transfer-Encoding in HTTP/1.0", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", http11.ERR_TE_HTTP10),
    ("status line garbage", b"garbage\r\n\r\n", http11.ERR_STATUS_LINE),
    ("status line HTTP/2", b"HTTP/2 200 OK\r\n\r\n", http11.ERR_STATUS_LINE),
    ("status line HTTP/1.2", b"HTTP/1.2 200 OK\r\n\r\n", http11.ERR_STATUS_LINE),
    ("status line lower-case", b"http/1.1 200 OK\r\n\r\n", http11.ERR_STATUS_LINE),
    ("status code two digits", b"HTTP/1.1 20 OK\r\n\r\n", http11.ERR_STATUS_LINE),
    ("status code four digits", b"HTTP/1.1 2000 OK\r\n\r\n", http11.ERR_STATUS_LINE),
    ("status code letters", b"HTTP/1.1 2x0 OK\r\n\r\n", http11.ERR_STATUS_LINE),
    ("status code 600", b"HTTP/1.1 600 Nope\r\n\r\n", http11.ERR_STATUS_LINE),
    ("status line double space", b"HTTP/1.1  200 OK\r\n\r\n", http11.ERR_STATUS_LINE),
    ("NUL in reason", b"HTTP/1.1 200 O\x00K\r\n\r\n", http11.ERR_STATUS_LINE),
    ("empty first line", b"\r\nHTTP/1.1 200 OK\r\n\r\n", http11.ERR_STATUS_LINE),
    ("too many headers", _many_headers(http11.MAX_HEADERS), http11.ERR_TOO_MANY_HEADERS),
    ("head too large", b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * http11.MAX_HEAD_SIZE + b"\r\n\r\n", http11.ERR_HEAD_TOO_LARGE),
    ("head too large without end", b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (http11.MAX_HEAD_SIZE + 10), http11.ERR_HEAD_TOO_LARGE),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: b\r\n  folded\r\nContent-Length: 0\r\n\r\n", http11.ERR_OBS_FOLD),
    ("obs-fold with tab and colon", b"HTTP/1.1 200 OK\r\nX-A: b\r\n\tx: y\r\nContent-Length: 0\r\n\r\n", http11.ERR_OBS_FOLD),
    ("whitespace before colon", b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n", http11.ERR_HEADER),
    ("header without colon", b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n", http11.ERR_HEADER),
    ("header with empty name", b"HTTP/1.1 200 OK\r\n: v\r\n\r\n", http11.ERR_HEADER),
    # Without a colon, line[:-1] is "Server", a name the line splitter has just seen.
    ("header without colon, a known name and one more byte",
     b"HTTP/1.1 200 OK\r\nServer: a\r\nServerX\r\nContent-Length: 0\r\n\r\n", http11.ERR_HEADER),
    ("NUL in header value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n", http11.ERR_HEADER),
    ("bare CR in header value", b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n", http11.ERR_HEADER),
    ("bad Content-Length before a bad line", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\nBad Line\r\n\r\n", http11.ERR_CONTENT_LENGTH),
    ("bad line before a bad Content-Length", b"HTTP/1.1 200 OK\r\nBad Line\r\nContent-Length: x\r\n\r\n", http11.ERR_HEADER),
    ("DEL in header name", b"HTTP/1.1 200 OK\r\nX\x7fA: b\r\nContent-Length: 0\r\n\r\n", http11.ERR_HEADER),
    ("DEL in header value", b"HTTP/1.1 200 OK\r\nX-A: b\x7f\r\nContent-Length: 0\r\n\r\n", http11.ERR_HEADER),
    ("101 Switching Protocols", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", http11.ERR_SWITCHING_PROTOCOLS),
    ("body longer than Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", http11.ERR_EXTRA_DATA),
    ("data after a 204", b"HTTP/1.1 204 No Content\r\n\r\nbody", http11.ERR_EXTRA_DATA),
    ("data after the chunked body", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nHTTP/1.1", http11.ERR_EXTRA_DATA),
    ("trailer without colon", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n", http11.ERR_TRAILER),
    ("trailer line with bare LF", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\n\r\n", http11.ERR_CHUNK_LINE),
    ("too many 1xx", b"HTTP/1.1 100 Continue\r\n\r\n" * (http11.MAX_INTERIM_RESPONSES + 1), http11.ERR_TOO_MANY_INTERIM),
]


@pytest.mark.parametrize("raw,message", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_responses(raw, message):
    """Each malformed or ambiguous response is rejected with its specific error."""
    with pytest.raises(ResponseParseError) as info:
        parse(raw)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "raw,message",
    [case[1:] for case in INVALID if case[2] != http11.ERR_EXTRA_DATA],
    ids=[case[0] for case in INVALID if case[2] != http11.ERR_EXTRA_DATA],
)
def test_invalid_responses_bytewise(raw, message):
    """The same errors are found when the response arrives one byte at a time."""
    with pytest.raises(ResponseParseError) as info:
        parse(raw, bytewise=True)
    assert str(info.value) == message


def test_errors_in_head_come_before_the_head_is_delivered():
    """A protocol error in the head means the handler never saw the response start."""
    rec = Recorder()
    parser = ResponseParser(rec)
    parser.start(False)
    with pytest.raises(ResponseParseError):
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert rec.heads == []


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\r\n",
    ],
    ids=["nothing", "partial head", "short body", "no last chunk", "unfinished trailers"],
)
def test_eof_before_complete_is_an_error(raw):
    """A connection closing before the response is complete is reported as incomplete."""
    rec = Recorder()
    parser = ResponseParser(rec)
    parser.start(False)
    parser.feed(raw)
    with pytest.raises(ResponseParseError) as info:
        parser.feed_eof()
    assert str(info.value) == http11.ERR_INCOMPLETE
    assert rec.complete is None


def test_reset_stops_parsing():
    """After `reset` (an aborted exchange) further bytes are ignored."""
    rec = Recorder()
    parser = ResponseParser(rec)
    parser.start(False)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    parser.reset()
    parser.feed(b"llo")
    parser.feed_eof()
    assert rec.body == [b"he"] and rec.complete is None


def test_handler_reset_during_body_stops_the_loop():
    """If the handler aborts the exchange while receiving a chunk, the rest of the read is dropped."""

    class Aborting(Recorder):
        def body_received(self, data: bytes) -> None:
            super().body_received(data)
            parser.reset()

    rec = Aborting()
    parser = ResponseParser(rec)
    parser.start(False)
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n1\r\nb\r\n0\r\n\r\n")
    assert rec.body == [b"a"] and rec.complete is None
