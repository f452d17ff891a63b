"""Running kongtx as a user does: ``twistd kongtx`` child processes on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def kong_env(**extra: str) -> Dict[str, str]:
    """This process's environment without KONG_* variables, plus ``extra``, with the
    checkout importable (so an uninstalled tree runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONG_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def twistd(*args: str) -> list:
    # ``python -m twisted`` is ``twist``, not ``twistd``: run twistd with this interpreter.
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]


class NodeProcess:
    """One ``twistd -n kongtx`` child with its own prefix and ports."""

    def __init__(self, prefix: str, conf: Optional[str] = None, **env: str) -> None:
        self.proxy_port = free_port()
        self.admin_port = free_port()
        self.prefix = prefix
        settings = {
            "KONG_PROXY_LISTEN": "127.0.0.1:%d" % self.proxy_port,
            "KONG_ADMIN_LISTEN": "127.0.0.1:%d" % self.admin_port,
            "KONG_PROXY_ACCESS_LOG": "off",
            "KONG_ADMIN_ACCESS_LOG": "off",
        }
        settings.update(env)
        os.makedirs(prefix, exist_ok=True)
        self.log_path = os.path.join(prefix, "twistd.out")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            twistd("-n", "--pidfile=", "kongtx", "--prefix", prefix,
                   *(("--conf", conf) if conf else ())),
            env=kong_env(**settings), stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.proxy = "http://127.0.0.1:%d" % self.proxy_port
        self.admin = "http://127.0.0.1:%d" % self.admin_port

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
