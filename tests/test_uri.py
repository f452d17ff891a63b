"""Table-driven tests of kongtx.uri: normalisation, escaping, path handling.

The cases are ported from Kong's ``spec/01-unit/18-tools_uri_spec.lua`` and
``spec/fixtures/router_path_handling_tests.lua``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest

from kongtx import uri
from kongtx.router import RouteSpec, Router

NORMALIZE_CASES = [
    # no normalisation necessary
    ("", ""),
    ("/", "/"),
    ("/a", "/a"),
    ("/a/", "/a/"),
    ("/a/b/c", "/a/b/c"),
    ("/a/b/c/", "/a/b/c/"),
    # reserved characters stay encoded
    ("/a%2Fb%2Fc/", "/a%2Fb%2Fc/"),
    ("/%20%21%23%24%25%26%27%28%29%2A%2B%2C%2F%3A%3B%3D%3F%40%5B%5D",
     "/ %21%23%24%25%26%27%28%29%2A%2B%2C%2F%3A%3B%3D%3F%40%5B%5D"),
    # reserved escapes are upper-cased, unreserved ones decoded
    ("/a%2fb%2fc/", "/a%2Fb%2Fc/"),
    ("/f%6f%6f", "/foo"),
    ("/%6B%6f%6e%67", "/kong"),
    ("/%2E", "/"),
    ("/%25", "/%25"),
    ("/%2541", "/%2541"),
    # dot segments, with merge_slashes
    ("//", "/"),
    ("/./", "/"),
    ("/.", "/"),
    ("/..", "/"),
    ("/../", "/"),
    ("/////", "/"),
    ("/./.././../", "/"),
    ("/a/b/c/./../../g", "/a/g"),
    ("mid/content=5/../6", "mid/6"),
    ("/a//b//", "/a/b/"),
    ("/a/.", "/a/"),
    ("/a/..", "/"),
    ("/.//a", "/a"),
    ("/a./b", "/a./b"),
    ("/.../b", "/.../b"),
    ("/foo/a/../bar", "/foo/bar"),
    ("/h%65llo/anything/a/../b", "/hello/anything/b"),
    ("/%2e%2e/%2e%2e/etc/passwd", "/etc/passwd"),
    ("/a/%2e%2E/b", "/b"),
    # non-ASCII: valid UTF-8 becomes characters, other bytes surrogates
    ("/endel%C3%B8st", "/endeløst"),
    ("/%C3%A4/a/%2e./a%2E//a/%2e/./a/../a/%2e%2E/%5f%99%af%2f%2F",
     "/ä/a./a/_\udc99\udcaf%2F%2F"),
]


@pytest.mark.parametrize("raw,expected", NORMALIZE_CASES)
def test_normalize(raw: str, expected: str) -> None:
    """normalize() matches Kong's normalize(path, true) on Kong's cases."""
    assert uri.normalize(raw) == expected


@pytest.mark.parametrize("raw", ["/%zz", "/%4", "/a%", "/%g0/b", "/ok/%2"])
def test_normalize_rejects_malformed_escapes(raw: str) -> None:
    """A % not followed by two hex digits raises ValueError (proxy: 400)."""
    with pytest.raises(ValueError) as info:
        uri.normalize(raw)
    assert str(info.value).startswith("invalid url-encoded value: '%")


def test_normalize_non_utf8_round_trips_to_the_same_bytes() -> None:
    """Undecodable bytes survive normalize + escape_path unchanged on the wire."""
    path = uri.normalize("/%5f%99%af%2f")
    assert uri.escape_path(path) == "/_%99%AF%2F"
    assert uri.from_wire(b"/caf\xc3\xa9/\xff") == "/café/\udcff"
    assert uri.escape_path(uri.from_wire(b"/caf\xc3\xa9/\xff")) \
        == "/caf%C3%A9/%FF"


ESCAPE_CASES = [
    ("/!$%&'()*+,/:;=?@[]ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
     "0123456789-_.~",
     "/!$%&'()*+,/:;=?@[]ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
     "0123456789-_.~"),
    ("/a b/c d", "/a%20b/c%20d"),
    ("/a\U0001F600", "/a%F0%9F%98%80"),
    ("/endeløst", "/endel%C3%B8st"),
    ("/a\"b<c>\\d^e`f{g|h}", "/a%22b%3Cc%3E%5Cd%5Ee%60f%7Bg%7Ch%7D"),
    ("/a\x00b\r\n", "/a%00b%0D%0A"),
    ("/frag#ment", "/frag%23ment"),
    ("/%2F%3F", "/%2F%3F"),
]


@pytest.mark.parametrize("path,expected", ESCAPE_CASES)
def test_escape_path(path: str, expected: str) -> None:
    """escape_path() re-escapes what is unsafe and keeps reserved escapes."""
    assert uri.escape_path(path) == expected


SANITIZE_CASES = [
    ("", ""),
    (".", ""),
    ("..", ""),
    ("./req", "req"),
    ("../req", "req"),
    ("/req", "/req"),
    ("req", "req"),
    (".a", ".a"),
]


@pytest.mark.parametrize("postfix,expected", SANITIZE_CASES)
def test_sanitize_postfix(postfix: str, expected: str) -> None:
    """A leading . or .. segment left after the prefix is dropped."""
    assert uri.sanitize_postfix(postfix) == expected


# Kong's spec/fixtures/router_path_handling_tests.lua; a tuple in the strip or
# handling column expands to one case per value.
BOTH = (False, True)
V01 = ("v0", "v1")
PATH_HANDLING = [
    # service_path, route_path, strip_path, path_handling, request, expected
    ("/", "/", BOTH, V01, "/", "/"),
    ("/", "/", BOTH, V01, "/route", "/route"),
    ("/", "/", BOTH, V01, "/route/", "/route/"),
    ("/", "/", BOTH, V01, "/routereq", "/routereq"),
    ("/", "/", BOTH, V01, "/route/req", "/route/req"),  # 5
    ("/", "/route", False, V01, "/route", "/route"),
    ("/", "/route", False, V01, "/route/", "/route/"),
    ("/", "/route", False, V01, "/routereq", "/routereq"),
    ("/", "/route", True, V01, "/route", "/"),
    ("/", "/route", True, V01, "/route/", "/"),
    ("/", "/route", True, V01, "/routereq", "/req"),  # 11
    ("/", "/route/", False, V01, "/route/", "/route/"),
    ("/", "/route/", False, V01, "/route/req", "/route/req"),
    ("/", "/route/", True, V01, "/route/", "/"),
    ("/", "/route/", True, V01, "/route/req", "/req"),  # 15
    ("/srv", "/rou", False, "v0", "/roureq", "/srv/roureq"),
    ("/srv", "/rou", False, "v1", "/roureq", "/srvroureq"),
    ("/srv", "/rou", True, "v0", "/roureq", "/srv/req"),
    ("/srv", "/rou", True, "v1", "/roureq", "/srvreq"),  # 19
    ("/srv/", "/rou", False, V01, "/rou", "/srv/rou"),
    ("/srv/", "/rou", True, "v0", "/rou", "/srv"),
    ("/srv/", "/rou", True, "v1", "/rou", "/srv/"),  # 22
    ("/service", "/", BOTH, V01, "/", "/service"),
    ("/service", "/", BOTH, "v0", "/route", "/service/route"),
    ("/service", "/", BOTH, "v1", "/route", "/serviceroute"),
    ("/service", "/", BOTH, "v0", "/route/", "/service/route/"),
    ("/service", "/", BOTH, "v1", "/route/", "/serviceroute/"),  # 27
    ("/service", "/", BOTH, "v0", "/routereq", "/service/routereq"),
    ("/service", "/", BOTH, "v1", "/routereq", "/serviceroutereq"),
    ("/service", "/", BOTH, "v0", "/route/req", "/service/route/req"),
    ("/service", "/", BOTH, "v1", "/route/req", "/serviceroute/req"),  # 31
    ("/service", "/route", False, "v0", "/route", "/service/route"),
    ("/service", "/route", False, "v1", "/route", "/serviceroute"),
    ("/service", "/route", False, "v0", "/route/", "/service/route/"),
    ("/service", "/route", False, "v1", "/route/", "/serviceroute/"),
    ("/service", "/route", False, "v0", "/routereq", "/service/routereq"),
    ("/service", "/route", False, "v1", "/routereq", "/serviceroutereq"),
    ("/service", "/route", True, V01, "/route", "/service"),
    ("/service", "/route", True, V01, "/route/", "/service/"),
    ("/service", "/route", True, "v0", "/routereq", "/service/req"),
    ("/service", "/route", True, "v1", "/routereq", "/servicereq"),  # 41
    ("/service", "/route/", False, "v0", "/route/", "/service/route/"),
    ("/service", "/route/", False, "v1", "/route/", "/serviceroute/"),
    ("/service", "/route/", False, "v0", "/route/req", "/service/route/req"),
    ("/service", "/route/", False, "v1", "/route/req", "/serviceroute/req"),
    ("/service", "/route/", True, "v0", "/route/", "/service/"),
    ("/service", "/route/", True, "v1", "/route/", "/service"),
    ("/service", "/route/", True, "v0", "/route/req", "/service/req"),
    ("/service", "/route/", True, "v1", "/route/req", "/servicereq"),  # 49
    ("/service/", "/", BOTH, "v0", "/route/", "/service/route/"),
    ("/service/", "/", BOTH, "v1", "/route/", "/service/route/"),
    ("/service/", "/", BOTH, V01, "/", "/service/"),
    ("/service/", "/", BOTH, V01, "/route", "/service/route"),
    ("/service/", "/", BOTH, V01, "/routereq", "/service/routereq"),
    ("/service/", "/", BOTH, V01, "/route/req", "/service/route/req"),  # 55
    ("/service/", "/route", False, V01, "/route", "/service/route"),
    ("/service/", "/route", False, V01, "/route/", "/service/route/"),
    ("/service/", "/route", False, V01, "/routereq", "/service/routereq"),
    ("/service/", "/route", True, "v0", "/route", "/service"),
    ("/service/", "/route", True, "v1", "/route", "/service/"),
    ("/service/", "/route", True, V01, "/route/", "/service/"),
    ("/service/", "/route", True, V01, "/routereq", "/service/req"),  # 62
    ("/service/", "/route/", False, V01, "/route/", "/service/route/"),
    ("/service/", "/route/", False, V01, "/route/req", "/service/route/req"),
    ("/service/", "/route/", True, V01, "/route/", "/service/"),
    ("/service/", "/route/", True, V01, "/route/req", "/service/req"),  # 66
    # these match on host, not paths
    ("/", None, BOTH, V01, "/", "/"),
    ("/", None, BOTH, V01, "/route", "/route"),
    ("/", None, BOTH, V01, "/route/", "/route/"),  # 69
    ("/service", None, BOTH, V01, "/", "/service"),
    ("/service", None, BOTH, "v0", "/route", "/service/route"),
    ("/service", None, BOTH, "v1", "/route", "/serviceroute"),
    ("/service", None, BOTH, "v0", "/route/", "/service/route/"),
    ("/service", None, BOTH, "v1", "/route/", "/serviceroute/"),  # 74
    ("/service/", None, BOTH, V01, "/", "/service/"),
    ("/service/", None, BOTH, V01, "/route", "/service/route"),
    ("/service/", None, BOTH, V01, "/route/", "/service/route/"),  # 77
    ("/service", "/route", True, "v0", "/route./req", "/service/req"),
    ("/service", "/route", True, "v1", "/route./req", "/servicereq"),
    ("/service/", "/route", True, V01, "/route./req", "/service/req"),  # 80
    ("/service", "/route", True, "v0", "/route%2E/req", "/service/req"),
    ("/service", "/route", True, "v1", "/route%2E/req", "/servicereq"),
    ("/service/", "/route", True, V01, "/route%2E/req", "/service/req"),
    ("/service", "/route", True, "v0", "/route%2e/req", "/service/req"),
    ("/service", "/route", True, "v1", "/route%2e/req", "/servicereq"),
    ("/service/", "/route", True, V01, "/route%2e/req", "/service/req"),  # 86
    ("/service", "/route", True, "v0", "/route../req", "/service/req"),
    ("/service", "/route", True, "v1", "/route../req", "/servicereq"),
    ("/service/", "/route", True, V01, "/route../req", "/service/req"),  # 89
    ("/service", "/route", True, "v0", "/route%2E%2E/req", "/service/req"),
    ("/service", "/route", True, "v1", "/route%2E%2E/req", "/servicereq"),
    ("/service/", "/route", True, V01, "/route%2E%2E/req", "/service/req"),
    ("/service", "/route", True, "v0", "/route%2e%2E/req", "/service/req"),
    ("/service", "/route", True, "v1", "/route%2e%2E/req", "/servicereq"),
    ("/service/", "/route", True, V01, "/route%2e%2E/req",
     "/service/req"),  # 95
    ("/service", "/route", False, "v0", "/route./req", "/service/route./req"),
    ("/service", "/route", False, "v1", "/route./req", "/serviceroute./req"),
    ("/service/", "/route", False, V01, "/route./req",
     "/service/route./req"),  # 98
    ("/service", "/route", False, "v0", "/route%2E/req",
     "/service/route./req"),
    ("/service", "/route", False, "v1", "/route%2E/req",
     "/serviceroute./req"),
    ("/service/", "/route", False, V01, "/route%2E/req",
     "/service/route./req"),
    ("/service", "/route", False, "v0", "/route%2e/req",
     "/service/route./req"),
    ("/service", "/route", False, "v1", "/route%2e/req",
     "/serviceroute./req"),
    ("/service/", "/route", False, V01, "/route%2e/req",
     "/service/route./req"),  # 104
    ("/service", "/route", False, "v0", "/route../req",
     "/service/route../req"),
    ("/service", "/route", False, "v1", "/route../req",
     "/serviceroute../req"),
    ("/service/", "/route", False, V01, "/route../req",
     "/service/route../req"),  # 107
    ("/service", "/route", False, "v0", "/route%2E%2E/req",
     "/service/route../req"),
    ("/service", "/route", False, "v1", "/route%2E%2E/req",
     "/serviceroute../req"),
    ("/service/", "/route", False, V01, "/route%2E%2E/req",
     "/service/route../req"),
    ("/service", "/route", False, "v0", "/route%2e%2E/req",
     "/service/route../req"),
    ("/service", "/route", False, "v1", "/route%2e%2E/req",
     "/serviceroute../req"),
    ("/service/", "/route", False, V01, "/route%2e%2E/req",
     "/service/route../req"),  # 113
]

Case = Tuple[str, Optional[str], bool, str, str, str]


def _expand() -> List[Case]:
    cases: List[Case] = []
    for service, route, strips, handlings, request, expected in PATH_HANDLING:
        strips = strips if isinstance(strips, tuple) else (strips,)
        handlings = handlings if isinstance(handlings, tuple) else (handlings,)
        for strip in strips:
            for handling in handlings:
                cases.append(
                    (service, route, strip, handling, request, expected))
    return cases


CASES = _expand()


def _route(route_path: Optional[str], strip: bool, handling: str,
           ) -> RouteSpec:
    return RouteSpec.from_row({
        "id": "r1",
        "created_at": 1,
        "protocols": ["http", "https"],
        "hosts": ["localbin.test"],
        "paths": [route_path] if route_path is not None else None,
        "strip_path": strip,
        "path_handling": handling,
        "service": {"id": "s1"},
    })


def test_fixture_table_is_complete() -> None:
    """All 113 rows of Kong's fixture are ported (212 expanded cases)."""
    assert len(PATH_HANDLING) == 113
    assert len(CASES) == 212


@pytest.mark.parametrize("service,route,strip,handling,request_path,expected",
                         CASES)
def test_upstream_path(service: str, route: Optional[str], strip: bool,
                       handling: str, request_path: str, expected: str) -> None:
    """upstream_path() gives Kong's upstream path for every fixture row."""
    path = uri.normalize(request_path)
    assert route is None or path.startswith(route)
    assert uri.upstream_path(service, path, route, strip, handling) \
        == expected


@pytest.mark.parametrize("service,route,strip,handling,request_path,expected",
                         CASES)
def test_upstream_path_through_router(service: str, route: Optional[str],
                                      strip: bool, handling: str,
                                      request_path: str,
                                      expected: str) -> None:
    """Router + Match.upstream_path agree with the fixture (plain paths)."""
    router = Router([_route(route, strip, handling)])
    match = router.select("GET", "localbin.test", uri.normalize(request_path))
    assert match is not None
    assert match.upstream_path(service, uri.normalize(request_path)) == expected


@pytest.mark.parametrize(
    "service,route,strip,handling,request_path,expected",
    [case for case in CASES if case[1] is not None])
def test_upstream_path_through_regex_route(service: str, route: str,
                                           strip: bool, handling: str,
                                           request_path: str,
                                           expected: str) -> None:
    """A regex path ~/[0]?<rest> strips exactly like the plain path (Kong)."""
    regex = "~/[0]?" + route[1:]
    router = Router([_route(regex, strip, handling)])
    match = router.select("GET", "localbin.test", uri.normalize(request_path))
    assert match is not None
    assert match.upstream_path(service, uri.normalize(request_path)) == expected


def test_upstream_path_without_service_path_uses_root() -> None:
    """A service without a path counts as "/"."""
    assert uri.upstream_path(None, "/a/b", "/a", True, "v0") == "/b"
    assert uri.upstream_path(None, "/a/b", None, False, "v0") == "/a/b"
