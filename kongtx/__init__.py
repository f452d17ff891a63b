"""kongtx: a Kong-compatible API gateway on Twisted."""

__version__ = "0.1.0"

#: The Kong Admin API level kongtx implements (reported by ``GET /``).
KONG_VERSION = "3.10.0"

__all__ = ["__version__", "KONG_VERSION"]
