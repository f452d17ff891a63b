"""Tests for kongtx.config: kong.conf parsing, env overrides, validation, listen specs."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest

from kongtx import tls
from kongtx.config import (
    DEFAULT_PATHS,
    PROPERTIES,
    ConfigError,
    ListenSpec,
    load_config,
    parse_listen,
)


def _load(tmp_path, text=None, env=None, prefix=None):
    path = None
    if text is not None:
        path = tmp_path / "kong.conf"
        path.write_text(text)
        path = str(path)
    return load_config(path, env=env or {}, prefix=prefix, search_paths=())


def _error(tmp_path, text=None, env=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text, env)
    return info.value


# --- defaults ---------------------------------------------------------------------


def test_defaults_match_kong_and_kongtx_choices(tmp_path):
    """With no file and no env every property takes its documented default."""
    c = _load(tmp_path)
    assert c.prefix == "/usr/local/kong"
    assert c.log_level == "notice"
    assert c.proxy_access_log == "logs/access.log"
    assert c.admin_error_log == "logs/error.log"
    assert c.plugins == ("bundled",)
    assert c.anonymous_reports is True
    assert c.proxy_listen == (
        ListenSpec("0.0.0.0", 8000, reuseport=True, backlog=16384),
        ListenSpec("0.0.0.0", 8443, ssl=True, http2=True, reuseport=True, backlog=16384),
    )
    assert c.admin_listen == (
        ListenSpec("127.0.0.1", 8001, reuseport=True, backlog=16384),
        ListenSpec("127.0.0.1", 8444, ssl=True, http2=True, reuseport=True, backlog=16384),
    )
    assert c.status_listen == ()
    assert c.nginx_worker_processes == "auto"
    assert c.ssl_cipher_suite == "intermediate"
    assert c.ssl_ciphers == tls.INTERMEDIATE_CIPHERS
    assert c.ssl_protocols == ("TLSv1.2", "TLSv1.3")
    assert c.ssl_cert == () and c.ssl_cert_key == ()
    assert c.headers == frozenset(
        {
            "Server",
            "Via",
            "X-Kong-Proxy-Latency",
            "X-Kong-Response-Latency",
            "X-Kong-Upstream-Latency",
            "X-Kong-Admin-Latency",
            "X-Kong-Request-Id",
        }
    )
    assert c.headers_upstream == frozenset({"X-Kong-Request-Id"})
    assert c.trusted_ips == () and c.trusts_unix is False
    assert c.real_ip_header == "X-Real-IP" and c.real_ip_recursive is False
    assert c.error_default_type == "text/plain"
    assert (
        c.upstream_keepalive_pool_size,
        c.upstream_keepalive_max_requests,
        c.upstream_keepalive_idle_timeout,
    ) == (512, 10000, 60)
    assert c.allow_debug_header is False
    assert c.nginx_http_client_max_body_size == 128 * 1024 * 1024
    assert c.nginx_http_client_header_timeout == 60.0
    assert c.nginx_admin_client_max_body_size == 10 * 1024 * 1024
    assert c.lua_max_req_headers == 100
    assert c.client_max_header_size == 32 * 1024
    assert c.database == "sqlite"
    assert c.sqlite_path == "/usr/local/kong/kongtx.db"
    assert (c.pg_host, c.pg_port, c.pg_timeout, c.pg_user, c.pg_database) == (
        "127.0.0.1",
        5432,
        5000,
        "kong",
        "kong",
    )
    assert c.pg_password is None and c.pg_schema is None
    assert c.pg_ssl is False and c.pg_ssl_verify is False
    assert c.pg_max_concurrent_queries == 0 and c.pg_semaphore_timeout == 60000
    assert c.declarative_config is None
    assert c.db_update_frequency == 5 and c.db_update_propagation == 0
    assert c.db_cache_ttl == 0 and c.db_cache_neg_ttl is None
    assert c.db_resurrect_ttl == 30
    assert c.router_flavor == "traditional_compatible"
    assert c.lua_ssl_trusted_certificate == ("system",)
    assert c.lua_ssl_verify_depth == 1
    assert c.worker_consistency == "eventual"
    assert c.worker_state_update_frequency == 5
    assert c.node_id is None
    assert c.unknown_properties == () and c.source_path is None


def test_default_config_file_is_kong_conf_default(tmp_path):
    """etc/kong.conf.default loads cleanly and every property it lists is known."""
    here = os.path.dirname(os.path.abspath(__file__))
    default_file = os.path.join(here, os.pardir, "etc", "kong.conf.default")
    text = open(default_file).read()
    uncommented = "\n".join(
        line[1:] for line in text.splitlines() if line.startswith("#") and " = " in line
        and not line.startswith("# ")
    )
    names = {line.split("=")[0].strip() for line in uncommented.splitlines()}
    assert names == set(PROPERTIES)
    c = _load(tmp_path, uncommented)
    assert c.unknown_properties == ()
    assert c == _load(tmp_path, "")


def test_search_paths_first_existing_file_wins(tmp_path):
    """Without a path the first existing file of the search list is read."""
    second = tmp_path / "second.conf"
    second.write_text("log_level = debug\n")
    c = load_config(
        None, env={}, search_paths=(str(tmp_path / "missing.conf"), str(second))
    )
    assert c.log_level == "debug"
    assert c.source_path == str(second)
    assert DEFAULT_PATHS == ("/etc/kong/kong.conf", "/etc/kong.conf")


# --- file syntax, env and prefix ---------------------------------------------------


def test_file_syntax_comments_escapes_blank_values(tmp_path):
    """kong.conf syntax: '#' comments (inline too), '\\#' is literal, values may be empty."""
    c = _load(
        tmp_path,
        "# a comment\n"
        "\n"
        "   log_level   =   debug    # trailing comment\n"
        "pg_password = se\\#cret # comment\n"
        "pg_schema =\n"
        "real_ip_header=X-Forwarded-For\n",
    )
    assert c.log_level == "debug"
    assert c.pg_password == "se#cret"
    assert c.pg_schema is None
    assert c.real_ip_header == "X-Forwarded-For"


def test_unknown_properties_are_collected_not_fatal(tmp_path):
    """Unknown names are ignored but listed once each, in file order."""
    c = _load(tmp_path, "nginx_user = kong\nmem_cache_size = 128m\nnginx_user = x\n")
    assert c.unknown_properties == ("nginx_user", "mem_cache_size")


def test_env_overrides_file_and_prefix_overrides_both(tmp_path):
    """KONG_<NAME> beats the file; the prefix argument beats KONG_PREFIX."""
    text = "log_level = debug\nprefix = /from/file\npg_port = 5433\n"
    c = _load(tmp_path, text, env={"KONG_LOG_LEVEL": " error ", "KONG_PREFIX": "/from/env"})
    assert c.log_level == "error"
    assert c.prefix == "/from/env"
    assert c.pg_port == 5433
    c = _load(tmp_path, text, env={"KONG_PREFIX": "/from/env"}, prefix="/from/arg/")
    assert c.prefix == "/from/arg"
    assert c.sqlite_path == "/from/arg/kongtx.db"


def test_prefix_is_absolute_without_trailing_slash(tmp_path):
    """A relative prefix is made absolute; prefix_path builds paths inside it."""
    c = _load(tmp_path, prefix="relative/dir/")
    assert c.prefix == os.path.abspath("relative/dir")
    assert c.prefix_path("logs", "error.log") == os.path.join(c.prefix, "logs", "error.log")
    assert c.prefix_path("/var/log/x.log") == "/var/log/x.log"


def test_sqlite_path_relative_to_prefix_unless_absolute(tmp_path):
    """sqlite_path resolves inside the prefix, an absolute path is kept."""
    assert _load(tmp_path, env={"KONG_SQLITE_PATH": "db/k.db"}, prefix="/p").sqlite_path == "/p/db/k.db"
    assert _load(tmp_path, env={"KONG_SQLITE_PATH": "/abs/k.db"}, prefix="/p").sqlite_path == "/abs/k.db"


def test_missing_explicit_file_is_an_error(tmp_path):
    """An explicit path that does not exist gives a 'conf:' error."""
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.conf"), env={})
    assert info.value.property == "conf"
    assert str(info.value).startswith("conf: no file at ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_an_error(tmp_path):
    """A file that cannot be read gives a 'conf:' error."""
    path = tmp_path / "kong.conf"
    path.write_text("log_level = debug\n")
    path.chmod(0)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert info.value.property == "conf"


def test_line_without_equals_is_an_error(tmp_path):
    """A non-comment line that is not 'name = value' is rejected with its line number."""
    err = _error(tmp_path, "log_level = debug\njust words\n")
    assert err.property == "conf"
    assert ":2: expected 'name = value'" in err.problem


def test_config_error_str_is_one_line():
    """str(ConfigError) is '<property>: <problem>'."""
    err = ConfigError("pg_port", "must be an integer between 1 and 65535, got '0'")
    assert str(err) == "pg_port: must be an integer between 1 and 65535, got '0'"
    assert (err.property, err.problem) == ("pg_port", err.problem)


# --- value types ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("on", True), ("ON", True), ("true", True), ("True", True),
     ("off", False), ("OFF", False), ("false", False), ("FALSE", False)],
)
def test_booleans(tmp_path, text, expected):
    """Booleans accept on/off/true/false in any case."""
    assert _load(tmp_path, env={"KONG_PG_SSL": text}).pg_ssl is expected


@pytest.mark.parametrize("text", ["yes", "1", "", "onn"])
def test_bad_booleans(tmp_path, text):
    """Anything else is an error naming the property."""
    err = _error(tmp_path, env={"KONG_PG_SSL": text})
    assert err.property == "pg_ssl"


@pytest.mark.parametrize("text", ["+1", "1_0", "-1", "1.5", "0x10", "١٢", "", "1e3", "9" * 30])
def test_integers_must_be_plain_digits(tmp_path, text):
    """Integers are ASCII digits only: no sign, underscore, exponent or unicode digits."""
    err = _error(tmp_path, env={"KONG_PG_TIMEOUT": text})
    assert err.property == "pg_timeout"


def test_integer_with_surrounding_whitespace_is_trimmed_in_file(tmp_path):
    """Whitespace around a value is trimmed, so ' 1' in a file is 1 (the value is '1')."""
    assert _load(tmp_path, "pg_timeout =  1  \n").pg_timeout == 1


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("pg_port", "0", "pg_port: must be an integer between 1 and 65535, got '0'"),
        ("pg_port", "65536", "pg_port: must be an integer between 1 and 65535, got '65536'"),
        ("lua_max_req_headers", "0", "lua_max_req_headers: must be an integer between 1 and 1000, got '0'"),
        ("lua_max_req_headers", "1001", "lua_max_req_headers: must be an integer between 1 and 1000, got '1001'"),
        ("upstream_keepalive_pool_size", "-1", "upstream_keepalive_pool_size: invalid integer '-1'"),
        ("nginx_worker_processes", "0", "nginx_worker_processes: must be 'auto' or a positive integer, got '0'"),
        ("nginx_http_client_header_timeout", "1h2", "nginx_http_client_header_timeout: invalid time '1h2' (expected e.g. 10s, 500ms or 1m)"),
        ("nginx_main_worker_shutdown_timeout", "soon", "nginx_main_worker_shutdown_timeout: invalid time 'soon' (expected e.g. 10s, 500ms or 1m)"),
        ("log_level", "verbose", "log_level: invalid log level 'verbose' (expected debug, info, notice, warn, error, crit, alert or emerg)"),
        ("database", "x", "database: unknown database 'x' (expected sqlite, postgres or off)"),
        ("database", "cassandra", "database: unknown database 'cassandra' (expected sqlite, postgres or off)"),
        ("router_flavor", "expressions", "router_flavor: 'expressions' is not supported by kongtx"),
        ("router_flavor", "fancy", "router_flavor: invalid value 'fancy' (expected traditional or traditional_compatible)"),
        ("error_default_type", "text/xml", "error_default_type: invalid value 'text/xml' (expected text/plain, text/html, application/json or application/xml)"),
        ("ssl_cipher_suite", "strong", "ssl_cipher_suite: invalid value 'strong' (expected modern, intermediate, old or custom)"),
        ("ssl_protocols", "TLSv1 TLSv1.2", "ssl_protocols: unsupported protocol 'TLSv1' (expected TLSv1.1, TLSv1.2 or TLSv1.3)"),
        ("ssl_protocols", "", "ssl_protocols: must list at least one of TLSv1.1, TLSv1.2, TLSv1.3"),
        ("headers", "X-Powered-By", "headers: invalid header 'X-Powered-By'"),
        ("headers", "off, Server", "headers: 'off' cannot be combined with other values"),
        ("headers_upstream", "Server", "headers_upstream: invalid header 'Server'"),
        ("trusted_ips", "10.0.0.0/33", "trusted_ips: invalid IP address or CIDR range '10.0.0.0/33'"),
        ("trusted_ips", "example.com", "trusted_ips: invalid IP address or CIDR range 'example.com'"),
        ("nginx_http_client_max_body_size", "10mb", "nginx_http_client_max_body_size: invalid size '10mb' (expected e.g. 512, 16k, 10m, 1g)"),
        ("client_max_header_size", "0", "client_max_header_size: must be greater than 0"),
        ("db_update_frequency", "0", "db_update_frequency: must be greater than 0, got '0'"),
        ("db_cache_ttl", "-5", "db_cache_ttl: invalid number '-5'"),
        ("node_id", "not-a-uuid", "node_id: must be a valid UUID, got 'not-a-uuid'"),
        ("worker_consistency", "sometimes", "worker_consistency: invalid value 'sometimes' (expected strict or eventual)"),
        ("real_ip_header", "", "real_ip_header: must not be empty"),
        ("ssl_cipher_suite", "custom", "ssl_ciphers: must be specified when ssl_cipher_suite is 'custom'"),
        ("proxy_listen", "0.0.0.0:99999", "proxy_listen: invalid port '99999' in '0.0.0.0:99999'"),
    ],
)
def test_validation_errors_name_the_property(tmp_path, name, text, message):
    """Each bad value gives one line: '<property>: <problem>'."""
    err = _error(tmp_path, env={"KONG_" + name.upper(): text})
    assert str(err) == message


@pytest.mark.parametrize(
    "text, expected",
    [("0", 0), ("512", 512), ("16k", 16 * 1024), ("16K", 16 * 1024),
     ("10m", 10 * 1024**2), ("1g", 1024**3), ("1G", 1024**3)],
)
def test_sizes(tmp_path, text, expected):
    """Sizes take k/m/g suffixes (any case); 0 means unlimited for the body size."""
    c = _load(tmp_path, env={"KONG_NGINX_HTTP_CLIENT_MAX_BODY_SIZE": text})
    assert c.nginx_http_client_max_body_size == expected


def test_numbers_accept_decimals(tmp_path):
    """db_* durations are numbers: integers or decimals."""
    c = _load(tmp_path, env={"KONG_DB_UPDATE_FREQUENCY": "0.5", "KONG_DB_CACHE_NEG_TTL": "30"})
    assert c.db_update_frequency == 0.5
    assert c.db_cache_neg_ttl == 30


def test_lists_are_comma_separated_and_trimmed(tmp_path):
    """plugins is a comma list with whitespace trimmed; 'off' is empty."""
    c = _load(tmp_path, env={"KONG_PLUGINS": " bundled ,  my-plugin,"})
    assert c.plugins == ("bundled", "my-plugin")
    assert _load(tmp_path, env={"KONG_PLUGINS": "off"}).plugins == ()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("off", frozenset()),
        ("", frozenset()),
        ("server_tokens", frozenset({"Server", "Via"})),
        ("SERVER_TOKENS", frozenset({"Server", "Via"})),
        ("latency_tokens", frozenset({"X-Kong-Proxy-Latency", "X-Kong-Response-Latency",
                                      "X-Kong-Upstream-Latency", "X-Kong-Admin-Latency"})),
        ("server, x-kong-upstream-status", frozenset({"Server", "X-Kong-Upstream-Status"})),
        ("X-KONG-REQUEST-ID, via", frozenset({"X-Kong-Request-Id", "Via"})),
    ],
)
def test_headers(tmp_path, text, expected):
    """headers expands token groups and canonicalises names case-insensitively."""
    assert _load(tmp_path, env={"KONG_HEADERS": text}).headers == expected


def test_headers_upstream(tmp_path):
    """headers_upstream accepts only X-Kong-Request-Id or off."""
    assert _load(tmp_path, env={"KONG_HEADERS_UPSTREAM": "off"}).headers_upstream == frozenset()
    assert _load(tmp_path, env={"KONG_HEADERS_UPSTREAM": "x-kong-request-id"}).headers_upstream == {
        "X-Kong-Request-Id"
    }


def test_trusted_ips(tmp_path):
    """trusted_ips holds networks (addresses become /32 or /128); 'unix:' sets trusts_unix."""
    c = _load(tmp_path, env={"KONG_TRUSTED_IPS": "10.0.0.0/8, 192.168.1.7, ::1, 2001:db8::/32, unix:"})
    assert c.trusted_ips == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert c.trusts_unix is True
    everything = _load(tmp_path, env={"KONG_TRUSTED_IPS": "0.0.0.0/0,::/0"})
    assert ipaddress.ip_address("203.0.113.9") in everything.trusted_ips[0]
    assert everything.trusts_unix is False


def test_node_id_is_normalised(tmp_path):
    """node_id is validated as a UUID and stored lower-case."""
    c = _load(tmp_path, env={"KONG_NODE_ID": "0F6A2C52-2A7E-4F3B-8D3A-1C2B3D4E5F60"})
    assert c.node_id == "0f6a2c52-2a7e-4f3b-8d3a-1c2b3d4e5f60"


def test_env_value_comment_is_stripped_like_kong(tmp_path):
    """As in Kong, an unescaped '#' starts a comment in env values too; '\\#' is literal."""
    c = _load(tmp_path, env={"KONG_PG_PASSWORD": "a\\#b # comment"})
    assert c.pg_password == "a#b"


# --- listen specs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("off", ()),
        ("127.0.0.1:8000", (ListenSpec("127.0.0.1", 8000),)),
        ("*:8000", (ListenSpec("0.0.0.0", 8000),)),
        ("localhost:0", (ListenSpec("localhost", 0),)),
        ("[::]:8443 ssl http2", (ListenSpec("::", 8443, ssl=True, http2=True),)),
        ("[::1]:80 reuseport backlog=10", (ListenSpec("::1", 80, reuseport=True, backlog=10),)),
        (
            "0.0.0.0:8000 proxy_protocol deferred bind ipv6only=on so_keepalive=30m:10:3",
            (ListenSpec("0.0.0.0", 8000, ignored_flags=(
                "proxy_protocol", "deferred", "bind", "ipv6only=on", "so_keepalive=30m:10:3")),),
        ),
        (
            " 0.0.0.0:1 ssl ,  0.0.0.0:2 so_keepalive=on ",
            (ListenSpec("0.0.0.0", 1, ssl=True),
             ListenSpec("0.0.0.0", 2, ignored_flags=("so_keepalive=on",))),
        ),
    ],
)
def test_parse_listen(value, expected):
    """Kong's listen syntax: address:port then flags; nginx-only flags are kept as ignored."""
    assert parse_listen("proxy_listen", value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.0.0.0:99999", "proxy_listen: invalid port '99999' in '0.0.0.0:99999'"),
        ("0.0.0.0:+80", "proxy_listen: invalid port '+80' in '0.0.0.0:+80'"),
        ("0.0.0.0", "proxy_listen: missing port in '0.0.0.0' (expected <ip>:<port>)"),
        ("8000", "proxy_listen: missing port in '8000' (expected <ip>:<port>)"),
        ("example.com:80", "proxy_listen: invalid address 'example.com' in 'example.com:80'"),
        ("::1:80", "proxy_listen: invalid address '::1' in '::1:80'"),
        ("[::g]:80", "proxy_listen: invalid IPv6 address '::g' in '[::g]:80'"),
        ("[::1]80", "proxy_listen: invalid address '[::1]80' in '[::1]80'"),
        ("0.0.0.0:80 spdy", "proxy_listen: invalid flag 'spdy' in '0.0.0.0:80 spdy'"),
        ("0.0.0.0:80 backlog=x", "proxy_listen: invalid backlog 'x' in '0.0.0.0:80 backlog=x'"),
        ("0.0.0.0:80 ipv6only=maybe", "proxy_listen: invalid flag 'ipv6only=maybe' in '0.0.0.0:80 ipv6only=maybe'"),
        ("0.0.0.0:80, off", "proxy_listen: 'off' cannot be combined with other entries"),
        ("0.0.0.0:80,", "proxy_listen: empty entry in '0.0.0.0:80,'"),
        ("", "proxy_listen: must be 'off' or a list of '<ip>:<port> [flags]' entries"),
    ],
)
def test_parse_listen_errors(value, message):
    """Bad listen entries name the property and the offending entry."""
    with pytest.raises(ConfigError) as info:
        parse_listen("proxy_listen", value)
    assert str(info.value) == message


def test_listener_string_uses_kong_flag_order():
    """The canonical listener string orders flags as Kong does and brackets IPv6."""
    (spec,) = parse_listen("admin_listen", "[::1]:8444 reuseport http2 backlog=5 ssl deferred")
    assert spec.listener == "[::1]:8444 ssl http2 deferred reuseport backlog=5"
    assert spec.address == "[::1]:8444"


# --- TLS properties ---------------------------------------------------------------


@pytest.fixture
def pairs(tmp_path):
    """Two distinct self-signed certificate/key pairs."""
    a = tls.ensure_default_certificate(str(tmp_path / "a"))
    b = tls.ensure_default_certificate(str(tmp_path / "b"))
    return a, b


def test_ssl_cert_pairs_are_checked(tmp_path, pairs):
    """Matching cert/key lists load and are stored as absolute paths."""
    (cert_a, key_a), (cert_b, key_b) = pairs
    c = _load(tmp_path, env={
        "KONG_SSL_CERT": f"{cert_a}, {cert_b}",
        "KONG_SSL_CERT_KEY": f"{key_a},{key_b}",
        "KONG_ADMIN_SSL_CERT": cert_b,
        "KONG_ADMIN_SSL_CERT_KEY": key_b,
    })
    assert c.ssl_cert == (cert_a, cert_b)
    assert c.ssl_cert_key == (key_a, key_b)
    assert c.admin_ssl_cert == (cert_b,)


def test_ssl_cert_errors(tmp_path, pairs):
    """Mismatched keys, missing files, unequal lists and half-set pairs are errors."""
    (cert_a, key_a), (cert_b, key_b) = pairs
    err = _error(tmp_path, env={"KONG_SSL_CERT": cert_a, "KONG_SSL_CERT_KEY": key_b})
    assert err.property == "ssl_cert_key"
    assert err.problem == f"key in {key_b} does not match the certificate in {cert_a}"
    err = _error(tmp_path, env={"KONG_SSL_CERT": "/nope.crt", "KONG_SSL_CERT_KEY": key_a})
    assert err.property == "ssl_cert"
    assert err.problem.startswith("failed loading certificate from /nope.crt")
    err = _error(tmp_path, env={"KONG_ADMIN_SSL_CERT": cert_a, "KONG_ADMIN_SSL_CERT_KEY": "/nope.key"})
    assert err.property == "admin_ssl_cert_key"
    err = _error(tmp_path, env={"KONG_SSL_CERT": cert_a})
    assert str(err) == "ssl_cert_key: must be specified when ssl_cert is set"
    err = _error(tmp_path, env={"KONG_SSL_CERT_KEY": key_a})
    assert str(err) == "ssl_cert: must be specified when ssl_cert_key is set"
    err = _error(tmp_path, env={"KONG_SSL_CERT": f"{cert_a},{cert_b}", "KONG_SSL_CERT_KEY": key_a})
    assert str(err) == "ssl_cert_key: lists 1 keys but ssl_cert lists 2 certificates"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not pem")
    err = _error(tmp_path, env={"KONG_SSL_CERT": str(garbage), "KONG_SSL_CERT_KEY": key_a})
    assert str(err) == f"ssl_cert: failed loading certificate from {garbage}"


def test_cipher_suites(tmp_path):
    """A named suite sets the effective cipher string; custom needs a usable string."""
    assert _load(tmp_path, env={"KONG_SSL_CIPHER_SUITE": "old"}).ssl_ciphers == tls.OLD_CIPHERS
    c = _load(tmp_path, env={"KONG_SSL_CIPHER_SUITE": "custom",
                             "KONG_SSL_CIPHERS": "ECDHE-RSA-AES128-GCM-SHA256"})
    assert c.ssl_ciphers == "ECDHE-RSA-AES128-GCM-SHA256"
    err = _error(tmp_path, env={"KONG_SSL_CIPHER_SUITE": "custom", "KONG_SSL_CIPHERS": "NOPE"})
    assert str(err) == "ssl_ciphers: no usable cipher in 'NOPE'"


def test_ssl_protocols_are_ordered_and_deduplicated(tmp_path):
    """ssl_protocols is a whitespace list kept in version order."""
    c = _load(tmp_path, env={"KONG_SSL_PROTOCOLS": "TLSv1.3 TLSv1.1  TLSv1.3"})
    assert c.ssl_protocols == ("TLSv1.1", "TLSv1.3")


def test_lua_ssl_trusted_certificate(tmp_path, pairs):
    """'system' is kept; PEM files are checked and made absolute; a bad file is an error."""
    (cert_a, _), _ = pairs
    c = _load(tmp_path, env={"KONG_LUA_SSL_TRUSTED_CERTIFICATE": f"system, {cert_a}"})
    assert c.lua_ssl_trusted_certificate == ("system", cert_a)
    err = _error(tmp_path, env={"KONG_LUA_SSL_TRUSTED_CERTIFICATE": "/no/ca.pem"})
    assert err.property == "lua_ssl_trusted_certificate"


# --- sanitized --------------------------------------------------------------------


def test_sanitized_is_json_and_hides_secrets(tmp_path):
    """sanitized() is JSON-able, lists every property and masks pg_password."""
    c = _load(tmp_path, env={"KONG_PG_PASSWORD": "hunter2", "KONG_TRUSTED_IPS": "10.0.0.0/8,unix:"})
    out = json.loads(json.dumps(c.sanitized()))
    assert out["pg_password"] == "******"
    assert "hunter2" not in json.dumps(out)
    assert out["trusted_ips"] == ["10.0.0.0/8", "unix:"]
    assert out["proxy_listen"] == [
        "0.0.0.0:8000 reuseport backlog=16384",
        "0.0.0.0:8443 http2 ssl reuseport backlog=16384",
    ]
    assert out["proxy_listeners"][1] == {
        "ip": "0.0.0.0", "port": 8443, "ssl": True, "http2": True,
        "proxy_protocol": False, "deferred": False, "bind": False, "reuseport": True,
        "backlog=16384": True, "listener": "0.0.0.0:8443 ssl http2 reuseport backlog=16384",
    }
    assert out["headers_upstream"] == ["X-Kong-Request-Id"]
    assert out["nginx_http_client_max_body_size"] == 134217728
    assert out["status_listen"] == [] and out["status_listeners"] == []
    assert _load(tmp_path).sanitized()["pg_password"] is None


def test_config_is_frozen(tmp_path):
    """Config cannot be mutated after loading."""
    c = _load(tmp_path)
    with pytest.raises(AttributeError):
        c.log_level = "debug"  # type: ignore[misc]


def test_relative_conf_path_is_recorded_absolute(tmp_path, monkeypatch):
    """source_path is the absolute path of the file read."""
    (tmp_path / "k.conf").write_text("log_level = warn\n")
    monkeypatch.chdir(tmp_path)
    c = load_config("k.conf", env={})
    assert c.source_path == str(tmp_path / "k.conf")
    assert c.log_level == "warn"


@pytest.mark.parametrize("text, seconds", [("10s", 10.0), ("500ms", 0.5), ("1m", 60.0),
                                           ("3", 3.0), ("1.5s", 1.5)])
def test_shutdown_timeout_is_an_nginx_time(tmp_path, text, seconds):
    """``nginx_main_worker_shutdown_timeout`` takes nginx's time syntax (default 10s)."""
    assert _load(tmp_path, "").nginx_main_worker_shutdown_timeout == 10.0
    assert _load(tmp_path, "nginx_main_worker_shutdown_timeout = %s\n" % text) \
        .nginx_main_worker_shutdown_timeout == seconds


def test_worker_count_auto_is_one_per_usable_cpu(tmp_path):
    import os

    assert _load(tmp_path, "nginx_worker_processes = 3\n").worker_count == 3
    if hasattr(os, "sched_getaffinity"):
        usable = len(os.sched_getaffinity(0))
    else:  # PyPy has no sched_getaffinity
        usable = os.cpu_count()
    assert _load(tmp_path, "").worker_count == usable


def test_a_worker_rebuilds_the_same_configuration_from_raw_values(tmp_path):
    """``config_from_values(raw_values)`` gives back an equal configuration, whatever
    mix of file, environment and prefix produced it."""
    from kongtx.config import config_from_values

    config = _load(tmp_path, "headers = off\nnginx_worker_processes = 2\n",
                   env={"KONG_PROXY_LISTEN": "127.0.0.1:9000 ssl"})
    again = config_from_values(dict(config.raw_values), config.source_path,
                               config.unknown_properties)
    assert again == config
    assert again.raw_values == config.raw_values
