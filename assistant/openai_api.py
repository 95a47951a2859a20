"""OpenAI-compatible API for users and scripts: the live version, behind per-user keys.

    POST /v1/chat/completions   (stream or not; ``model`` may be anything, the live version answers)
    GET  /v1/models             (one model: the base model's name, with the live version)

Each request needs ``Authorization: Bearer <key>`` with a key from the keys file (one
``user_id key`` pair per line; user accounts replace this later). The request is forwarded
to the app's vLLM server with ``model`` set to the adapter the router picks for that user,
so API users get the same version as the chat page. Nothing else of vLLM is reachable
here: not its adapter loading, not its key. Answers given over this API are not logged
to the feedback store (only the chat page collects feedback).
"""

from __future__ import annotations

import hmac
import json
import threading
from pathlib import Path
from typing import Callable

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import Adapter, EngineError

# Routes are served on the app's host; requests bigger than this are refused unread.
MAX_BODY_BYTES = 1_000_000


def read_keys(path: Path) -> dict[str, str]:
    """``user_id key`` per line (# comments) -> {key: user_id}."""
    keys: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < 16:
            raise ValueError(f"{path}:{n}: want 'user_id key' with a key of 16+ characters")
        keys[parts[1]] = parts[0]
    return keys


def build_api(engine, adapter_for: Callable[[str], Adapter | None], keys: dict[str, str]):
    """A FastAPI app forwarding to ``engine`` (a VLLMEngine) for holders of ``keys``."""
    app = FastAPI(title="assistant OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    upstream = httpx.AsyncClient(
        base_url=engine.url, headers=dict(engine._http.headers), timeout=httpx.Timeout(10.0, read=120.0)
    )

    def user_of(request: Request) -> str:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        for known, user in keys.items():
            if scheme.lower() == "bearer" and hmac.compare_digest(key.encode(), known.encode()):
                return user
        raise HTTPException(401, "a valid API key is required (Authorization: Bearer <key>)")

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
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise HTTPException(413, f"request over {MAX_BODY_BYTES} bytes")
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise HTTPException(400, "a JSON object with a 'messages' list is required")
        try:
            adapter = engine.acquire(adapter_for(user))  # the version is fixed for this request
        except EngineError as e:
            raise HTTPException(503, str(e)) from e
        body["model"] = adapter.name
        try:
            req = upstream.build_request("POST", "/v1/chat/completions", json=body)
            resp = await upstream.send(req, stream=True)
        except httpx.HTTPError as e:
            engine.release(adapter)
            raise HTTPException(503, f"the model server is not answering: {e}") from e
        if not body.get("stream"):
            try:
                data = await resp.aread()
            finally:
                await resp.aclose()
                engine.release(adapter)
            return JSONResponse(json.loads(data) if data else {}, status_code=resp.status_code)

        async def relay():
            try:
                async for part in resp.aiter_raw():
                    yield part
            finally:
                await resp.aclose()
                engine.release(adapter)

        return StreamingResponse(relay(), status_code=resp.status_code, media_type="text/event-stream")

    return app


def serve_api(app, host: str, port: int):
    """Run ``app`` with uvicorn in a daemon thread; returns the server (``should_exit = True`` stops it)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True, name="openai-api").start()
    return server
