"""Table-driven tests of kongtx.router: matching rules and precedence.

Scenarios are ported from Kong's ``spec/01-unit/08-router_spec.lua`` and the
nginx-free parts of ``spec/02-integration/05-proxy/02-router_spec.lua``. Each
scenario is a list of routes and a list of requests with the id of the route
Kong picks (None: no route, Kong answers 404).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pytest

from kongtx import uri
from kongtx.router import Match, RouteSpec, Router, regex_path_error, \
    split_port, translate_regex


def route(id: str, **fields: Any) -> RouteSpec:
    """A route row with Kong's defaults; created_at 0 keeps input order."""
    row: Dict[str, Any] = {
        "id": id, "name": None, "created_at": 0,
        "protocols": ["http", "https"], "methods": None, "hosts": None,
        "paths": None, "headers": None, "snis": None, "sources": None,
        "destinations": None, "strip_path": True, "preserve_host": False,
        "regex_priority": 0, "path_handling": "v0",
        "https_redirect_status_code": 426, "request_buffering": True,
        "response_buffering": True, "tags": None,
        "service": {"id": "svc-" + id},
    }
    row.update(fields)
    return RouteSpec.from_row(row)


Request = Tuple[str, str, Optional[str], Dict[str, Any]]


def req(method: str, path: str, host: Optional[str] = None,
        **extra: Any) -> Request:
    return (method, path, host, extra)


def select(router: Router, request: Request) -> Optional[Match]:
    method, path, host, extra = request
    return router.select(method, host, path, **extra)


# --------------------------------------------------------------------------
# split_port (Kong's table)

SPLIT_PORT = [
    (("",), ("", "", False)),
    (("localhost",), ("localhost", "localhost", False)),
    (("localhost:",), ("localhost", "localhost", False)),
    (("localhost:80",), ("localhost", "localhost:80", True)),
    (("localhost:23h",), ("localhost:23h", "localhost:23h", False)),
    (("localhost/24",), ("localhost/24", "localhost/24", False)),
    (("::1",), ("::1", "::1", False)),
    (("[::1]",), ("::1", "[::1]", False)),
    (("[::1]:",), ("::1", "[::1]:", False)),
    (("[::1]:80",), ("::1", "[::1]:80", True)),
    (("[::1]:80b",), ("[::1]:80b", "[::1]:80b", False)),
    (("[::1]/96",), ("[::1]/96", "[::1]/96", False)),
    (("", 88), ("", ":88", False)),
    (("localhost", 88), ("localhost", "localhost:88", False)),
    (("localhost:", 88), ("localhost", "localhost:88", False)),
    (("localhost:80", 88), ("localhost", "localhost:80", True)),
    (("localhost:23h", 88), ("localhost:23h", "[localhost:23h]:88", False)),
    (("localhost/24", 88), ("localhost/24", "localhost/24:88", False)),
    (("::1", 88), ("::1", "[::1]:88", False)),
    (("[::1]", 88), ("::1", "[::1]:88", False)),
    (("[::1]:", 88), ("::1", "[::1]:88", False)),
    (("[::1]:80", 88), ("::1", "[::1]:80", True)),
    (("[::1]:80b", 88), ("[::1]:80b", "[::1]:80b:88", False)),
    (("[::1]/96", 88), ("[::1]/96", "[::1]/96:88", False)),
]


@pytest.mark.parametrize("args,expected", SPLIT_PORT)
def test_split_port(args: Tuple[Any, ...], expected: Tuple[str, str, bool],
                    ) -> None:
    """split_port() splits Host values exactly like Kong's split_port."""
    assert split_port(*args) == expected


# --------------------------------------------------------------------------
# Scenarios: (name, routes, [(request, expected route id)])

KONG_USE_CASES = [
    route("1", hosts=["domain-1.org", "domain-2.org"]),
    route("2", methods=["TRACE"]),
    route("3", paths=["/my-route"]),
    route("4", paths=["/route-4"], hosts=["domain-1.org", "domain-2.org"]),
    route("5", hosts=["domain-1.org", "domain-2.org"],
          methods=["POST", "PUT", "PATCH"]),
    route("6", methods=["POST", "PUT", "PATCH"], paths=["/route-6"]),
    route("7", hosts=["domain-with-uri-1.org", "domain-with-uri-2.org"],
          methods=["POST", "PUT", "PATCH"], paths=["/my-route-uri"]),
    route("8", paths=["/serviceless"], service=None),
    route("9", headers={"location": ["my-location-1", "my-location-2"]}),
    route("10", headers={"location": ["my-location-1"],
                         "version": ["v1", "v2"]}),
    route("11", headers={"location": ["my-location-1", "my-location-2"]},
          paths=["/headers-uri"]),
    route("12", hosts=["domain-with-headers-1.org",
                       "domain-with-headers-2.org"],
          headers={"location": ["my-location-1", "my-location-2"]},
          methods=["POST", "PUT", "PATCH"],
          paths=["/headers-host-uri-method"]),
    route("13", hosts=["domain-1.org:321", "domain-2.org"]),
    route("14", hosts=["domain-3.org:321"]),
    route("15", headers={"user_agent": [
        r"~*windows|linux|os\s+x\s*[\d\._]+|solaris|bsd"]}),
]


def H(**headers: Any) -> Dict[str, Any]:
    return {"headers": headers}


SCENARIOS: List[Tuple[str, List[RouteSpec], List[Tuple[Request, Any]]]] = [
    ("select() use cases", KONG_USE_CASES, [
        (req("GET", "/", "domain-1.org"), "1"),                   # [host]
        (req("GET", "/", "domain-1.org:80"), "1"),      # ignores default port
        (req("GET", "/", "domain-1.org:123"), "1"),     # weird port, no-port
        (req("GET", "/", "domain-1.org:321"), "13"),    # specific port
        (req("GET", "/", "domain-3.org:321"), "14"),    # port-only route
        (req("GET", "/", "domain-3.org:123"), None),    # wrong port
        (req("GET", "/", "DOMAIN-1.ORG"), "1"),         # case-insensitive
        (req("GET", "/my-route", "domain.org"), "3"),             # [uri]
        (req("GET", "/my-route-uri", ""), "3"),         # [uri + empty host]
        (req("GET", "/my-route-uri", None), "3"),
        (req("TRACE", "/", "domain.org"), "2"),                   # [method]
        (req("GET", "/route-4", "domain-1.org"), "4"),            # host+uri
        (req("POST", "/", "domain-1.org"), "5"),              # host+method
        (req("POST", "/route-6", "domain.org"), "6"),          # uri+method
        (req("POST", "/my-route-uri", "domain-with-uri-2.org"), "7"),
        (req("GET", "/", None, **H(location=["my-location-1"])), "9"),
        (req("GET", "/", None, **H(location=["my-location-2"])), "9"),
        (req("GET", "/", None, **H(location=["MY-LOCATION-2"])), "9"),
        (req("GET", "/", None, **H(location=["my-location-1"],
                                   version=["v1"])), "10"),
        (req("GET", "/", None, **H(location=["my-location-3",
                                             "my-location-1"],
                                   version=["v2"])), "10"),
        (req("GET", "/", None, **H(location=["my-location-3",
                                             "my-location-2"],
                                   version=["v2"])), "9"),
        (req("GET", "/headers-uri", None,
             **H(location=["my-location-2"])), "11"),
        (req("PUT", "/headers-host-uri-method", "domain-with-headers-1.org",
             **H(location=["my-location-2"])), "12"),
        (req("GET", "/serviceless"), "8"),
        (req("GET", "/", None, **H(user_agent=["Mozilla/5.0 (X11; Linux)"])),
         "15"),
        (req("GET", "/", None, **H(user_agent=["curl/8.0"])), None),
        (req("GET", "/my-route/some/path", "domain.org"), "3"),  # prefix
        # misses
        (req("GET", "/", "domain-3.org"), None),
        (req("GET", "/route-4", "domain-3.org"), None),
        (req("GET", "/some-uri", "domain-with-uri-2.org"), None),
        (req("PUT", "/some-uri-foo", "domain-with-uri-2.org"), None),
        (req("GET", "/some-other-prefix/my-route", "domain.org"), None),
        (req("GET", "/", None, **H(location=["invalid-location"])), None),
        (req("GET", "/headers-uri", None,
             **H(location=["invalid-location"])), None),
        (req("PUT", "/headers-host-uri-method", None,
             **H(location=["invalid-location"],
                 host=["domain-with-headers-1.org"])), None),
    ]),
    ("a port-specific plain host matches the scheme's default port", [
        route("80", hosts=["web.test:80"]),
        route("443", hosts=["web.test:443"]),
        route("any", hosts=["web.test"]),
    ], [
        (req("GET", "/", "web.test"), "any"),
        (req("GET", "/", "web.test:80"), "80"),
        (req("GET", "/", "web.test:443"), "443"),
        (req("GET", "/", "web.test:8000"), "any"),
    ]),
    ("a port-specific plain host alone", [
        route("80", hosts=["web.test:80"]),
    ], [
        (req("GET", "/", "web.test"), "80"),
        (req("GET", "/", "web.test", scheme="https"), None),
        (req("GET", "/", "web.test:8000"), None),
    ]),
    ("[host] and [uri] have higher priority than [method]",
     KONG_USE_CASES[:7], [
         (req("TRACE", "/", "domain-2.org"), "1"),
         (req("TRACE", "/my-route", "domain.org"), "3"),
     ]),
    ("IPv6 literal hosts", [
        route("1", hosts=["::11", "[::12]"]),
        route("2", hosts=["::21", "[::22]"]),
        route("3", hosts=["[::31]:321", "[::32]:321"]),
        route("4", hosts=["[::21]:321", "[::22]:321"]),
    ], [
        (req("GET", "/", "::11"), "1"),
        (req("GET", "/", "[::11]"), "1"),
        (req("GET", "/", "[::11]:654"), "1"),
        (req("GET", "/", "[::12]:8000"), "1"),
        (req("GET", "/", "[::21]:321"), "4"),
        (req("GET", "/", "[::31]:321"), "3"),
        (req("GET", "/", "[::21]:654"), "2"),
        (req("GET", "/", "[::31]:654"), None),
    ]),
    ("[uri prefix] does not supersede a longer [uri]", [
        route("1", paths=["/my-route/hello"]),
        route("2", paths=["/my-route"]),
    ], [
        (req("GET", "/my-route/hello", "domain.org"), "1"),
        (req("GET", "/my-route/hello/world", "domain.org"), "1"),
        (req("GET", "/my-route", "domain.org"), "2"),
        (req("GET", "/my-route/world", "domain.org"), "2"),
    ]),
    ("... while [methods] are also defined", [
        route("1", methods=["POST", "PUT", "GET"], paths=["/my-route"]),
        route("2", methods=["POST", "PUT", "GET"], paths=["/my-route/hello"]),
    ], [
        (req("GET", "/my-route/hello", "domain.org"), "2"),
        (req("GET", "/my-route/hello/world", "domain.org"), "2"),
        (req("GET", "/my-route", "domain.org"), "1"),
        (req("GET", "/my-route/world", "domain.org"), "1"),
    ]),
    ("... while [hosts] are also defined", [
        route("1", hosts=["domain.org"], paths=["/my-route"]),
        route("2", hosts=["domain.org"], paths=["/my-route/hello"]),
    ], [
        (req("GET", "/my-route/hello", "domain.org"), "2"),
        (req("GET", "/my-route/hello/world", "domain.org"), "2"),
        (req("GET", "/my-route", "domain.org"), "1"),
        (req("GET", "/my-route/world", "domain.org"), "1"),
    ]),
    ("... when a better [uri] exists for another [host]", [
        route("1", hosts=["example.com"], paths=["/my-route"]),
        route("2", hosts=["example.com"], paths=["/my-route/hello"]),
        route("3", hosts=["example.net"], paths=["/my-route/hello/world"]),
    ], [
        (req("GET", "/my-route/hello/world", "example.com"), "2"),
        (req("GET", "/my-route/hello/world/and/goodnight", "example.com"),
         "2"),
    ]),
    ("[uri prefix] is anchored", [
        route("1", paths=["/something/my-route"]),
        route("2", hosts=["example.com"], paths=["/my-route"]),
    ], [
        (req("GET", "/something/my-route", "example.com"), "1"),
    ]),
    ("[uri regex]", [
        route("1", paths=[r"~/users/\d+/profile"]),
    ], [
        (req("GET", "/users/123/profile", "domain.org"), "1"),
        (req("GET", "/users/abc/profile", "domain.org"), None),
    ]),
    ("several [uri regex]", [
        route("1", paths=[r"~/route/persons/\d{3}"]),
        route("2", paths=[r"~/route/persons/\d{3}/following"]),
        route("3", paths=[r"~/route/persons/\d{3}/[a-z]+"]),
    ], [
        (req("GET", "/route/persons/456", "domain.org"), "1"),
    ]),
    ("[uri regex] beats a [prefix uri]", [
        route("1", paths=["/route/persons"]),
        route("2", paths=[r"~/route/persons/\d+/profile"]),
    ], [
        (req("GET", "/route/persons/123/profile", "domain.org"), "2"),
        (req("GET", "/route/persons/x", "domain.org"), "1"),
    ]),
    ("[uri regex] beats an exact [uri]", [
        route("1", paths=["/route/fixture"]),
        route("2", paths=["~/route/(fixture)"]),
    ], [
        (req("GET", "/route/fixture", "domain.org"), "2"),
    ]),
    ("[uri regex + host] beats a [prefix uri]", [
        route("1", hosts=["route.com"], paths=["/pat"]),
        route("2", hosts=["route.com"], paths=["/path"], methods=["POST"]),
        route("3", hosts=["route.com"], paths=["~/(path)"]),
    ], [
        (req("GET", "/path", "route.com"), "3"),
    ]),
    ("[uri regex] is anchored at the start", [
        route("1", paths=["~/prefix/[0-9]+"]),
    ], [
        (req("GET", "/prefix/123", "domain.org"), "1"),
        (req("GET", "/extra/prefix/123", "domain.org"), None),
    ]),
    ("[wildcard host]", [
        route("1", hosts=["*.route.com"]),
        route("2", hosts=["route.*"]),
    ], [
        (req("GET", "/", "foo.route.com"), "1"),
        (req("GET", "/", "foo.bar.route.com"), "1"),
        (req("GET", "/", "route.org"), "2"),
        (req("GET", "/", "route.org:123"), "2"),
        (req("GET", "/", "foo.route.com:123"), "1"),
        (req("GET", "/", ".route.com"), None),
        (req("GET", "/", "route."), None),
        (req("GET", "/", "notroute.com"), None),
    ]),
    ("port-specific [wildcard host]", [
        route("1", hosts=["*.route.com"]),
        route("2", hosts=["route.*"]),
        route("3", hosts=["*.route.net:123"]),
        route("4", hosts=["route.*:123"]),
    ], [
        (req("GET", "/", "foo.route.net:123"), "3"),
        (req("GET", "/", "foo.route.net:456"), None),
        (req("GET", "/", "route.org:123"), "4"),
    ]),
    ("port-specific [wildcard host] on the http default port", [
        route("1", hosts=["*.route.com"]),
        route("2", hosts=["route.*"]),
        route("3", hosts=["route.*:80"]),
    ], [
        (req("GET", "/", "route.org:123"), "2"),
        (req("GET", "/", "route.org:80"), "3"),
        (req("GET", "/", "route.org"), "3"),
        (req("GET", "/", "route.org", scheme="https"), "2"),
    ]),
    ("port-specific [wildcard host] on the https default port", [
        route("1", hosts=["*.route.com"]),
        route("2", hosts=["route.*"]),
        route("3", hosts=["route.*:443"]),
    ], [
        (req("GET", "/", "route.org:123"), "2"),
        (req("GET", "/", "route.org:443"), "3"),
        (req("GET", "/", "route.org", scheme="https"), "3"),
    ]),
    ("[wildcard host] does not take precedence over a plain host", [
        route("p", hosts=["plain.route.com"]),
        route("1", hosts=["*.route.com"]),
        route("2", hosts=["route.*"]),
        route("r", hosts=["route.com"]),
    ], [
        (req("GET", "/", "route.com"), "r"),
        (req("GET", "/", "route.org"), "2"),
        (req("GET", "/", "plain.route.com"), "p"),
        (req("GET", "/", "foo.route.com"), "1"),
    ]),
    ("[wildcard host + path] vs [plain host + path]", [
        route("1", hosts=["*.route.com"], paths=["/path1"]),
        route("2", hosts=["plain.route.com"], paths=["/path2"]),
    ], [
        (req("GET", "/path1", "plain.route.com"), "1"),
        (req("GET", "/path2", "plain.route.com"), "2"),
    ]),
    ("[wildcard host port] > [wildcard host]", [
        route("1", hosts=["route.*"]),
        route("2", hosts=["route.*:80", "route.com.*"]),
    ], [
        (req("GET", "/", "route.org:80"), "2"),
    ]),
    ("[wildcard host + port] even if a [wildcard host] matched", [
        route("1", hosts=["route.*"]),
        route("2", hosts=["route.*:123"]),
        route("3", hosts=["route.*:80"]),
    ], [
        (req("GET", "/", "route.org:123"), "2"),
        (req("GET", "/", "route.org"), "3"),
    ]),
    ("[wildcard/plain + uri + method]", [
        route("1", hosts=["*.route.com"]),
        route("2", hosts=["route.*"]),
        route("3", hosts=["*.domain.com", "example.com"], paths=["/path"],
              methods=["GET", "TRACE"]),
    ], [
        (req("POST", "/path", "foo.domain.com"), None),
        (req("GET", "/path", "foo.domain.com"), "3"),
        (req("TRACE", "/path", "example.com"), "3"),
    ]),
    ("[wildcard host] + [uri regex]", [
        route("1", hosts=["*.example.com"], paths=[r"~/users/\d+/profile"]),
        route("2", hosts=["*.example.com"], paths=["/users"]),
    ], [
        (req("GET", "/users/123/profile", "test.example.com"), "1"),
        (req("GET", "/users", "test.example.com"), "2"),
    ]),
    ("[headers] routes with more headers first", [
        route("1", headers={"version": ["v1", "v2"],
                            "user_agent": ["foo", "bar"]}),
        route("2", headers={"version": ["v1", "v2"],
                            "user_agent": ["foo", "bar"],
                            "location": ["east", "west"]}),
    ], [
        (req("GET", "/", None, **H(version=["v1"], user_agent=["foo"],
                                   location=["north", "west"])), "2"),
        (req("GET", "/", None, **H(version=["v1"], user_agent=["foo"],
                                   location=["north"])), "1"),
    ]),
    ("[headers] names and values are case-insensitive", [
        route("1", headers={"USER_AGENT": ["foo", "bar"]}),
        route("2", headers={"user_agent": ["BAZ"]}),
    ], [
        (req("GET", "/", None, **H(user_agent=["FOO"])), "1"),
        (req("GET", "/", None, **H(user_agent=["baz"])), "2"),
    ]),
    ("[headers] integration: prioritizes Routes with more headers", [
        route("1", headers={"version": ["v1", "v2"]}),
        route("2", headers={"version": ["v3"], "location": ["us-east"]}),
        route("3", headers={"version": ["v3"]}),
    ], [
        (req("GET", "/", "domain.test",
             **H(version=["v3"], location=["us-east"])), "2"),
        (req("GET", "/", "domain.test", **H(version=["v3"])), "3"),
        (req("GET", "/", "domain.test", **H(version=["v1"])), "1"),
    ]),
    ("[paths] + [headers]", [
        route("1", headers={"version": ["v1", "v2"]}, paths=["/root"]),
        route("2", headers={"version": ["v1", "v2"]},
              paths=["/root/fixture"]),
        route("3", headers={"version": ["v1", "v2"],
                            "location": ["us-east"]}, paths=["/root"]),
    ], [
        (req("GET", "/root/fixture/get", None,
             **H(version=["v2"], location=["us-east"])), "3"),
        (req("GET", "/root/fixture/get", None, **H(version=["v2"])), "2"),
    ]),
    ("more [headers] has priority over longer [paths]", [
        route("1", headers={"version": ["v1"]}, paths=["/my-route/hello"]),
        route("2", headers={"version": ["v1"], "location": ["us-east"]},
              paths=["/my-route"]),
    ], [
        (req("GET", "/my-route/hello", "domain.org",
             **H(version=["v1"], location=["us-east"])), "2"),
        (req("GET", "/my-route/hello/world", "domain.org",
             **H(version=["v1"], location=["us-east"])), "2"),
    ]),
    ("half [uri] and [host] match does not supersede another route", [
        route("1", hosts=["host1.com"], paths=["/v1/path"]),
        route("2", hosts=["host2.com"], paths=["/"]),
    ], [
        (req("GET", "/v1/path", "host1.com"), "1"),
        (req("GET", "/v1/path", "host2.com"), "2"),
    ]),
    ("half [wildcard host] and [method] match", [
        route("1", hosts=["host.*"], methods=["GET"]),
        route("2", hosts=["host.*"], methods=["POST"]),
    ], [
        (req("GET", "/", "host.com"), "1"),
        (req("POST", "/", "host.com"), "2"),
    ]),
    ("half [uri regex] and [method] match", [
        route("1", methods=["GET"], paths=[r"~/users/\d+/profile"]),
        route("2", methods=["POST"], paths=[r"~/users/\d*/profile"]),
    ], [
        (req("GET", "/users/123/profile", "domain.org"), "1"),
        (req("POST", "/users/123/profile", "domain.org"), "2"),
    ]),
    ("[method] does not supersede [uri prefix]", [
        route("1", methods=["GET"]),
        route("2", paths=["/example"]),
    ], [
        (req("GET", "/example", "domain.org"), "2"),
        (req("GET", "/example/status/200", "domain.org"), "2"),
        (req("GET", "/other", "domain.org"), "1"),
    ]),
    ("[method] does not supersede [wildcard host]", [
        route("1", methods=["GET"]),
        route("2", hosts=["domain.*"]),
    ], [
        (req("GET", "/", "nothing.com"), "1"),
        (req("GET", "/", "domain.com"), "2"),
    ]),
    ("a route's other paths do not win over a longer [uri prefix]", [
        route("1", paths=["/a", "/bbbbbbb"]),
        route("2", paths=["/a/bb"]),
    ], [
        (req("GET", "/a/bb/foobar", "domain.org"), "2"),
        (req("GET", "/a/b", "domain.org"), "1"),
        (req("GET", "/bbbbbbb/x", "domain.org"), "1"),
    ]),
    ("root / [uri] is a catch-all that does not supersede", [
        route("root", paths=["/"]),
    ] + KONG_USE_CASES, [
        (req("GET", "/", "domain.org"), "root"),
        (req("GET", "/my-route", "domain.org"), "3"),
        (req("GET", "/my-route/hello/world", "domain.org"), "3"),
        (req("GET", "/foobar/baz", "domain.org"), "root"),
    ]),
    ("same category with conflicting values", KONG_USE_CASES + [
        route("c%d" % i, hosts=["domain.org"], paths=["/my-uri"])
        for i in range(5)
    ] + [route("target", hosts=["domain.org"], paths=["/my-target-uri"])], [
        (req("GET", "/my-target-uri", "domain.org"), "target"),
        (req("GET", "/my-uri", "domain.org"), "c0"),
    ]),
    ("URI regexes order of evaluation with created_at", [
        route("1", created_at=1234567890, paths=["~/status/(re)"]),
        route("2", created_at=1234567891, paths=["~/status/(r)"]),
        route("3", created_at=1234567892, paths=["/status"]),
    ], [
        (req("GET", "/status/r"), "2"),
        (req("GET", "/status/re"), "1"),
        (req("GET", "/status/x"), "3"),
    ]),
    ("URI regexes order of evaluation with regex_priority", [
        route("1", paths=["~/status/(?P<foo>re)"], regex_priority=0),
        route("2", paths=["~/status/(re)"], regex_priority=4),
        route("3", created_at=1234567890, paths=["~/status/(ab)"]),
        route("4", created_at=1234567891, paths=["~/status/(ab)c?"]),
    ], [
        (req("GET", "/status/re"), "2"),
        (req("GET", "/status/ab"), "3"),
        (req("GET", "/status/abc"), "3"),
    ]),
    ("created_at orders otherwise equal routes, not input order", [
        route("newer", created_at=20, paths=["/same"]),
        route("older", created_at=10, paths=["/same"]),
    ], [
        (req("GET", "/same"), "older"),
    ]),
    ("prefix routes ignore regex_priority", [
        route("short", paths=["/a"], regex_priority=100),
        route("long", paths=["/a/b"]),
    ], [
        (req("GET", "/a/b/c"), "long"),
    ]),
    ("[paths] + [methods] + [hosts] (#5438, host over longer URIs)", [
        route("1", methods=["GET"], hosts=["ahost.test"], paths=[
            "/unrelated/longer/uri/that/should/not/match", "/root/fixture"]),
        route("2", methods=["GET"], hosts=["ahost.test"],
              paths=["/root/fixture/get"]),
        route("3", methods=["GET"], hosts=["anotherhost.test"],
              paths=["/root/fixture/get"]),
        route("4", methods=["GET"], hosts=["onemorehost.test"],
              paths=["/root/fixture/get"]),
        route("5", hosts=["api.local"],
              paths=["/rest/devportal/api/v1", "/rest/devportal"]),
        route("6", hosts=["api.local"], paths=["/rest/devportal/aux"]),
        route("7", hosts=["test-api.local"], paths=["/rest/devportal/aux"]),
        route("8", hosts=["atest-api.local"], paths=["/rest/devportal/aux"]),
        route("9", hosts=["atest-api.local"], paths=["/rest/devportal"]),
    ], [
        (req("GET", "/unrelated/longer/uri/that/should/not/match",
             "ahost.test"), "1"),
        (req("GET", "/root/fixture", "ahost.test"), "1"),
        (req("GET", "/root/fixture/get", "ahost.test"), "2"),
        (req("GET", "/root/fixture/get", "anotherhost.test"), "3"),
        (req("GET", "/root/fixture/get", "onemorehost.test"), "4"),
        (req("GET", "/rest/devportal/api/v1", "api.local"), "5"),
        (req("GET", "/rest/devportal", "api.local"), "5"),
        (req("GET", "/rest/devportal/aux", "api.local"), "6"),
        (req("GET", "/rest/devportal/aux", "test-api.local"), "7"),
        (req("GET", "/rest/devportal/aux", "atest-api.local"), "8"),
        (req("GET", "/rest/devportal", "atest-api.local"), "9"),
        (req("GET", "/", "ahost.test"), None),  # no incomplete URIs
        (req("GET", "/root", "ahost.test"), None),
    ]),
    ("[paths] + [hosts] prioritizes longer URIs", [
        route("1", hosts=["route.com"], paths=[
            "/root/fixture", "/root/fixture/non-matching-but-longer"]),
        route("2", hosts=["route.com"], paths=["/root/fixture/get"]),
    ], [
        (req("GET", "/root/fixture/get", "route.com"), "2"),
    ]),
    ("use cases: methods restrict, method-only as a fallback", [
        route("1", methods=["GET"], protocols=["http"]),
        route("2", methods=["POST", "PUT"], paths=["/post", "/put"],
              protocols=["http"]),
    ], [
        (req("POST", "/post"), "2"),
        (req("DELETE", "/post"), None),
        (req("GET", "/get"), "1"),
    ]),
    ("normalisation: route paths are not normalised", [
        route("1", paths=["/plain/a.b.c"]),
        route("2", paths=["/plain/a.b%58c"]),
        route("3", paths=[r"~/reg%65x/\d+"]),
        route("4", paths=[r"~/regex-meta/%5Cd\+%2E"]),
        route("5", paths=["~/regex-reserved%2Fabc"]),
    ], [
        (req("GET", "/plain/a.b.c", "example.com"), "1"),
        (req("GET", "/plain/a.bXc", "example.com"), None),
        (req("GET", "/plain/a.b%58c", "example.com"), "2"),
        (req("GET", "/plain/aab.c", "example.com"), None),
        (req("GET", "/regex/123", "example.com"), None),
        (req("GET", "/reg%65x/123", "example.com"), "3"),
        (req("GET", "/regex-meta/%5Cd+%2E", "example.com"), "4"),
        (req("GET", "/regex-reserved/abc", "example.com"), None),
        (req("GET", "/regex-reserved%2Fabc", "example.com"), "5"),
    ]),
    ("special characters in paths", [
        route("1", paths=["/\\d"]),
        route("2", paths=['~/\\d+"']),
    ], [
        (req("GET", "/\\d", "domain.org"), "1"),
        (req("GET", '/123"', "domain.org"), "2"),
    ]),
    ("[snis] restrict https requests only", [
        route("sni", hosts=["a.test"], snis=["a.test", "*.wild.test"]),
        route("host", hosts=["a.test"]),
    ], [
        (req("GET", "/", "a.test"), "sni"),
        (req("GET", "/", "a.test", scheme="https", sni="a.test"), "sni"),
        (req("GET", "/", "a.test", scheme="https", sni="x.wild.test"), "sni"),
        (req("GET", "/", "a.test", scheme="https", sni="b.test"), "host"),
        (req("GET", "/", "a.test", scheme="https"), "host"),
    ]),
]


def _flatten() -> List[Tuple[str, int, List[RouteSpec], Request, Any]]:
    rows = []
    for name, routes, requests in SCENARIOS:
        for i, (request, expected) in enumerate(requests):
            rows.append((name, i, routes, request, expected))
    return rows


@pytest.mark.parametrize(
    "name,index,routes,request_,expected", _flatten(),
    ids=["%s #%d" % (row[0], row[1]) for row in _flatten()])
def test_precedence(name: str, index: int, routes: List[RouteSpec],
                    request_: Request, expected: Optional[str]) -> None:
    """The route Kong's traditional router picks is the one kongtx picks."""
    router = Router(routes)
    assert router.errors == []
    match = select(router, request_)
    assert (match.route.id if match else None) == expected
    # asking again is answered from the cache, identically
    match = select(router, request_)
    assert (match.route.id if match else None) == expected


def test_precedence_does_not_depend_on_input_order() -> None:
    """Reversing the route list changes no answer where ties are not involved."""
    routes = [
        route("a", hosts=["x.test"], paths=["/a"], created_at=1),
        route("b", paths=["/a/b/c/d"], created_at=2),
        route("c", paths=[r"~/a/\d+"], regex_priority=3, created_at=3),
        route("d", paths=[r"~/a/1"], created_at=4),
        route("e", methods=["GET"], created_at=5),
    ]
    requests = [
        (req("GET", "/a/b/c/d", "x.test"), "a"),
        (req("GET", "/a/b/c/d", "y.test"), "b"),
        (req("GET", "/a/1", "y.test"), "c"),
        (req("GET", "/z", "y.test"), "e"),
    ]
    for ordered in (routes, list(reversed(routes))):
        router = Router(ordered)
        for request_, expected in requests:
            match = select(router, request_)
            assert match is not None and match.route.id == expected


# --------------------------------------------------------------------------
# Captures, prefixes, strip_path

CAPTURE_CASES = [
    ("~/users/(?P<user_id>\\d+)/profile/?(?P<scope>[a-z]*)",
     "/users/1984/profile",
     {0: "/users/1984/profile", 1: "1984", 2: "", "user_id": "1984",
      "scope": ""}),
    ("~/users/(?P<user_id>\\d+)/profile/?(?P<scope>[a-z]*)",
     "/users/1984/profile/email",
     {0: "/users/1984/profile/email", 1: "1984", 2: "email",
      "user_id": "1984", "scope": "email"}),
    # PCRE spelling of named groups
    ("~/users/(?<user_id>\\d+)", "/users/7/x",
     {0: "/users/7", 1: "7", "user_id": "7"}),
    # optional group that did not participate (Kong #13014)
    ("~/(users/)?1984/(?<subpath>profile)$", "/1984/profile",
     {0: "/1984/profile", 1: None, 2: "profile", "subpath": "profile"}),
    ("~/users/\\d+/profile", "/users/1984/profile", None),
]


@pytest.mark.parametrize("pattern,path,expected", CAPTURE_CASES)
def test_uri_captures(pattern: str, path: str, expected: Any) -> None:
    """Regex captures: 0 = whole match, numbered and named groups."""
    router = Router([route("1", paths=[pattern])])
    match = router.select("GET", "domain.org", path)
    assert match is not None
    assert match.uri_captures == expected


def test_uri_captures_are_taken_on_the_normalised_path() -> None:
    """Captures see the decoded path (Kong #7913)."""
    router = Router([route("1", paths=[
        "~/users/(?P<fullname>[a-zA-Z\\s\\d%]+)/profile/?(?P<scope>[a-z]*)"])])
    path = uri.normalize("/users/%6aohn%20doe/profile")
    match = router.select("GET", "domain.org", path)
    assert match is not None and match.uri_captures is not None
    assert match.uri_captures["fullname"] == "john doe"
    assert match.uri_captures[0] == "/users/john doe/profile"


def test_prefix_match_has_no_captures() -> None:
    """A prefix path gives no uri_captures."""
    match = Router([route("1", paths=["/hello"])]).select(
        "GET", "domain.org", "/hello/world")
    assert match is not None
    assert match.uri_captures is None
    assert match.matched_prefix == "/hello"
    assert match.upstream_path(None, "/hello/world") == "/world"


def test_cached_captures_are_not_shared() -> None:
    """Mutating the captures of one answer does not leak into the next."""
    router = Router([route("1", paths=["~/u/(?P<id>\\d+)"])])
    first = router.select("GET", "h", "/u/1")
    assert first is not None and first.uri_captures is not None
    first.uri_captures["id"] = "evil"
    second = router.select("GET", "h", "/u/1")
    assert second is not None and second.uri_captures == \
        {0: "/u/1", 1: "1", "id": "1"}


STRIP_CASES = [
    # paths, strip, method, path, prefix, stripped_prefix, upstream
    (["/my-route", "/xx-route"], True, "/my-route/hello/world",
     "/my-route", "/my-route", "/hello/world"),
    (["/my-route", "/xx-route"], True, "/my-route", "/my-route", "/my-route",
     "/"),
    (["/my-route", "/xx-route"], True, "/xx-route", "/xx-route", "/xx-route",
     "/"),
    (["/my-route"], False, "/my-route/hello/world", "/my-route", None,
     "/my-route/hello/world"),
    (["/"], True, "/my-route/hello/world", "/", None,
     "/my-route/hello/world"),
    (["/endel%2Fst"], True, "/endel%2Fst", "/endel%2Fst", "/endel%2Fst", "/"),
    (["~/users/\\d+/profile"], True, "/users/123/profile/hello/world",
     "/users/123/profile", "/users/123/profile", "/hello/world"),
    (["~/users/(\\d+)/profile"], True, "/users/123/profile/hello/world",
     "/users/123/profile", "/users/123/profile", "/hello/world"),
    (["~/foo|/bar"], True, "/bar/x", "/bar", "/bar", "/x"),
    (None, True, "/a/b", None, None, "/a/b"),
]


@pytest.mark.parametrize(
    "paths,strip,path,prefix,stripped,upstream", STRIP_CASES)
def test_strip_path(paths: Optional[List[str]], strip: bool, path: str,
                    prefix: Optional[str], stripped: Optional[str],
                    upstream: str) -> None:
    """matched_prefix, stripped_prefix and the upstream path (service /)."""
    spec = route("1", paths=paths, strip_path=strip,
                 hosts=None if paths else ["h"])
    match = Router([spec]).select("GET", "h", path)
    assert match is not None
    assert match.matched_prefix == prefix
    assert match.stripped_prefix == stripped
    assert match.upstream_path("/", path) == upstream


# --------------------------------------------------------------------------
# Protocols, errors, row parsing, cache

def test_https_only_route_over_http_asks_for_a_redirect() -> None:
    """An https-only route hit over http is matched with https_redirect."""
    router = Router([
        route("tls", paths=["/secure"], protocols=["https"],
              https_redirect_status_code=301),
        route("both", paths=["/open"]),
    ])
    plain = router.select("GET", "h", "/secure")
    assert plain is not None and plain.https_redirect
    assert plain.route.https_redirect_status_code == 301
    tls = router.select("GET", "h", "/secure", scheme="https")
    assert tls is not None and not tls.https_redirect
    both = router.select("GET", "h", "/open")
    assert both is not None and not both.https_redirect


def test_stream_and_grpc_routes_are_not_routed() -> None:
    """tcp/tls/udp/tls_passthrough/grpc(s)-only routes are left out silently."""
    router = Router([
        route("tcp", protocols=["tcp", "tls"], snis=["a.test"]),
        route("pass", protocols=["tls_passthrough"], snis=["a.test"]),
        route("grpc", protocols=["grpc", "grpcs"], paths=["/"]),
    ])
    assert router.errors == []
    assert router.select("GET", "a.test", "/", scheme="https",
                         sni="a.test") is None


@pytest.mark.parametrize("pattern", [
    "~/(unclosed", "~/a{2,1}", "~/(?<bad-name>x)", "~/x(?P=nope)",
])
def test_invalid_regex_is_skipped_and_reported(pattern: str) -> None:
    """A path Python cannot compile drops its route into Router.errors."""
    router = Router([route("bad", paths=["/ok", pattern]),
                     route("good", paths=["/"])])
    assert [e[0] for e in router.errors] == ["bad"]
    assert router.errors[0][1].startswith("invalid regex: '")
    match = router.select("GET", "h", "/ok")
    assert match is not None and match.route.id == "good"


def test_regex_path_error_for_the_admin_api() -> None:
    """regex_path_error() gives the Router.errors message, or None."""
    assert regex_path_error("~/users/(?<id>\\d+)") is None
    assert regex_path_error("~/(unclosed") == (
        "invalid regex: '/(unclosed' (Python re returned: "
        "missing ), unterminated subpattern at position 1)")


def test_route_without_fields_is_reported() -> None:
    """A route with no methods/hosts/headers/paths/snis cannot be categorised."""
    router = Router([route("empty")])
    assert router.errors == [("empty", "could not categorize route")]


TRANSLATE_CASES = [
    ("/(?<id>\\d+)", "/(?P<id>\\d+)"),
    ("/(?'id'\\d+)", "/(?P<id>\\d+)"),
    ("/(?<a>x)\\k<a>", "/(?P<a>x)(?P=a)"),
    ("/(?<a>x)\\k{a}\\k'a'", "/(?P<a>x)(?P=a)(?P=a)"),
    ("/(?<=a)b(?<!c)", "/(?<=a)b(?<!c)"),
    ("/\\(?<x>", "/\\(?<x>"),
    ("/[(?<x>]", "/[(?<x>]"),
    ("/[]a](?<n>b)", "/[]a](?P<n>b)"),
    ("/end\\z", "/end\\Z"),
    ("/\\\\(?<n>b)", "/\\\\(?P<n>b)"),
]


@pytest.mark.parametrize("pcre,python", TRANSLATE_CASES)
def test_translate_regex(pcre: str, python: str) -> None:
    """PCRE-only spellings are rewritten; escapes and classes are respected."""
    assert translate_regex(pcre) == python


def test_regex_classes_are_ascii_like_pcre() -> None:
    """\\d matches ASCII digits only, as PCRE without UCP."""
    router = Router([route("1", paths=["~/n/\\d+$"])])
    assert router.select("GET", "h", "/n/42") is not None
    assert router.select("GET", "h", "/n/\u0664\u0662") is None


def test_from_row() -> None:
    """from_row reads Kong's JSON shape, nulls and all."""
    spec = RouteSpec.from_row({
        "id": "r", "name": "n", "created_at": 5, "updated_at": 6,
        "protocols": ["https"], "methods": ["get"], "hosts": ["A.Test"],
        "paths": ["/x"], "headers": {"X-Version": ["V1", "~*^Ab\\S"]},
        "snis": ["A.test"], "strip_path": False, "preserve_host": True,
        "regex_priority": 3, "path_handling": "v1",
        "https_redirect_status_code": 308, "service": {"id": "s"},
        "request_buffering": False, "response_buffering": None,
        "sources": None, "destinations": None, "tags": ["t"],
    })
    assert spec == RouteSpec(
        id="r", name="n", created_at=5, protocols=("https",),
        methods=("GET",), hosts=("a.test",), paths=("/x",),
        headers=(("x-version", ("v1", "~*^Ab\\S")),), snis=("a.test",),
        strip_path=False, preserve_host=True, regex_priority=3,
        path_handling="v1", https_redirect_status_code=308, service_id="s",
        request_buffering=False, response_buffering=True)
    nulls = RouteSpec.from_row({
        "id": "r", "name": None, "created_at": 1, "protocols": ["http"],
        "methods": None, "hosts": None, "paths": None, "headers": None,
        "snis": None, "strip_path": True, "preserve_host": False,
        "regex_priority": 0, "path_handling": "v0",
        "https_redirect_status_code": 426, "service": None,
    })
    assert (nulls.methods, nulls.hosts, nulls.paths, nulls.headers,
            nulls.snis, nulls.service_id) == ((), (), (), (), (), None)


def test_header_regex_value_keeps_its_case() -> None:
    """A ~* header value is a regex on the lower-cased request value."""
    router = Router([route("1", headers={"x-agent": ["~*^curl/\\S+$"]})])
    assert router.uses_headers
    assert router.select("GET", "h", "/",
                         headers={"x-agent": ["CURL/8.1"]}) is not None
    assert router.select("GET", "h", "/",
                         headers={"x-agent": ["curl/ 8"]}) is None


def test_uses_headers_is_false_without_header_routes() -> None:
    """Callers can skip building the headers mapping."""
    assert not Router([route("1", paths=["/"])]).uses_headers


def test_cache_is_bounded_and_keyed_on_headers() -> None:
    """The LRU never exceeds its size; header values are part of its key."""
    router = Router([route("v1", headers={"version": ["v1"]}),
                     route("any", paths=["/"])], cache_size=3)
    for i in range(10):
        router.select("GET", "h", "/%d" % i, headers={"version": ["v1"]})
    assert len(router._cache) == 3
    hit = router.select("GET", "h", "/x", headers={"version": ["v1"]})
    miss = router.select("GET", "h", "/x", headers={"version": ["v2"]})
    assert hit is not None and hit.route.id == "v1"
    assert miss is not None and miss.route.id == "any"


def test_headers_given_as_plain_strings() -> None:
    """A header mapping may hold a plain string instead of a list."""
    router = Router([route("1", headers={"version": ["v1"]})])
    headers: Mapping[str, Sequence[str]] = {"version": "V1"}
    assert router.select("GET", "h", "/", headers=headers) is not None
