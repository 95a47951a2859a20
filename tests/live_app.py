"""The whole page (chat and admin tabs) over the fake engine, served in this process by
``ui.server.launch``, the function ``app.py serve`` uses: for tests of sign-in, sessions and
what files the server hands out, with no model."""

from __future__ import annotations

import json
from contextlib import contextmanager

import httpx

from servers import free_port


@contextmanager
def live_app(store, engine, exporter=None, **launch_options):
    """Yields the URL of the running page; closes it afterwards."""
    from assistant.chat import ChatService
    from assistant.engine import Sampling
    from test_control import FakeRouter
    from loop.control import Controller
    from ui.admin_page import AdminPage
    from ui.chat_page import ChatPage
    from ui.page import build_app
    from ui.server import launch

    service = ChatService(store=store, engine=engine, sampling=Sampling(max_new_tokens=16))
    controller = Controller(store, FakeRouter(), adapter_of=None, launcher=lambda job: None)
    demo = build_app(ChatPage(service), AdminPage(controller, pair_summary=lambda: {}, exporter=exporter))
    port = free_port()
    launch(demo, store, host="127.0.0.1", port=port, block=False, **launch_options)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close(verbose=False)


def signed_in(url: str, user: str, password: str) -> httpx.Client:
    """An HTTP client holding a session cookie for ``user`` (sign-in must succeed)."""
    client = httpx.Client(base_url=url, timeout=30)
    r = client.post("/login", data={"username": user, "password": password})
    assert r.status_code == 200, r.text
    return client


def click(client: httpx.Client, elem_id: str) -> dict:
    """Press the button ``elem_id`` as the page does (queue/join, then the event stream);
    returns the final message (``msg`` is ``process_completed``; ``success`` says if it ran)."""
    config = client.get("/config").json()
    button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)
    fn = next(d["id"] for d in config["dependencies"] if [button, "click"] in d["targets"])
    session = f"test-{elem_id}-{id(client)}"
    r = client.post("/gradio_api/queue/join", json={
        "data": [], "fn_index": fn, "trigger_id": button, "session_hash": session, "event_data": None})
    r.raise_for_status()
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as events:
        for line in events.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("the event stream ended without a result")
