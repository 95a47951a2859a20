import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from fakes import FakeEngine  # noqa: E402
from store import Store  # noqa: E402


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "assistant.db")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_on_each(request, tmp_path) -> Store:
    """A fresh store on each database in turn: a test module whose ``store`` fixture returns
    this runs every test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return Store(tmp_path / "assistant.db")
    return Store(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server for the session (tests/pg.py); skipped where none is installed."""
    import pg

    if pg.pg_bin() is None:
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql, or set PG_BIN)")
    with pg.postgres_server() as url:
        yield url


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a fresh, empty database on that server."""
    import pg

    return pg.new_database(pg_server)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def service(store, engine):
    from assistant.chat import ChatService
    from assistant.engine import Sampling

    return ChatService(store=store, engine=engine, sampling=Sampling(max_new_tokens=32))


@pytest.fixture(autouse=True)
def one_torch_thread_for_fast_tests(request):
    """The fast tests' tiny models do microsecond ops; two threads on a busy 2-core machine
    wait a scheduler slice at each (11 ms per linear layer was seen: one SFT job test took
    213 s, 1.3 s on one thread). Slow tests run the real model and keep every thread."""
    if request.node.get_closest_marker("slow") or "torch" not in sys.modules:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Prepared models shared by every test run (dequantizing takes ~30 s)."""
    path = Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / ".cache" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def embedded_model(models_dir) -> Path:
    from assistant.model_files import prepare_embedded_model

    return prepare_embedded_model(models_dir)
