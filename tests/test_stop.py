"""Stopping `pgsage up` while a task is in flight: one Ctrl-C (or SIGTERM) stops the whole process tree within
seconds, and the task goes back to the queue, so the documents are indexed once the service is started again.

Each test runs `pgsage up` twice on a data directory of its own (the embedded Postgres), with an upload whose
one ingest task takes a minute or more, and stops it while that task is half done. The stall sweep and the
lease are set far beyond the test's waits, so only the broker handing the message back can finish the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.services import free_port

# Two `pgsage up` runs per test, each loading the model and indexing about a minute of text: minutes.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The hang guard: a stop takes a few seconds; the defect waited for the running task (up to its time limit).
STOP_GUARD_SECONDS = 30
WORDS = ["tide", "moon", "orbit", "gravity", "ocean", "basin", "current", "salt", "wind", "wave", "shore", "reef",
         "delta", "glacier"]


def _rows(n: int, sentences: int) -> list[dict[str, str]]:
    """n documents of varied generated prose, each of several dozen chunks."""
    return [{"_id": f"d{i}", "title": "",
             "text": " ".join(f"The {WORDS[(i * 7 + j) % 14]} meets the {WORDS[(i + 3 * j) % 14]} in passage {j} "
                              f"of survey {i}." for j in range(sentences))} for i in range(n)]


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PGSAGE_") and k not in ("DATABASE_URL", "REDIS_URL")}
    return {
        **env,
        "PGSAGE_DATA_DIR": str(data_dir),
        "HF_HUB_OFFLINE": "1",
        # Far beyond this test's waits: a document comes back only if its message does.
        "PGSAGE_INGEST_STALL_MINUTES": "600",
        "PGSAGE_INGEST_LEASE_SECONDS": "36000",
        **extra,
    }


class Up:
    """`pgsage up --no-demo` in a session (and process group) of its own, as a shell runs a foreground job."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log, self.port = env, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300) -> None:
        with self.log.open("a") as out:
            out.write(f"\n---- pgsage up on port {self.port}\n")
            out.flush()
            offset = out.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "up", "--port", str(self.port), "--no-demo"],
                env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while "press Ctrl-C to stop" not in self.log.read_text()[offset:]:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            assert time.monotonic() < deadline, self.log.read_text()[-4000:]
            time.sleep(1)

    def tree(self) -> set[int]:
        """The supervisor and every process under it (the API, the worker and its pool, beat)."""
        assert self.proc is not None
        children: dict[int, list[int]] = {}
        for pid, (_state, ppid) in _processes().items():
            children.setdefault(ppid, []).append(pid)
        found, todo = set(), [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.add(pid)
            todo += children.get(pid, [])
        return found

    def kill(self) -> None:
        """The test's own clean-up, whatever happened: what is left of its tree, and the embedded Postgres."""
        if self.proc is None:
            return
        for pid in self.tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        postmaster = _postmaster(Path(self.env["PGSAGE_DATA_DIR"]))
        if postmaster is not None and _alive({postmaster}):
            os.kill(postmaster, signal.SIGINT)  # its fast shutdown


def _processes() -> dict[int, tuple[str, int]]:
    """Every process on the machine: its state letter and parent."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue  # gone meanwhile
        found[int(stat.parent.name)] = (state, int(ppid))
    return found


def _alive(pids: set[int]) -> list[str]:
    """Those of pids still running (not exited, not a zombie), with their command lines."""
    states = _processes()
    left = []
    for pid in sorted(pids):
        if pid in states and states[pid][0] != "Z":
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                left.append(f"{pid} {cmdline[:160].decode(errors='replace')}")
    return left


def _postmaster(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _key(env: dict[str, str]) -> str:
    made = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--name", "stop test", "--role",
                           "admin", "-c", "*", "--json"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["key"])


def _job(up: Up, key: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{up.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _wait(predicate: Any, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}\n" + log.read_text()[-4000:]
        time.sleep(0.5)


def _stop_mid_task_then_restart(tmp_path: Path, env: dict[str, str], stop: Any) -> None:
    """Up, an upload whose one task runs a minute or more, stop (by `stop`) once it is partly indexed: the
    whole tree is gone within the guard; up again: every document indexed, none failed."""
    log = tmp_path / "up.log"
    rows = _rows(80, 360)  # one task of 80 documents, ~1,500 chunks
    first = Up(env, log)
    try:
        first.start()
        key = _key(env)
        r = httpx.post(f"{first.url}/v1/documents", headers={"Authorization": f"Bearer {key}"},
                       files={"file": ("docs.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())},
                       data={"collection": "stop"}, timeout=120)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        _wait(lambda: _job(first, key, job_id)["indexed"] >= 1, 300, "the first documents", log)
        mid = _job(first, key, job_id)
        # The task is in flight: part of the upload is indexed, the rest is not.
        assert mid["state"] == "running", mid
        assert mid["indexed"] < len(rows), mid
        postmaster = _postmaster(Path(env["PGSAGE_DATA_DIR"]))
        assert postmaster is not None

        assert first.proc is not None
        tree = first.tree() | {postmaster}
        assert len(tree) >= 6, tree  # supervisor, API, worker and its pool process, beat, Postgres
        deadline = time.monotonic() + STOP_GUARD_SECONDS
        stop(first.proc)
        while time.monotonic() < deadline:
            first.proc.poll()  # reaps the supervisor once it exits
            if not _alive(tree):
                break
            time.sleep(0.2)
        assert not _alive(tree), (_alive(tree), log.read_text()[-4000:])
        assert first.proc.returncode == 0, log.read_text()[-4000:]
        assert "pgsage stopped" in log.read_text()
    finally:
        first.kill()

    second = Up(env, log)
    try:
        second.start()
        _wait(lambda: _job(second, key, job_id)["state"] not in ("queued", "running"), 900,
              "the job after the restart", log)
        job = _job(second, key, job_id)
        assert job["state"] == "succeeded", job
        assert job["indexed"] == len(rows), job
        assert job["failed"] == 0, job
    finally:
        if second.proc is not None and second.proc.poll() is None:
            second.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                second.proc.wait(60)
        second.kill()


@pytest.mark.timeout(1800)
def test_one_ctrl_c_stops_up_with_a_task_in_flight_and_it_is_indexed_after_restart(tmp_path: Path) -> None:
    """The embedded default (file-system queue); Ctrl-C as a terminal sends it, to the whole foreground group."""
    _stop_mid_task_then_restart(tmp_path, _env(tmp_path / "data"), lambda proc: os.killpg(proc.pid, signal.SIGINT))


@pytest.mark.timeout(1800)
def test_sigterm_stops_up_with_a_task_in_flight_on_redis_and_it_is_indexed_after_restart(tmp_path: Path) -> None:
    """Redis as the broker; SIGTERM to the supervisor alone, as a service manager or `kill` sends it."""
    url = os.environ.get("REDIS_URL") or os.environ.get("PGSAGE_REDIS_URL")
    if not url:
        pytest.skip("no Redis: set REDIS_URL")
    queue = f"pgsage-stop-{uuid.uuid4().hex[:8]}"
    try:
        _stop_mid_task_then_restart(tmp_path, _env(tmp_path / "data", PGSAGE_REDIS_URL=url, PGSAGE_QUEUE_NAME=queue),
                                    lambda proc: proc.send_signal(signal.SIGTERM))
    finally:
        import redis

        redis.Redis.from_url(url).delete(queue)
