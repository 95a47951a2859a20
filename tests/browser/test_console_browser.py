"""The admin console in Chromium over a store with weeks of use (tests/console_scenario.py)
and over an empty one, on the fake engine (no model): the charts receive their data or say
there is none, no table header is a bare number, the verdict and the comparison are readable
and users' and models' markup shows as text. Screenshots of each part go to test-artifacts/."""

import re

import pytest

from browser.conftest import sign_in
from console_scenario import HOSTILE, job_row, seed
from live_app import live_app

pytestmark = pytest.mark.slow


def admin_tab(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    sign_in(page, url, "root", "root-password")
    page.get_by_role("tab", name="Admin").click()
    page.locator("#loop-status").get_by_text("Live:").wait_for(timeout=20_000)
    return page


def headers(page) -> list[str]:
    return [h.strip() for h in page.locator("#admin-tab th").all_inner_texts()]


def shot(page, selector: str, path) -> None:
    page.locator(selector).scroll_into_view_if_needed()
    page.locator(selector).screenshot(path=str(path))


def test_the_console_draws_weeks_of_use_readably(browser, store, engine, artifacts):
    seed(store)
    with live_app(store, engine) as url:
        page = admin_tab(browser, url)
        votes = page.locator("[data-chart=votes-per-day] rect.ac-bar")
        votes.first.wait_for(timeout=20_000)
        # Seven days with votes, a bar for up and one for down each, the values as stored.
        days = store.ratings_per_day()
        assert len(days) == 7 and votes.count() == 14
        drawn = votes.evaluate_all("els => els.map(e => [e.dataset.x, e.dataset.series, +e.dataset.value])")
        assert sorted(drawn) == sorted([d["day"][5:], k, d[k]] for d in days for k in ("up", "down"))
        rates = page.locator("[data-chart=thumbs-up-rate] circle.ac-point")
        assert rates.evaluate_all("els => els.map(e => e.dataset.x)") == ["base model", "v1"]
        for metric in ("preference_accuracy", "reward_margin", "golden_share", "mean_answer_tokens"):
            assert page.locator(f"[data-chart=gate-{metric}] circle.ac-point").count() == 2, metric
        assert "became" in page.locator("#pair-summary").inner_text() or "No summary" in page.locator("#pair-summary").inner_text()
        assert not [h for h in headers(page) if re.fullmatch(r"\d*", h)], headers(page)
        assert "comment" in headers(page) and "thumbs up" in headers(page)
        # The versions table fits 1280 px: no header wraps into a column of letters.
        assert page.evaluate("() => document.querySelector('#versions table').scrollWidth") <= 1280

        # The newest version is under review: its verdict and its answers beside v1's.
        verdict = page.locator("#verdict [data-check]")
        verdict.first.wait_for(timeout=20_000)
        assert page.locator("#verdict .ac-card.fail").get_attribute("data-check") == "golden prompts"
        assert "toxicity screen" in page.locator("#verdict").inner_text()  # a check the console never heard of
        compare = page.locator("#comparison")
        assert "now wrong" in compare.inner_text() and compare.locator("ins").count() > 0
        assert HOSTILE.split(" $")[0] in compare.inner_text()  # shown as typed, not as an image
        assert page.locator("#admin-tab img").count() == 0
        page.locator("#version-details-box").get_by_text("Details of this version").click()
        page.locator("#version-details").get_by_text("pairs trained on").wait_for(timeout=10_000)

        shot(page, "#feedback-charts", artifacts / "console-charts.png")
        shot(page, "#verdict", artifacts / "console-verdict.png")
        shot(page, "#review", artifacts / "console-comparison.png")
        shot(page, "#versions", artifacts / "console-versions.png")
        page.screenshot(path=str(artifacts / "console.png"), full_page=True)

        # Choosing another version redraws the review: v1 passed against the base model.
        page.locator("#review-version input").click()
        page.get_by_role("option", name="v1", exact=True).click()
        page.locator("#verdict").get_by_text("The gate passed v1 against base model").wait_for(timeout=20_000)
        assert page.locator("#verdict .ac-card.fail").count() == 0
        assert "base model (live)" in page.locator("#comparison thead").inner_text()

        job_row(store, version=None, status="running", done=9, phase="training", started_minutes_ago=3)
        job = page.locator("#job-status")
        job.get_by_text("step 9 of 16").first.wait_for(timeout=20_000)
        assert "left" in job.inner_text() and "Training: step 9 of 16" in job.inner_text()
        assert page.locator("[data-chart=curve-loss] circle.ac-point").count() == 9
        assert page.locator("#job-status .ac-stage.now").inner_text() == "training"
        shot(page, "#job-status", artifacts / "console-training.png")


def test_an_empty_console_says_so_in_words(browser, store, engine, artifacts):
    store.create_user("root", "root-password", is_admin=True)
    with live_app(store, engine) as url:
        page = admin_tab(browser, url)
        page.locator("[data-chart=votes-per-day]").get_by_text("No votes yet").wait_for(timeout=20_000)
        assert page.locator("[data-chart=thumbs-up-rate]").get_by_text("No votes yet").count() == 1
        assert "NaN" not in page.locator("#admin-tab").inner_text()
        assert not [h for h in headers(page) if re.fullmatch(r"\d*", h)], headers(page)
        page.locator("#job-status").get_by_text("No training job yet.").wait_for(timeout=10_000)
        shot(page, "#feedback-charts", artifacts / "console-empty.png")
