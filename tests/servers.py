"""Start real servers for tests: the app as a subprocess, on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s:\n{log.read_text()[-4000:]}")


@contextmanager
def running_app(data_dir: Path, *args: str, timeout_s: float = 180, log_name: str = "app.log"):
    """Run app.py with the given options; yields its URL; stops it afterwards. Replicas on one
    data folder each need their own ``log_name``."""
    port = free_port()
    log = data_dir / log_name
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--data-dir", str(data_dir), "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", proc, timeout_s, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # A training job outlives the app by design (its own session; the next app start
        # judges it by its heartbeat). A test that ends, or fails, while one runs must not
        # leave it taking the cores from the tests after it.
        for pid in training_processes_of(data_dir):
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def vllm_processes_of(data_dir: Path) -> list[int]:
    """Pids of the vLLM servers started by the app running on ``data_dir``."""
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                procs[int(d.name)] = (
                    (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"),
                    (d / "environ").read_bytes().split(b"\0"),
                )
            except OSError:
                continue
    apps = [pid for pid, (cmd, _) in procs.items() if "app.py" in cmd and str(data_dir) in cmd]
    marks = {f"ASSISTANT_PARENT_PID={pid}".encode() for pid in apps}
    return [pid for pid, (_, env) in procs.items() if marks & set(env)]


def training_processes_of(data_dir: Path) -> list[int]:
    """Pids of the training jobs (``python -m tuning.train``) and of the answers prepared
    ahead for them (``python -m tuning.prepare``) working on ``data_dir``."""
    pids, names = [], {str(data_dir).encode(), str(Path(data_dir).resolve()).encode()}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                args = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (b"tuning.train" in args or b"tuning.prepare" in args) and names & set(args):
                pids.append(int(d.name))
    return pids


def still_running(pids: list[int], wait_s: float = 0) -> list[int]:
    """Those of ``pids`` alive after up to ``wait_s`` seconds (zombies count as ended)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.5)
