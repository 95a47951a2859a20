"""What a request to the OpenAI-compatible API may ask of vLLM: the body's size, the fields
passed on and their ranges, the roles and text limits of messages.

``assistant.openai_api`` reads each request through here before anything reaches the model
server or the store. The audit of 2026-11-30 (issue 13) found a chunked 5 MB body accepted,
``n=500`` writing 500 answer rows, ``max_tokens=100000`` and ``prompt_logprobs`` passed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from .chat import MAX_EDIT_CHARS, MAX_MESSAGE_CHARS, MAX_SYSTEM_PROMPT_CHARS
from .engine import Sampling

# Text limits per role: the chat page's (a message, an edited answer, a persona).
ROLE_LIMITS = {"user": MAX_MESSAGE_CHARS, "assistant": MAX_EDIT_CHARS, "system": MAX_SYSTEM_PROMPT_CHARS}
# Fields that change what the server computes beyond text answers (per-token log-probs of
# the whole prompt, grammar-constrained decoding, tool calls): refused by name, so a client
# that relies on one learns it is not served instead of getting something else.
REFUSED_FIELDS = ("prompt_logprobs", "logprobs", "top_logprobs", "echo", "response_format", "structured_outputs",
                  "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
                  "guided_whitespace_pattern", "tools", "tool_choice", "functions", "function_call")


@dataclass(frozen=True)
class ApiLimits:
    # Bytes of a request body, counted while it is read: a chunked body has no Content-Length.
    max_body_bytes: int = 1_000_000
    # Answers per request: each is generated and logged; a few cover best-of-n sampling.
    max_choices: int = 4
    # Tokens per answer: the server's --max-new-tokens, as on the chat page (and the default
    # when the client names none, so no answer runs to the end of the context).
    max_new_tokens: int = Sampling().max_new_tokens


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields passed on to vLLM, with their ranges; any other field is dropped, except
    REFUSED_FIELDS. ``model`` is read and ignored: the live version answers."""

    model_config = ConfigDict(extra="allow")

    messages: list
    model: Any = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


def upstream_body(request: ChatRequest, messages: list[dict], adapter_name: str, limits: ApiLimits) -> dict:
    """What vLLM gets: the supported fields, ``n`` and ``max_tokens`` within the limits,
    the messages as text (so the logged prompt is exactly what the model saw)."""
    body = request.model_dump(exclude_none=True, include={
        "stream", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty"})
    if request.stream_options is not None:
        body["stream_options"] = request.stream_options.model_dump()
    if request.n is not None:
        body["n"] = min(request.n, limits.max_choices)
    asked = [t for t in (request.max_tokens, request.max_completion_tokens) if t is not None]
    body["max_tokens"] = min(asked + [limits.max_new_tokens])
    return {"model": adapter_name, "messages": messages, **body}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes ``limit`` bytes, announced or not."""
    try:
        announced = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise HTTPException(400, "Content-Length is not a number") from None
    if announced > limit:
        raise HTTPException(413, f"request over {limit:,} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request over {limit:,} bytes")
    return bytes(body)
