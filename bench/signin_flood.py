"""Sign-in flood on loopback: wrong passwords from M client addresses at N attempts per
second each, while one signed-in user loads the page; how long that user waits.

    .venv/bin/python bench/signin_flood.py                  # before/after, 10 s per run
    .venv/bin/python bench/signin_flood.py --seconds 20 --clients 4 --rate 10

Each run starts the page (chat tab over the fake engine from tests/fakes.py: no model) as
a subprocess on a free loopback port, with a fresh database holding the user and 50
accounts to attack. Attack clients bind their own loopback addresses (127.0.0.2, .3, ...:
Linux routes all of 127/8 to this machine) and POST /login with wrong passwords for
random account names, paced to ``--rate`` per client; the user sends ``GET /config`` (what
loading the page asks first: it passes the session check and the event loop) every 50 ms.
Runs:

- ``before``: Gradio's plain ``auth=store.verify_password`` as the app had it (scrypt
  on the event loop, no limit);
- ``after``: ``ui.server.launch`` (scrypt in a worker thread, per-account and per-address
  backoff);
- ``quiet``: ``after`` with no flood, for the user's latency at rest.

A 400 is a checked wrong password (scrypt ran), a 429 or 503 a refusal without scrypt.
Prints one table with the CPU and the date. Every loop is bounded by ``--seconds``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def serve(port: int, mode: str, data: Path) -> None:
    """The server process: the chat page over the fake engine, launched as ``mode`` says."""
    from assistant.chat import ChatService
    from assistant.engine import Sampling
    from assistant.paths import DataPaths
    from fakes import FakeEngine
    from store import Store
    from ui.chat_page import ChatPage
    from ui.page import build_app

    store = Store(DataPaths(data).database)
    demo = build_app(ChatPage(ChatService(store=store, engine=FakeEngine(), sampling=Sampling(max_new_tokens=16))))
    if mode == "before":  # what app.py did before issue 13
        demo.queue(default_concurrency_limit=32).launch(
            server_name="127.0.0.1", server_port=port, auth=store.verify_password, quiet=True)
    else:
        from ui.server import launch

        launch(demo, store, host="127.0.0.1", port=port)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run(mode: str, clients: int, rate: float, seconds: float) -> dict:
    from assistant.paths import DataPaths
    from servers import free_port, wait_http
    from store import Store

    data = Path(tempfile.mkdtemp(prefix="signin-flood-"))
    store = Store(DataPaths(data).database)
    store.create_user("user", "user-password")
    for n in range(50):
        store.create_user(f"target{n}", f"target-password-{n}")
    port = free_port()
    log = data / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--mode", mode, "--data", str(data)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", proc, 120, log)
        user = httpx.Client(base_url=url, timeout=60)
        assert user.post("/login", data={"username": "user", "password": "user-password"}).status_code == 200
        codes: dict[int, int] = {}
        lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def attack(address: str) -> None:
            client = httpx.Client(base_url=url, timeout=60, transport=httpx.HTTPTransport(local_address=address))
            pace = 1 / rate
            while (now := time.monotonic()) < deadline:
                r = client.post("/login", data={"username": f"target{random.randrange(50)}", "password": "wrong-guess"})
                with lock:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                time.sleep(max(0.0, now + pace - time.monotonic()))

        attackers = [threading.Thread(target=attack, args=(f"127.0.0.{2 + i}",)) for i in range(clients if mode != "quiet" else 0)]
        for t in attackers:
            t.start()
        latencies = []
        while time.monotonic() < deadline:
            start = time.monotonic()
            assert user.get("/config").status_code == 200
            latencies.append((time.monotonic() - start) * 1000)
            time.sleep(0.05)
        for t in attackers:
            t.join()
        return {"mode": mode, "clients": len(attackers), "rate": rate, "seconds": seconds,
                "sent": sum(codes.values()), "checked": codes.get(400, 0),
                "refused": codes.get(429, 0) + codes.get(503, 0), "other": {c: n for c, n in codes.items() if c not in (400, 429, 503)},
                "requests": len(latencies), "p50": statistics.median(latencies), "p95": percentile(latencies, 0.95),
                "max": max(latencies)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="attacking addresses (127.0.0.2, ...)")
    p.add_argument("--rate", type=float, default=10.0, help="attempts per second per client")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    p.add_argument("--modes", default="quiet,before,after")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        return serve(a.serve, a.mode, a.data)
    load_before = os.getloadavg()[0]
    rows = [run(mode, a.clients, a.rate, a.seconds) for mode in a.modes.split(",")]
    print(f"sign-in flood, {dt.date.today()}, {cpu_model()} ({os.cpu_count()} CPUs), {a.seconds:g} s per run, "
          f"loopback; 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'run':<8}{'flood':>22}{'sent':>7}{'checked (400)':>15}{'refused (429/503)':>19}"
          f"{'user reqs':>11}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
    for r in rows:
        flood = "none" if not r["clients"] else f"{r['clients']} addr x {r['rate']:g}/s"
        print(f"{r['mode']:<8}{flood:>22}{r['sent']:>7}{r['checked']:>15}{r['refused']:>19}"
              f"{r['requests']:>11}{r['p50']:>9.1f}{r['p95']:>9.1f}{r['max']:>9.1f}"
              + (f"  other: {r['other']}" if r["other"] else ""))


if __name__ == "__main__":
    main()
