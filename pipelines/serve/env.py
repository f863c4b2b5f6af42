"""The process environment of `mosaic serve`, set before Ray is imported (docs/architecture.md)."""

import os


def set_process_env() -> None:
    """Before `import ray`: Ray's node IP becomes 127.0.0.1 and its core sockets bind loopback (docs/architecture.md)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
