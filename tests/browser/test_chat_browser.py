"""A person in a real browser: sign in, chat, vote, comment, retry, edit, undo, see versions."""

import sqlite3

import pytest

from browser.conftest import sign_in
from servers import running_app
from store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory, embedded_model):
    data = tmp_path_factory.mktemp("browser-app")
    store = Store(data / "assistant.db")
    store.create_user("alice", "alice-password")
    with running_app(
        data, "--models-dir", str(embedded_model.parent), "--temperature", "0", "--max-new-tokens", "32",
    ) as url:
        yield url, data


def rows(data, sql):
    db = sqlite3.connect(data / "assistant.db")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def wait_rows(page, data, sql, n, timeout_ms=20_000):
    for _ in range(timeout_ms // 250):
        found = rows(data, sql)
        if len(found) >= n:
            return found
        page.wait_for_timeout(250)
    raise AssertionError(f"expected {n} rows for {sql!r}, found {rows(data, sql)}")


def test_chat_and_every_kind_of_feedback_in_the_browser(browser, app, artifacts):
    url, data = app
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    sign_in(page, url, "alice", "alice-password")
    page.get_by_text("Signed in as alice").wait_for(timeout=10_000)  # filled in by the page's load event

    page.fill("#message textarea", "What is the capital of France?")
    page.click("#send")
    wait_rows(page, data, "select id from answers", 1, timeout_ms=60_000)  # streamed to the end
    bot = page.locator("#chatbot .bot").last
    bot.get_by_text("Paris").wait_for(timeout=10_000)
    assert "model: SmolLM2-135M-Instruct · base" in bot.inner_text()

    page.get_by_role("button", name="Like").last.click()
    wait_rows(page, data, "select value from ratings where value = 1", 1)
    # Under load the page may still be redrawing the chat after the like when the next
    # click comes, and that click is lost (seen once in CI). A person clicks again; so does
    # the test, but only while the vote is still the like (a second click that landed
    # would clear the dislike).
    for attempt in range(3):
        page.get_by_role("button", name="Dislike").last.click()
        try:
            wait_rows(page, data, "select value from current_ratings where value = -1", 1, timeout_ms=8_000)
            break
        except AssertionError:
            if attempt == 2:
                raise
    page.locator("#comment textarea").fill("Too short")
    page.click("#send-comment")
    wait_rows(page, data, "select value from ratings where comment = 'Too short' and value = -1", 1)

    page.get_by_role("button", name="Retry").last.click()
    wait_rows(page, data, "select id from answers where source = 'model'", 2)

    page.locator("#chatbot").get_by_role("button", name="Edit").last.click()
    editor = page.locator("#chatbot textarea").last
    editor.fill("Paris, on the Seine.")
    page.locator("#chatbot").get_by_role("button", name="Submit").click()
    wait_rows(page, data, "select id from answers where source = 'edit'", 1)
    page.locator("#chatbot").get_by_text("edited by you").wait_for(timeout=10_000)
    page.screenshot(path=str(artifacts / "chat.png"), full_page=True)

    page.click("#undo")  # withdraws the edit: the retried answer is shown again
    wait_rows(page, data, "select id from answers where withdrawn_utc is not null", 1)
    page.wait_for_timeout(500)
    assert "Paris, on the Seine." not in page.locator("#chatbot").inner_text()

    edit = rows(data, "select content, edited_from_id from answers where source = 'edit'")[0]
    assert edit[0] == "Paris, on the Seine." and edit[1]


def test_markup_in_messages_is_shown_as_text(browser, app):
    url, data = app
    page = browser.new_page()
    sign_in(page, url, "alice", "alice-password")
    page.evaluate("window.__pwned = false")
    page.fill("#message textarea", "<img src=x onerror=\"window.__pwned=true\"><script>window.__pwned=true</script> hello")
    page.click("#send")
    wait_rows(page, data, "select id from answers where prompt_json like '%onerror%'", 1, timeout_ms=60_000)
    page.locator("#chatbot .user").last.get_by_text("hello").wait_for(timeout=10_000)
    assert page.evaluate("window.__pwned") is False
    assert page.locator("#chatbot script").count() == 0


def test_dont_train_ticked_before_the_first_message_is_kept(browser, app):
    url, data = app
    page = browser.new_page()
    sign_in(page, url, "alice", "alice-password")
    page.get_by_text("Signed in as alice").wait_for(timeout=10_000)
    page.get_by_label("Don't use this conversation for training").check()
    page.fill("#message textarea", "Private: what is 2+2?")
    page.click("#send")
    found = wait_rows(page, data, "select c.exclude_from_training from conversations c join messages m "
                                  "on m.conversation_id = c.id where m.content = 'Private: what is 2+2?'", 1,
                      timeout_ms=60_000)
    assert found == [(1,)]
