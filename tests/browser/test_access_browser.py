"""In a real browser, over the fake engine served by ui.server.launch: a model's answer that
holds remote images shows them as typed, and the browser fetches nothing (issue 13, item 12)."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from browser.conftest import sign_in
from live_app import live_app


@pytest.fixture
def beacon():
    """A loopback server that records every request: the 'tracker' an answer points at."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_remote_images_in_an_answer_are_shown_as_typed_and_never_fetched(browser, store, engine, beacon):
    base, hits = beacon
    md, html = f"![pixel]({base}/md.png)", f'<img src="{base}/html.png">'
    engine.enqueue(f"Here: {md} and {html} and **bold** done.")
    store.create_user("alice", "alice-password")
    with live_app(store, engine) as url:
        page = browser.new_page()
        sign_in(page, url, "alice", "alice-password")
        # The user's own message is not escaped (only they see it): the page's
        # Content-Security-Policy alone must stop this one.
        page.fill("#message textarea", f'Show me a picture <img src="{base}/user.png">')
        page.click("#send")
        bot = page.locator("#chatbot .bot").last
        bot.get_by_text("done.").wait_for(timeout=20_000)
        page.wait_for_timeout(1000)  # time for any image request to go out
        text = bot.inner_text()
        assert md in text and html in text  # as typed, not images
        assert bot.locator("strong").inner_text() == "bold"  # Markdown still works
        assert bot.locator(f'img[src^="{base}"]').count() == 0
        assert page.locator(f'img[src="{base}/user.png"]').count() == 1  # in the page, blocked by the policy
        assert hits == []
