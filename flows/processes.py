"""Process lifetime of the long-running commands (``serve``, ``run``): SIGTERM stops them as
Ctrl-C does, giving their writer leases back, and ``run``'s temporary Prefect server dies with
``run`` however it ends, ``kill -9`` included."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

# Run as ``python -c _DIE_WITH_PARENT <parent pid> <python args...>``: asks the kernel to kill
# this process when its parent dies (PR_SET_PDEATHSIG, kept across exec), checks the parent did
# not die first, then becomes ``python <python args...>``.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # 1: PR_SET_PDEATHSIG
    sys.exit(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the parent is gone already: nobody to serve
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread; exits with status 143 (128 + SIGTERM)."""


@contextlib.contextmanager
def stop_on_sigterm(command: str) -> Iterator[None]:
    """Inside, SIGTERM (how systemd, Docker and Kubernetes stop a process) raises
    :class:`Terminated` in the main thread, as Ctrl-C raises ``KeyboardInterrupt``: ``with``
    blocks and ``finally`` clauses run, so leases are given back; then one line
    ``maskmill <command>: stopped by SIGTERM`` and exit status 143.

    uvicorn (``serve``) and Prefect's flow engine (``run``) install SIGTERM handlers of their
    own while they run; both call the one they replaced, this one, once they have shut down.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    stopping = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:  # a repeated SIGTERM must not cut the clean-up short
            return
        stopping = True
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Terminated:
        print(f"maskmill {command}: stopped by SIGTERM", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_prefect_server() -> str | None:
    """Start a temporary local Prefect server that dies with this process, and point Prefect at
    it; returns its API URL, or None where Prefect is left to itself.

    Prefect's own temporary server (``SubprocessASGIServer``) is stopped only at a normal exit,
    so a killed ``maskmill run`` left it running. This one is the same server started the same
    way, but the kernel kills it when this process dies (Linux ``PR_SET_PDEATHSIG``). Nothing is
    done when an API is configured (``PREFECT_API_URL``), when the temporary server is turned
    off, off Linux, or off the main thread (the kernel's signal follows the thread that started
    the server).
    """
    import prefect
    from prefect.context import refresh_global_settings_context
    from prefect.logging import get_logger
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
    )

    if (
        PREFECT_API_URL.value()
        or not PREFECT_SERVER_EPHEMERAL_ENABLED.value()
        or not sys.platform.startswith("linux")
        or threading.current_thread() is not threading.main_thread()
    ):
        return None
    with socket.socket() as probe:  # a free port, as the kernel picks them
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"http://127.0.0.1:{port}"
    get_logger().info("Starting temporary server on %s (it stops with this process)", address)
    # Prefect's own command and environment for its temporary server (prefect.server.api.server).
    server = [
        "-m",
        "uvicorn",
        "--app-dir",
        str(Path(prefect.__file__).parent.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *server], env=env
    )
    # Stopped at exit, after Prefect's own exit hooks (registered later, run first) have sent
    # their last logs and events.
    atexit.register(_stop, process)
    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    while not _healthy(f"{address}/api/health"):
        if process.poll() is not None:
            raise RuntimeError(
                f"the temporary Prefect server exited with status {process.returncode}"
            )
        if time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError(
                f"the temporary Prefect server did not answer on {address} within "
                f"{PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s "
                "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
            )
        time.sleep(0.1)
    # The environment, not a settings context: Prefect's threads and child processes see it too
    # (a thread that saw no URL would start a temporary server of Prefect's own).
    os.environ["PREFECT_API_URL"] = f"{address}/api"
    refresh_global_settings_context()
    return f"{address}/api"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _stop(process: subprocess.Popen) -> None:
    """Stop the server as Prefect stops its own: SIGTERM, then SIGKILL after 5 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
