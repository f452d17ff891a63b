"""The operations files in etc/ are checked by the real tools that consume them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(ROOT, "etc")


def _tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in ("/usr/sbin/" + name, "/usr/bin/" + name) if os.path.exists(p)), None)
    if path is None:
        pytest.skip("%s is not installed" % name)
    return path


def test_systemd_unit_verifies(tmp_path):
    """systemd-analyze accepts the unit (ExecStart pointed at this environment's
    twistd); it restarts on failure, raises the open-files limit, runs unprivileged."""
    unit = open(os.path.join(ETC, "systemd", "kongtx.service")).read()
    assert "Restart=on-failure" in unit
    assert "LimitNOFILE=65536" in unit
    assert "User=kong" in unit
    assert "twistd -n --pidfile= kongtx --conf /etc/kongtx/kong.conf" in unit
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    local = tmp_path / "kongtx.service"
    local.write_text(unit.replace("/opt/kongtx/venv/bin/twistd", twistd))
    done = subprocess.run([_tool("systemd-analyze"), "verify", str(local)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_logrotate_stanza_is_valid(tmp_path):
    """logrotate parses the shipped stanza (debug mode: nothing is rotated). The
    ``kong`` user the stanza rotates as is created by the operator (docs/operations.md);
    here root stands in for it."""
    state = tmp_path / "state"
    stanza = open(os.path.join(ETC, "logrotate.d", "kongtx")).read()
    assert "su kong kong" in stanza
    local = tmp_path / "kongtx"
    local.write_text(stanza.replace("su kong kong", "su root root"))
    done = subprocess.run([_tool("logrotate"), "-d", "-s", str(state), str(local)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "error:" not in done.stderr.lower(), done.stderr


def test_rsyslog_rule_is_valid(tmp_path):
    """rsyslogd -N1 accepts the shipped rule."""
    conf = tmp_path / "rsyslog.conf"
    conf.write_text('global(workDirectory="%s")\n' % tmp_path
                    + open(os.path.join(ETC, "rsyslog.d", "kong.conf")).read())
    done = subprocess.run([_tool("rsyslogd"), "-N1", "-f", str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
