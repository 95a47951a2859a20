"""One vLLM server of the engine's pool, as the engine sees it, over vLLM's own HTTP API.

``Replica`` wraps one server's URL: ``/health`` (is it answering), ``/v1/models`` (which
adapters it holds), ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``. It keeps the
state the engine routes on (``up``, ``inflight``, ``held``) but decides nothing: the engine
(``vllm_engine.VLLMEngine``) marks it down, syncs it and chooses among replicas
(``least_busy``), under its own lock. A network failure is raised as ``httpx.HTTPError`` so
the engine can tell "this server is gone" from "this server refused" (``EngineError``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

from .engine import Adapter, EngineError
from .vllm_server import VLLMServer

log = logging.getLogger(__name__)

# /health and /v1/models answer in milliseconds when all is well, but a CPU server starved
# by a training job here generated 0.2 tokens/s: five seconds of silence, not one slow reply,
# is a server in trouble.
PROBE_TIMEOUT_S = 5.0


class Replica:
    def __init__(self, url: str, api_key: str, *, server: VLLMServer | None = None, read_timeout_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self.server = server  # the process, when this app started it (restarts are then ours to see)
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(10.0, read=read_timeout_s),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            transport=transport,
        )
        # The engine's routing state, read and written under the engine's lock.
        self.up = False  # answering and holding every adapter the engine serves: may get requests
        self.inflight = 0  # streams open on it now
        self.started = 0  # streams ever started on it (breaks ties between idle servers; tests read it)
        self.held: set[str] = set()  # adapter names it holds (checked with /v1/models at each sync)
        self.owed: set[str] = set()  # names unloaded while it was down: unload them when it is back

    def __repr__(self) -> str:
        return f"Replica({self.url}, {'up' if self.up else 'down'}, {self.inflight} in flight)"

    def restarting(self) -> bool:
        """Our own server, between its death and its restart answering."""
        return self.server is not None and not self.server.ready()

    def healthy(self, timeout: float = PROBE_TIMEOUT_S) -> bool:
        try:
            return self.http.get("/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def model_ids(self) -> set[str]:
        """The names it serves now: the base model and every adapter loaded (``/v1/models``)."""
        r = self.http.get("/v1/models", timeout=PROBE_TIMEOUT_S)
        r.raise_for_status()
        return {m["id"] for m in r.json()["data"]}

    def load(self, adapter: Adapter) -> None:
        """Load ``adapter`` (already loaded counts as loaded: a name is an identity)."""
        r = self.http.post("/v1/load_lora_adapter", json={"lora_name": adapter.name, "lora_path": adapter.path})
        if r.status_code != 200 and "already been loaded" not in r.text:
            raise EngineError(f"vLLM refused adapter {adapter.name}: {r.text[:300]}")

    def unload(self, name: str) -> bool:
        """False when the server did not answer (it is down: unload it when it is back)."""
        try:
            r = self.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError as e:
            log.warning("unload of %s from %s failed: %s", name, self.url, e)
            return False
        if r.status_code != 200:
            log.warning("vLLM at %s did not unload %s: %s", self.url, name, r.text[:200])
        return True

    def close(self) -> None:
        self.http.close()


def least_busy(replicas: list[Replica], name: str, avoid: tuple[Replica, ...] = ()) -> Replica | None:
    """The replica to send a request for adapter ``name`` to: up, holding it, not restarting,
    fewest streams in flight; among equals the one that started fewest, so idle servers take
    turns. None when no replica qualifies."""
    fit = [r for r in replicas if r.up and name in r.held and r not in avoid and not r.restarting()]
    return min(fit, key=lambda r: (r.inflight, r.started), default=None)


@dataclass(frozen=True, eq=False)
class Lease:
    """A request's hold on an adapter on one replica (``VLLMEngine.acquire``): the adapter is
    not unloaded, and the replica counts the request as in flight, until ``release``."""

    adapter: Adapter
    replica: Replica

    @property
    def url(self) -> str:
        return self.replica.url
