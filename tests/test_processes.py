"""The long-running commands as processes: SIGTERM stops ``serve`` and ``run`` as Ctrl-C does
(writer leases given back, exit status 143, one line), and ``run``'s temporary Prefect server
dies with ``run``, ``kill -9`` included.

Each test runs the real entry point in its own session and, whatever happens, SIGKILLs every
process of it it recorded that is still alive.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from maskmill.engine.training.synthetic import write_coco
from maskmill.model import build_model, save_checkpoint
from tests.conftest import run_arguments
from tests.test_serve import make_store

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; the server's fate-sharing is Linux's"
)

MASKMILL = [sys.executable, "-m", "maskmill.flows.cli"]
# A small `maskmill run` with the shipped model: 3 generated scenes, none held out (no held-out
# evaluation before the round starts), one assisted-manual round, no retrain, no automatic pass
# (so no Ray: the processes are maskmill's and Prefect's).
SMALL_RUN = run_arguments(
    {
        "scenes": 3,
        "holdout": 0.0,
        "manual_rounds": 1,
        "semi_rounds": 0,
        "auto": False,
        "retrain_steps": 0,
        "points_per_side": 2,
        "progress": False,
    }
)
PREFECT_SERVER = "prefect.server.api.server"


def _environment(tmp_path: Path) -> dict[str, str]:
    """No configured Prefect API (the temporary server is what is tested) and a Prefect home of
    the test's own (its own server database)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent's wait() has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(condition, timeout: float, what: str, started: _Started) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if started.process.poll() is not None:
            pytest.fail(f"exited ({started.process.returncode}) before {what}: {started.err()}")
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def _left_alive(pids: list[int], within: float) -> list[str]:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"{p}: {_cmdline(p)}" for p in pids if _alive(p)]


class _Started:
    """A command started in its own session, its output in files (a pipe nobody reads could
    block it); on exit SIGKILLs it and every process of it recorded in ``pids`` still running."""

    def __init__(self, command: list[str], cwd: Path, **kwargs) -> None:
        self.stderr = cwd / "stderr.txt"
        with open(cwd / "stdout.txt", "wb") as out, open(self.stderr, "wb") as err:
            self.process = subprocess.Popen(
                command, cwd=cwd, stdout=out, stderr=err, start_new_session=True, **kwargs
            )
        self.pids = [self.process.pid]

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]

    def last_line(self) -> str:
        return self.stderr.read_text(errors="replace").splitlines()[-1]

    def record(self) -> list[int]:
        self.pids += [p for p in _descendants(self.process.pid) if p not in self.pids]
        return self.pids

    def __enter__(self) -> _Started:
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_serve_stopped_by_sigterm_gives_its_claim_back(tmp_path):
    scenes = tmp_path / "scenes"
    annotations = write_coco(scenes, 2, seed=11, height=120, width=160, parts=False)
    store = make_store(tmp_path / "store", (str(scenes / "images"), str(annotations)))
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(build_model("tiny", seed=0), str(checkpoint))
    claims = tmp_path / "store" / "locks" / "claims" / "r1-manual"
    port = _free_port()
    command = [*MASKMILL, "serve", "--store", store.url, "--checkpoint", str(checkpoint)]
    with _Started([*command, "--port", str(port)], cwd=tmp_path) as serve:
        url = f"http://127.0.0.1:{port}/api/next"
        _wait_for(lambda: _answers(url), 300, "answer on /api/next", serve)
        assert len(list(claims.glob("*.json"))) == 1  # the open image's, held while it serves

        serve.process.send_signal(signal.SIGTERM)
        serve.process.wait(timeout=30)  # uvicorn's graceful shutdown, then out
        assert serve.process.returncode == 128 + signal.SIGTERM, serve.err()
        assert serve.last_line() == "maskmill serve: stopped by SIGTERM"
        assert list(claims.glob("*.json")) == []  # nothing accepted: back to the queue


def test_run_stopped_by_sigterm_gives_its_claims_back_and_stops_prefect(tmp_path):
    claims = tmp_path / "store" / "locks" / "claims" / "r1-manual"
    command = [*MASKMILL, *SMALL_RUN, "--store", str(tmp_path / "store")]
    with _Started(command, cwd=tmp_path, env=_environment(tmp_path)) as run:
        # SIGTERM while the stage holds the claim of the image it annotates
        _wait_for(lambda: any(claims.glob("*.json")), 600, "image claim", run)
        pids = run.record()
        assert any(PREFECT_SERVER in _cmdline(p) for p in pids)  # the temporary server

        run.process.send_signal(signal.SIGTERM)
        run.process.wait(timeout=120)  # Prefect reports the runs crashed first
        assert run.process.returncode == 128 + signal.SIGTERM, run.err()
        assert run.last_line() == "maskmill run: stopped by SIGTERM"
        assert list(claims.glob("*.json")) == []
        assert _left_alive(pids, within=5) == []


def test_a_configured_prefect_api_is_left_alone(tmp_path):
    """With ``PREFECT_API_URL`` set, ``run`` starts no server and changes no setting."""
    code = (
        "import os\n"
        "from prefect.settings import PREFECT_API_URL\n"
        "from maskmill.flows.processes import start_prefect_server\n"
        "print(start_prefect_server(), PREFECT_API_URL.value())\n"
    )
    env = {**_environment(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    with _Started([sys.executable, "-c", code], cwd=tmp_path, env=env) as started:
        assert started.process.wait(timeout=120) == 0, started.err()
        assert started.record() == [started.process.pid]  # no child left running
    assert (tmp_path / "stdout.txt").read_text() == "None http://127.0.0.1:9/api\n"


def test_killed_run_leaves_no_prefect_server(tmp_path):
    command = [*MASKMILL, *SMALL_RUN, "--store", str(tmp_path / "store")]
    with _Started(command, cwd=tmp_path, env=_environment(tmp_path)) as run:
        _wait_for(
            lambda: any(PREFECT_SERVER in _cmdline(p) for p in _descendants(run.process.pid)),
            300,
            "Prefect server process",
            run,
        )
        pids = run.record()

        run.process.send_signal(signal.SIGKILL)
        run.process.wait(timeout=30)
        assert _left_alive(pids, within=10) == []
