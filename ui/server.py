"""Serve the built page with Gradio's sign-in: the one place that calls ``launch``.

``app.py serve`` calls :func:`launch`; tests call it with ``block=False`` on a page built
over the fake engine, so they exercise the same sign-in and file rules as the app.
"""

from __future__ import annotations

import gradio as gr

AUTH_MESSAGE = "Sign in to chat with the assistant."


def launch(demo: gr.Blocks, store, *, host: str, port: int, block: bool = True) -> gr.Blocks:
    """Launch ``demo`` on host:port behind the accounts in ``store``; returns once it
    stops (``block``) or as soon as it serves (``block=False``: call ``demo.close()``)."""
    # 32 events at once: vLLM batches the chats, and votes and admin calls must not queue
    # behind 16 streaming answers. Within Gradio's 40 worker threads.
    demo.queue(default_concurrency_limit=32).launch(
        server_name=host, server_port=port, show_error=True, prevent_thread_lock=True,
        auth=store.verify_password, auth_message=AUTH_MESSAGE,
        # No allowed_paths: nothing under the data folder is served by path. Exports reach
        # the admin who made them through the File component (ui.admin_page.private_copies).
    )
    if block:
        demo.block_thread()
    return demo
