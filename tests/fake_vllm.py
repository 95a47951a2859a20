"""A fake vLLM server for the engine's tests: vLLM's routes as the engine uses them, over
httpx.MockTransport (no sockets, no model), and the event streams it answers with."""

from __future__ import annotations

import json
from typing import Iterator

import httpx


def sse(*events: dict, done: bool = True) -> bytes:
    text = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events)
    return (text + ("data: [DONE]\n\n" if done else "")).encode()


def delta(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def pieces(data: bytes, size: int = 1):
    """The bytes as the network may deliver them, at worst: one at a time, so every line and
    every multi-byte character is split across reads."""
    return iter([data[i : i + size] for i in range(0, len(data), size)])


def dies_after(data: bytes) -> Iterator[bytes]:
    """``data``, then the connection drops: the server was killed mid-answer."""
    yield data
    raise httpx.ReadError("connection reset by peer")


class FakeVLLM:
    """vLLM's routes as the engine uses them: it records every request, holds the adapters
    it was asked to load, lists them on ``/v1/models``, and answers chat requests with the
    event streams queued in ``answers`` (bytes, or an iterator of bytes); a request for an
    adapter it does not hold gets vLLM's 404. ``down``: every request fails to connect."""

    def __init__(self, base_name: str):
        self.base_name = base_name
        self.requests: list[tuple[str, dict]] = []
        self.loaded: set[str] = set()
        self.answers: list = []
        self.refuse_loads = False  # answer loads with 400
        self.forgetful = False  # accept loads but keep nothing (a server that keeps restarting)
        self.down = False
        self.keys: set[str] = set()

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    def chats(self) -> list[str]:
        """The model named by each chat request it got."""
        return [b["model"] for p, b in self.requests if p == "/v1/chat/completions"]

    def restart(self) -> None:
        """Down and back up, with nothing loaded (as a restarted vLLM)."""
        self.loaded.clear()
        self.down = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused")
        request.read()
        body = json.loads(request.content) if request.content else {}
        self.requests.append((request.url.path, body))
        self.keys.add(request.headers.get("authorization", ""))
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": n} for n in [self.base_name,
                                                                                          *sorted(self.loaded)]]})
        if request.url.path == "/v1/load_lora_adapter":
            if self.refuse_loads:
                return httpx.Response(400, text="invalid adapter")
            if body["lora_name"] in self.loaded:
                return httpx.Response(400, text=f"The lora adapter '{body['lora_name']}' has already been loaded.")
            if not self.forgetful:
                self.loaded.add(body["lora_name"])
            return httpx.Response(200, text="Success")
        if request.url.path == "/v1/unload_lora_adapter":
            self.loaded.discard(body["lora_name"])
            return httpx.Response(200, text="Success")
        if request.url.path == "/v1/chat/completions":
            if body["model"] != self.base_name and body["model"] not in self.loaded:
                return httpx.Response(404, json={"error": {"message": f"The model `{body['model']}` does not exist."}})
            answer = self.answers.pop(0)
            content = pieces(answer) if isinstance(answer, bytes) else answer
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content)
        return httpx.Response(404)


class FakePool:
    """Several FakeVLLM servers behind one MockTransport, told apart by host
    (http://vllm-0.test, http://vllm-1.test, ...)."""

    def __init__(self, base_name: str, n: int):
        self.servers = [FakeVLLM(base_name) for _ in range(n)]
        self.urls = [f"http://vllm-{i}.test" for i in range(n)]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        return self.servers[int(request.url.host.split("-")[1].split(".")[0])](request)
