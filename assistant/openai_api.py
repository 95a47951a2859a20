"""OpenAI-compatible API for users and scripts: the live version, behind per-user keys.

    POST /v1/chat/completions   (stream or not; ``model`` may be anything: the user's version answers,
                                 the live one or, for users in a canary, the canary)
    GET  /v1/models             (one model: the base model's name, with the version this key's user is served)

Limits (``ApiLimits``): bodies over 1 MB are refused while read (413); only the fields
``ChatRequest`` names reach vLLM, with ``n`` at most 4 and ``max_tokens`` at most the
server's max new tokens (its default too); log-probs, structured output and tools are
refused by name (400); messages have the chat page's roles and text limits.

Each request needs ``Authorization: Bearer <key>`` with a key issued to an account
(``app.py keys add NAME`` or the admin console; the store keeps only its hash, and a revoked
key or a disabled account's key is refused). The request is forwarded
to the least busy of the app's vLLM servers holding the adapter the router picks for that
user (``VLLMEngine.acquire``), as ``model``, so API users get the same version as the chat
page; a server that fails mid-request is marked down for the next one. Nothing else of vLLM is reachable
here: not its adapter loading, not its key.

Every answer given over this API is logged like a chat page answer (``store`` given, as
the app does): a conversation titled "API: <the last user message>" in that user's
history, holding the last user message and the answer, with the exact prompt the model
saw, the version that answered, sampling, timings, tokens and finish reason. So the user
can rate, retry-compare or edit it in the chat page like any other answer, and it counts
in the version's statistics. An answer cut short (the client or the model server went
away) is not logged as an answer; the message is, as on the chat page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from typing import Callable

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from .api_request import REFUSED_FIELDS, ROLE_LIMITS, ApiLimits, ChatRequest, read_body, upstream_body
from .chat import ChatInputError, GenerationSlots, check_chars
from .engine import Adapter, EngineError
from .vllm_engine import sse_event

log = logging.getLogger(__name__)

# Sampling fields recorded with a logged answer (what vLLM was asked for, after the limits).
SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "seed", "n", "stop", "presence_penalty", "frequency_penalty")


def text_of(content) -> str:
    """An OpenAI message's content as text: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def plain_messages(body: dict) -> list[dict]:
    """The request's messages as ``{"role", "content": str}``, refused (ValueError) when a
    message is not an object with a role the chat has (system, user, assistant), its text
    is over the chat page's limit for that role, or it holds what no store can keep."""
    out = []
    for i, m in enumerate(body["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a 'role'")
        if m["role"] not in ROLE_LIMITS:
            raise ValueError(f"messages[{i}] has role {m['role'][:40]!r}; only {', '.join(ROLE_LIMITS)} are served")
        text = text_of(m.get("content"))
        if len(text) > ROLE_LIMITS[m["role"]]:
            raise ValueError(f"messages[{i}] ({m['role']}) is {len(text):,} characters long; "
                             f"the limit is {ROLE_LIMITS[m['role']]:,}.")
        try:
            out.append({"role": m["role"], "content": check_chars(text, f"messages[{i}]")})
        except ChatInputError as e:
            raise ValueError(str(e)) from e
    return out


class Answers:
    """What came back for one request, choice by choice, from vLLM's JSON or its stream."""

    def __init__(self):
        self.text: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.tokens: int | None = None
        self.first_token_s: float | None = None
        self._started = time.monotonic()
        self._buffer = b""

    def from_json(self, data: dict) -> None:
        for c in data.get("choices") or []:
            i = c.get("index", 0)
            self.text.setdefault(i, []).append(text_of((c.get("message") or {}).get("content")))
            self.finish[i] = c.get("finish_reason")
        self.tokens = (data.get("usage") or {}).get("completion_tokens")

    def feed(self, raw: bytes) -> None:
        """Server-sent events, in whatever pieces the network delivered them."""
        self._buffer += raw
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                event = sse_event(line.decode("utf-8", errors="replace"))
            except ValueError:
                continue
            if event is None:
                continue
            if event.get("usage"):
                self.tokens = event["usage"].get("completion_tokens")
            for c in event.get("choices") or []:
                i = c.get("index", 0)
                piece = (c.get("delta") or {}).get("content") or ""
                if piece and self.first_token_s is None:
                    self.first_token_s = time.monotonic() - self._started
                self.text.setdefault(i, []).append(piece)
                if c.get("finish_reason"):
                    self.finish[i] = c["finish_reason"]

    def complete(self) -> list[tuple[str, str, int | None]]:
        """``(text, finish_reason, tokens)`` of each choice that finished (tokens: one choice only)."""
        done = [i for i in sorted(self.text) if self.finish.get(i)]
        tokens = self.tokens if len(done) == 1 else None
        return [("".join(self.text[i]), self.finish[i], tokens) for i in done]

    @property
    def elapsed_ms(self) -> float:
        return (time.monotonic() - self._started) * 1000


def log_exchange(store, model: str, user: str, messages: list[dict], body: dict, live: Adapter | None,
                 answers: Answers) -> None:
    """One conversation per request: the last user message and each finished answer."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    cid = store.create_conversation(user, system_prompt=system, title=("API: " + last_user)[:60])
    mid = store.add_message(cid, user, last_user)
    sampling = {k: body[k] for k in SAMPLING_KEYS if k in body} | {"via": "openai-api"}
    for text, finish, tokens in answers.complete():
        store.log_answer(
            message_id=mid, user_id=user, prompt=messages, content=text, model=model,
            adapter_name=live.name if live else None, adapter_version=live.version if live else None,
            sampling=sampling, latency_ms=answers.elapsed_ms,
            first_token_ms=answers.first_token_s * 1000 if answers.first_token_s is not None else None,
            completion_tokens=tokens, finish_reason=finish,
        )


def build_api(engine, adapter_for: Callable[[str], Adapter | None], user_for_key: Callable[[str], str | None],
              store=None, limits: ApiLimits = ApiLimits(), transport: httpx.AsyncBaseTransport | None = None,
              slots: GenerationSlots | None = None):
    """A FastAPI app forwarding to ``engine`` (a VLLMEngine) for clients whose key
    ``user_for_key`` maps to a user (``Store.user_for_api_key``); answers are logged to
    ``store`` (a store.Store) when one is given. ``transport`` replaces the network to vLLM
    (tests: httpx.MockTransport). ``slots``, shared with the chat page, caps each user's
    answers generating at once (429 over it)."""
    app = FastAPI(title="assistant OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    # No base URL: each request goes to the server its lease names (engine.acquire).
    upstream = httpx.AsyncClient(headers=engine.auth_headers, timeout=httpx.Timeout(10.0, read=120.0),
                                 transport=transport)

    def user_of(request: Request) -> str:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        user = user_for_key(key.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HTTPException(401, "a valid API key is required (Authorization: Bearer <key>)")
        return user

    @app.get("/v1/models")
    async def models(request: Request):
        user = user_of(request)
        live = adapter_for(user)
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "owned_by": "assistant",
            "version": live.version if live else None, "adapter": live.name if live else None,
        }]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        user = user_of(request)
        raw = await read_body(request, limits.max_body_bytes)
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise HTTPException(400, f"the body is not JSON: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise HTTPException(400, "a JSON object with a 'messages' list is required")
        refused = [k for k in REFUSED_FIELDS if data.get(k)]
        if refused:
            raise HTTPException(400, f"not served here: {', '.join(repr(k) for k in refused)} "
                                     "(text answers only: no log-probs, structured output or tools)")
        try:
            asked = ChatRequest.model_validate(data)
            messages = plain_messages(data)
        except ValidationError as e:
            raise HTTPException(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from e
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        held = slots.hold(user) if slots is not None else contextlib.nullcontext()
        try:
            held.__enter__()
        except ChatInputError as e:
            raise HTTPException(429, str(e)) from e
        live = adapter_for(user)
        try:
            lease = engine.acquire(live)  # the version and the server are fixed for this request
        except EngineError as e:
            held.__exit__(None, None, None)
            raise HTTPException(503, str(e)) from e

        def release(failed: Exception | None = None) -> None:
            engine.release(lease, failed)  # failed: that server is marked down, the next request goes elsewhere
            held.__exit__(None, None, None)
        body = upstream_body(asked, messages, lease.adapter.name, limits)
        answers = Answers()

        async def record() -> None:
            if store is None or not (200 <= resp.status_code < 300):
                return
            try:
                await asyncio.to_thread(log_exchange, store, engine.model_name, user, messages, body, live, answers)
            except Exception:  # the client has its answer; say loudly that the log lacks it
                log.exception("could not log an API answer for %s", user)

        try:
            req = upstream.build_request("POST", lease.url + "/v1/chat/completions", json=body)
            resp = await upstream.send(req, stream=True)
        except httpx.HTTPError as e:
            release(e)
            raise HTTPException(503, f"the model server is not answering: {e}") from e
        if not body.get("stream"):
            failed = None
            try:
                data = await resp.aread()
            except httpx.HTTPError as e:
                failed = e
                raise HTTPException(503, f"the model server stopped answering: {e}") from e
            finally:
                await resp.aclose()
                release(failed)
            payload = json.loads(data) if data else {}
            if isinstance(payload, dict):
                answers.from_json(payload)
            await record()
            return JSONResponse(payload, status_code=resp.status_code)

        async def relay():
            failed = None
            try:
                async for part in resp.aiter_raw():
                    answers.feed(part)
                    yield part
            except httpx.HTTPError as e:  # the server died mid-stream: the client sees the stream cut
                failed = e
                raise
            finally:
                await resp.aclose()
                release(failed)
                await record()

        return StreamingResponse(relay(), status_code=resp.status_code, media_type="text/event-stream")

    return app


def serve_api(app, host: str, port: int):
    """Run ``app`` with uvicorn in a daemon thread; returns the server (``should_exit = True`` stops it)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True, name="openai-api").start()
    return server
