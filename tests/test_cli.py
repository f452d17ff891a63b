"""Tests for the ``kongtx`` command (kongtx.cli)."""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys

import pytest
import twisted

import kongtx
from kongtx import cli, config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No KONG_* variable from the outer environment leaks into a test."""
    for name in list(os.environ):
        if name.startswith("KONG_"):
            monkeypatch.delenv(name)


def test_check_valid_file_prints_absolute_path(tmp_path, capsys, monkeypatch):
    """`kongtx check CONF` prints 'configuration at <absolute path> is valid' and exits 0."""
    (tmp_path / "kong.conf").write_text("log_level = debug\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check", "kong.conf"]) == 0
    out, err = capsys.readouterr()
    assert out == f"configuration at {tmp_path / 'kong.conf'} is valid\n"
    assert err == ""


def test_check_invalid_file_prints_one_error_line(tmp_path, capsys):
    """A bad property gives 'Error: <property>: <problem>' on stderr and exit status 1."""
    conf = tmp_path / "kong.conf"
    conf.write_text("proxy_listen = 0.0.0.0:99999\n")
    assert cli.main(["check", str(conf)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "Error: proxy_listen: invalid port '99999' in '0.0.0.0:99999'\n"


def test_check_missing_file(tmp_path, capsys):
    """A file that does not exist is reported, not raised."""
    assert cli.main(["check", str(tmp_path / "nope.conf")]) == 1
    assert capsys.readouterr().err == f"Error: conf: no file at {tmp_path / 'nope.conf'}\n"


def test_check_applies_env_overrides(tmp_path, capsys, monkeypatch):
    """KONG_* variables are checked too, exactly as the server would load them."""
    conf = tmp_path / "kong.conf"
    conf.write_text("database = postgres\n")
    monkeypatch.setenv("KONG_DATABASE", "mysql")
    assert cli.main(["check", str(conf)]) == 1
    assert capsys.readouterr().err == (
        "Error: database: unknown database 'mysql' (expected sqlite, postgres or off)\n"
    )


def test_check_without_conf_uses_defaults(capsys, monkeypatch, tmp_path):
    """Without CONF and no default file, the defaults are checked."""
    monkeypatch.setattr(config, "DEFAULT_PATHS", (str(tmp_path / "absent.conf"),))
    assert cli.main(["check"]) == 0
    assert capsys.readouterr().out == "configuration at <defaults> is valid\n"


def test_check_without_conf_reads_default_path(capsys, monkeypatch, tmp_path):
    """Without CONF the first existing default path is checked and named."""
    default = tmp_path / "kong.conf"
    default.write_text("log_level = warn\n")
    monkeypatch.setattr(config, "DEFAULT_PATHS", (str(tmp_path / "absent.conf"), str(default)))
    assert cli.main(["check"]) == 0
    assert capsys.readouterr().out == f"configuration at {default} is valid\n"


def test_version(capsys):
    """`kongtx version` prints the kongtx version alone."""
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out == f"{kongtx.__version__}\n"


def test_version_all(capsys):
    """`kongtx version -a` lists kongtx, the Kong Admin API level, Twisted and Python."""
    assert cli.main(["version", "-a"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"kongtx: {kongtx.__version__}",
        "Kong Admin API: 3.10.0",
        f"Twisted: {twisted.__version__}",
        f"Python: {platform.python_implementation()} {platform.python_version()}",
    ]


def test_no_verb_and_unknown_verb_fail_without_traceback(capsys):
    """No verb prints usage (status 1); an unknown verb is an argparse error (status 2)."""
    assert cli.main([]) == 1
    assert "usage: kongtx" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_exits_zero(capsys):
    """`kongtx --help` lists the verbs and returns 0."""
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "check" in out and "version" in out


def test_python_dash_m_check_subprocess(tmp_path):
    """`python -m kongtx.cli check FILE` works as a real process."""
    conf = tmp_path / "kong.conf"
    conf.write_text("admin_listen = 127.0.0.1:0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONG_")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-m", "kongtx.cli", "check", str(conf)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"configuration at {conf} is valid\n",
        "",
    )
    conf.write_text("log_level = loud\n")
    done = subprocess.run(
        [sys.executable, "-m", "kongtx.cli", "check", str(conf)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("Error: log_level: invalid log level 'loud'")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("verb", ["reload", "quit"])
def test_reload_and_quit_say_when_nothing_runs(tmp_path, verb):
    """``kongtx reload``/``quit`` on a prefix with no running node: one line, exit 1."""
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args([verb, "-p", str(tmp_path)])
    assert args.run(args, out, err) == 1
    assert err.getvalue() == "Error: kongtx is not running in %s (no valid %s)\n" % (
        tmp_path, tmp_path / "pids" / "kongtx.pid")


def test_reload_refuses_a_configuration_that_does_not_load(tmp_path):
    """A kong.conf with a bad value is refused before anything is signalled."""
    conf = tmp_path / "kong.conf"
    conf.write_text("nginx_worker_processes = none\n")
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(["reload", "-c", str(conf), "-p", str(tmp_path)])
    assert args.run(args, out, err) == 1
    assert err.getvalue() == ("Error: nginx_worker_processes: must be 'auto' or a positive "
                              "integer, got 'none'\n")
