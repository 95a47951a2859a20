"""Serve the built page with Gradio's sign-in: the one place that calls ``launch``.

``app.py serve`` calls :func:`launch`; tests call it with ``block=False`` on a page built
over the fake engine, so they exercise the same sign-in and file rules as the app.

Gradio's own sign-in is used (its ``/login`` route and cookie); the password check goes
through ``ui.signin.SignIn`` (off the event loop, behind a backoff), which needs the
client's address: :class:`PeerAddress` hands it over. Sessions end on a password change,
a disabled account or after a week (``ui.sessions.Sessions``).
"""

from __future__ import annotations

import gradio as gr
from starlette.middleware import Middleware

from tuning.dataset import MAX_FILE_BYTES

from .sessions import Sessions
from .signin import PEER, Policy, SignIn

# Gradio's login page says "Incorrect credentials" for every refusal, waits included: say the rule.
AUTH_MESSAGE = ("Sign in to chat with the assistant. After 5 wrong passwords, each further try "
                "must wait (1 s, doubling, at most 2 min).")


# Images and media from this server only: whatever markup reaches the page (a model's
# answer, sanitized HTML), the browser fetches nothing from other sites.
CSP = b"img-src 'self' data: blob:; media-src 'self' data: blob:"


class PeerAddress:
    """ASGI middleware: records the connecting address for the sign-in backoff and adds the
    Content-Security-Policy to every response. The direct peer, not X-Forwarded-For, which
    any client can write (behind a reverse proxy every client then shares the proxy's
    address: see docs/faults.md)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        PEER.set((scope.get("client") or ("",))[0])

        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"content-security-policy", CSP)]
            await send(message)

        await self.app(scope, receive, send_with_policy)


def launch(demo: gr.Blocks, store, *, host: str, port: int, block: bool = True,
           policy: Policy = Policy()) -> gr.Blocks:
    """Launch ``demo`` on host:port behind the accounts in ``store``; returns once it
    stops (``block``) or as soon as it serves (``block=False``: call ``demo.close()``)."""
    signin = SignIn(store.verify_password, policy)
    # 32 events at once: vLLM batches the chats, and votes and admin calls must not queue
    # behind 16 streaming answers. Within Gradio's 40 worker threads. At most 128 wait:
    # past that Gradio answers "queue is full" at once instead of letting a flood grow
    # memory and everyone's wait without end (each user also has at most
    # assistant.chat.MAX_GENERATIONS_PER_USER answers generating).
    demo.queue(default_concurrency_limit=32, max_size=128).launch(
        server_name=host, server_port=port, show_error=True, prevent_thread_lock=True,
        auth=signin.check, auth_message=AUTH_MESSAGE,
        app_kwargs={"middleware": [Middleware(PeerAddress)]},
        # The only upload is an admin's SFT data set: Gradio stops a bigger one while it
        # streams in, before it is written whole (tuning.dataset checks the size again).
        max_file_size=MAX_FILE_BYTES,
        # No allowed_paths: nothing under the data folder is served by path. Exports reach
        # the admin who made them through the File component (ui.admin_page.private_copies).
    )
    # Gradio makes its token map when it launches; nobody has signed in yet.
    demo.server_app.tokens = Sessions(store)
    if block:
        demo.block_thread()
    return demo
