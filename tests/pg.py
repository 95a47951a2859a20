"""A throwaway PostgreSQL server for tests: initdb into a temp folder, postgres on a free
loopback port (its unix socket in that folder too), stopped and deleted afterwards.

Uses the binaries of Debian's ``postgresql`` package (``PG_BIN``, or the newest
/usr/lib/postgresql/*/bin); tests that need it are skipped, saying so, where there are
none. initdb refuses to run as root, so as root the server runs as the ``postgres`` user
the package creates (``runuser``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from servers import free_port

USER = "assistant"  # the cluster's superuser; trust authentication on loopback only


def pg_bin() -> Path | None:
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("running as root without runuser: initdb refuses root")
    return [runuser, "-u", "postgres", "--"]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields ``postgresql://assistant@127.0.0.1:PORT`` (no database name)."""
    binaries = pg_bin()
    if binaries is None:
        raise FileNotFoundError("no PostgreSQL binaries (apt-get install postgresql, or set PG_BIN)")
    prefix = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="assistant-pg-"))
    if prefix:
        shutil.chown(root, "postgres")
    data, log, port = root / "data", root / "server.log", free_port()
    try:
        subprocess.run(prefix + [str(binaries / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
                                 "-E", "UTF8", "--no-sync", "--no-instructions"],
                       check=True, capture_output=True, timeout=600)
        # -F: no fsync (a test server; durability is PostgreSQL's, not under test here).
        subprocess.run(prefix + [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "300",
                                 "-o", f"-h 127.0.0.1 -p {port} -k {root} -F -c max_connections=200", "start"],
                       check=True, capture_output=True, timeout=360)
    except subprocess.CalledProcessError as e:
        text = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {e.stderr.decode()[-2000:]}\n{text[-2000:]}") from None
    try:
        yield f"postgresql://{USER}@127.0.0.1:{port}"
    finally:
        subprocess.run(prefix + [str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def new_database(server: str) -> str:
    """A fresh, empty database on ``server``; returns its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"
