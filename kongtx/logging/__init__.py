"""kongtx's own logs: access log lines, error logs, the syslog observer and their wiring.

``kongtx.logging.syslog`` holds the ``twisted.logger`` observer that speaks syslog,
``kongtx.logging.access`` the access line format and the buffered file writer, and
``kongtx.logging.setup`` the :class:`~kongtx.logging.setup.LogService` that wires them
from the configuration (see ``docs/operations.md``).
"""

from __future__ import annotations

from typing import Tuple

__all__: Tuple[str, ...] = ()
