"""The admin console's views (issue 15): the job live and its end in a sentence, the gate's
verdict per check, old and new answers side by side, charts that receive their data or say
there is none, tables with named columns, the same on the command line, admins only."""

import datetime as dt
import re
from types import SimpleNamespace

import gradio as gr
import pytest

from assistant.engine import Adapter
from console_scenario import HOSTILE, gate_record, job_row, seed
from feedback_scenario import SAME, TopicEmbedder, build_scenario
from loop import commands, reports
from loop.control import Controller
from test_control import FakeRouter
from ui import charts, console_html
from ui.admin_page import AdminPage

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def req(user):
    return SimpleNamespace(username=user)


def page_over(store, summary=None):
    c = Controller(store, FakeRouter(), adapter_of=lambda v: Adapter(f"v{v}-{v:012x}", "/x", v), launcher=lambda j: None)
    return AdminPage(c, pair_summary=lambda: summary)


# -- the job ---------------------------------------------------------------------------


def test_a_running_job_shows_its_stage_steps_time_left_and_growing_curves(store):
    store.create_user("root", "root-password", is_admin=True)
    job = store.job(job_row(store, version=None, status="running", done=4, steps=16, started_minutes_ago=2))
    view = reports.job_view(job)
    assert (view["stage"], view["step"], view["steps"]) == ("training", 4, 16)
    assert view["eta"] == pytest.approx(20.0 * 12)  # 20 s a step so far, 12 steps to go
    assert [s["state"] for s in view["stages"]] == ["done", "now", "todo", "todo"]
    assert [x for x, _ in view["curves"]["loss"]] == [1, 2, 3, 4]
    assert view["sentence"] == "Training: step 4 of 16 after 2 min, about 4 min left."
    html = console_html.job_panel(view)
    assert 'aria-valuenow="25"' in html and html.count('class="ac-point" data-series="loss"') == 4
    # Running but no phase yet: app.py train builds the pairs before the trainer reports.
    store.update_job(job["id"], progress_json={})
    assert reports.job_view(store.job(job["id"]))["stage"] == "building pairs"
    # Before the first step the job answers the questions it replays (minutes on a slow CPU): it says how far.
    store.update_job(job["id"], progress_json={"phase": "training", "replay_answered": 48, "replay_total": 128})
    view = reports.job_view(store.job(job["id"]))
    assert view["stage"] == "training" and view["sentence"].startswith(
        "Training: first answering the general questions the new version must keep answering as before (48 of 128, ")
    store.update_job(job["id"], progress_json={"phase": "evaluating"})
    assert reports.job_view(store.job(job["id"]))["stage"] == "gate"


def test_a_finished_job_says_in_one_sentence_what_it_made_and_why_the_gate_refused_it(store):
    seed(store)
    job = store.jobs()[0]
    sentence = reports.job_view(job, store.adapter(2))["sentence"]
    assert sentence.startswith("v2 trained on 24 pairs in 6 min; the gate refused it because golden prompts: 2/3 vs live 3/3")
    assert "How many days are in a week?" in sentence
    assert "passed it (5 of 5 checks)" in reports.job_view({**job, "adapter_version": 1}, store.adapter(1))["sentence"]
    failed = {**job, "status": "failed", "adapter_version": None, "error": "ValueError: there are no training pairs"}
    assert reports.job_view(failed)["sentence"] == "The job failed after 6 min while training: ValueError: there are no training pairs"
    assert [s["state"] for s in reports.job_view(failed)["stages"]] == ["done", "failed", "todo", "todo"]
    assert "<script>" not in console_html.job_panel(reports.job_view({**failed, "error": "<script>x</script>"}))


# -- the verdict and the comparison ----------------------------------------------------


def test_the_verdict_has_a_card_per_recorded_check_whatever_the_checks_are():
    ev = gate_record(1, passed=False)
    ev["checks"].append({"check": "<b>new</b> check", "passed": False, "detail": HOSTILE, "value": 3, "threshold": "<= 2"})
    rows = reports.verdict(ev)
    assert [r["check"] for r in rows][-2:] == ["toxicity screen", "<b>new</b> check"]
    assert rows[2]["value"] == "2/3" and rows[-2]["value"] is None
    html = console_html.verdict_cards(2, ev, False)
    assert html.count('class="ac-card ') == len(rows) and html.count("ac-card fail") == 2
    assert "golden prompts, &lt;b&gt;new&lt;/b&gt; check failed" in html
    assert "<b>new" not in html and "<img" not in html and "&lt;img src=x" in html
    assert "needs</dt><dd>15.5-46.5 tokens" in html
    assert "has no gate record" in console_html.verdict_cards(3, {}, None)


def test_old_and_new_answers_side_by_side_with_what_changed_marked():
    rows = reports.comparison(gate_record(1, passed=False))
    # The golden answer lost first, then the other changes, what stayed the same last.
    assert [(r["kind"], r["changed"]) for r in rows] == [("golden", True)] * 2 + [("held-out", True)] * 3 + [("golden", False)]
    week = rows[0]
    assert week["prompt"] == "How many days are in a week?"
    assert week["changed"] and week["live_passed"] and not week["candidate_passed"]
    france = next(r for r in rows if r["prompt"] == "What is the capital of France?")
    assert not france["changed"]
    assert reports.comparison_counts(rows) == {"changed": 5, "total": 6, "golden_lost": ["How many days are in a week?"],
                                              "golden_gained": []}
    for r in rows:  # the diff holds both answers exactly
        assert "".join(t for op, t in r["diff"] if op != "ins") == r["live"]
        assert "".join(t for op, t in r["diff"] if op != "del") == r["candidate"]
    html = console_html.comparison_table(2, gate_record(1, passed=False))
    assert "<ins>" in html and "<del>" in html and "now wrong" in html
    assert "<img" not in html and "&lt;img src=x onerror=" in html
    assert "No answers were stored" in console_html.comparison_table(2, {})


def test_word_diff_marks_one_span_per_change():
    assert reports.word_diff("There are 7 days in a week.", "A week has several days.") == [
        ("del", "There are 7"), ("ins", "A week has several"), ("same", " days"), ("del", " in a week"), ("same", ".")]


# -- charts and tables -----------------------------------------------------------------


def test_charts_receive_their_data_and_say_so_when_there_is_none(store):
    seed(store)
    page = page_over(store)
    feedback, gate = page.charts()
    days = store.ratings_per_day()
    bars = re.findall(r'class="ac-bar" data-series="(\w+)" data-x="([\d-]+)" data-value="(\d+)"', feedback)
    assert sorted(bars) == sorted((k, d["day"][5:], str(d[k])) for d in days for k in ("up", "down"))
    rates = feedback.split('data-chart="thumbs-up-rate"')[1]
    points = dict(re.findall(r'class="ac-point" data-x="([\w ]+)" data-value="([\d.]+)"', rates))
    assert points == {"base model": "0.6250", "v1": "0.5625"}
    for key, _, _ in reports.GATE_METRICS:  # each gate metric on its own axis, one point per version
        chart = gate.split(f'data-chart="gate-{key}"')[1].split('data-chart="')[0]
        assert chart.count('class="ac-point"') == 2, key
    assert 'data-value="0.666667"' in gate  # golden prompts as a share: 2/3
    # Beside each version, the live version's value it was gated against (same data): v1 vs base, v2 vs v1.
    margin = gate.split('data-chart="gate-reward_margin"')[1].split('data-chart="')[0]
    assert re.findall(r'class="ac-ref" data-x="(v\d)" data-value="([\d.]+)"', margin) == [("v1", "0"), ("v2", "0")]


def test_an_empty_console_says_no_votes_yet_and_never_nan(tmp_path):
    from store import Store

    store = Store(tmp_path / "empty.db")
    store.create_user("root", "root-password", is_admin=True)
    out = page_over(store).overview(req("root"))
    feedback, gate = out[0], out[1]
    assert "No votes yet" in feedback and "<svg" not in feedback and "NaN" not in feedback + gate
    assert gate.count("No versions yet.") == len(reports.GATE_METRICS)


def test_no_table_header_is_a_bare_number(store, tmp_path):
    from store import Store

    seed(store)
    page = page_over(store)
    frames = [page.versions_shown(page.versions_table()), page.downvotes(), page._promotions(), page.keys_table(req("root"))]
    empty = page_over(Store(tmp_path / "empty.db"))
    frames += [empty.downvotes(), empty._promotions()]
    for frame in frames:
        assert list(frame.columns) and not [c for c in frame.columns if re.fullmatch(r"\d*", str(c))], frame.columns
    shown = page.versions_shown(page.versions_table())
    assert len(shown.columns) <= 10 and list(shown["golden right"]) == ["", "3/3", "2/3"]
    assert list(shown["thumbs up"]) == ["62% of 24", "56% of 16", "no votes"]


def test_bars_and_labels_escape_what_they_are_given():
    html = charts.bars("x", "<t>", ["<a>"], {"<s>": [1]}, "<y>", "none")
    assert "<a>" not in html and "<s>" not in html and "&lt;t&gt;" in html
    assert "none" in charts.bars("x", "t", [], {"up": []}, "y", "none")


def test_the_pair_builder_summary_reads_as_sentences(store):
    from tuning.pairs import PairConfig, build_preferences

    build_scenario(store)
    summary = build_preferences(store, PairConfig(), TopicEmbedder(SAME)).summary
    lines = reports.feedback_sentences(summary)
    assert re.match(r"\d+ answers with feedback \(\d+ votes\) from \d+ users; candidate pairs: \d+ from votes, "
                    r"\d+ from edits, \d+ from retries\.", lines[0]), lines[0]
    assert re.match(r"They became \d+ pairs \(.*\): \d+ to train on, \d+ held out for the gate\.", lines[1])
    assert any(line.startswith("Dropped:") or line == "Nothing was dropped." for line in lines)
    html = console_html.feedback_summary(summary)
    assert html.count("<li>") == len(lines) and "{" not in html


# -- admins only, on the page and the command line --------------------------------------


@pytest.mark.parametrize("user", ["alice", None])
def test_the_review_and_the_comparison_are_refused_to_non_admins(store, user):
    seed(store)
    page = page_over(store)
    for action in (lambda: page.review("v2", req(user)), lambda: page.api_compare("v2", req(user)),
                   lambda: page.job_status(req(user)), lambda: page.overview(req(user))):
        with pytest.raises(gr.Error, match="admin"):
            action()


def test_an_admin_reviews_a_version_and_scripts_get_the_comparison(store):
    seed(store)
    page = page_over(store)
    verdict, compare, details = page.review("v2", req("root"))
    assert "The gate refused v2 against v1" in verdict and "5 of 6 answers changed" in compare
    assert "pairs trained on:</b> 24" in details
    assert "Choose a version" in page.review(None, req("root"))[0]
    with pytest.raises(gr.Error, match="No adapter version 9"):
        page.review("v9", req("root"))
    api = page.api_compare("v2", req("root"))
    assert api["live_version"] == "v1" and len(api["answers"]) == 6 and api["checks"][2]["passed"] is False


def cli(tmp_path, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_the_command_line_prints_jobs_feedback_and_the_comparison_to_admins_only(tmp_path):
    from store import Store

    seed(Store(tmp_path / "assistant.db"))
    for args in (["compare", "v2"], ["jobs"], ["feedback"]):
        refused = cli(tmp_path, *args, "--as", "alice")
        assert refused.returncode == 3 and "needs an admin" in refused.stderr and not refused.stdout, args
    out = cli(tmp_path, "compare", "v2", "--as", "root")
    assert out.returncode == 0, out.stderr
    assert "v2 against v1 (live when it was trained): the gate refused it" in out.stdout
    assert re.search(r"FAILED\s+golden prompts\s+2/3\s+3/3", out.stdout)
    assert "diff: [-There are 7-]{+A week has several+} days[- in a week-]." in out.stdout
    changed = cli(tmp_path, "compare", "v2", "--as", "root", "--changed").stdout
    assert "What is the capital of France?" not in changed and "How many days" in changed
    jobs = cli(tmp_path, "jobs", "--as", "root").stdout
    assert "[x] training" in jobs and "v2 trained on 24 pairs in 6 min; the gate refused it" in jobs
    assert re.search(r"loss\s+[▁-█]{16}\s+1.57 -> 0.529", jobs)
    feedback = cli(tmp_path, "feedback", "--as", "root").stdout
    assert "base model 62% [43%-79%] of 24 votes" in feedback and "6 up, 3 down" in feedback
    versions = cli(tmp_path, "versions").stdout
    assert re.search(r"v2\s+-\s+failed\s+dpo\s+24\s+0.93\s+2.4\s+2/3\s+-", versions)
    assert cli(tmp_path, "compare", "base", "--as", "root").returncode == 3


def test_over_http_the_comparison_endpoint_answers_admins_only(store, engine):
    from gradio_client import Client

    from live_app import live_app

    seed(store)
    with live_app(store, engine) as url:
        with pytest.raises(Exception, match="needs an admin"):
            Client(url, verbose=False, auth=("alice", "alice-password")).predict(version="v2", api_name="/admin_compare")
        got = Client(url, verbose=False, auth=("root", "root-password")).predict(version="v2", api_name="/admin_compare")
    assert got["version"] == "v2" and got["answers"][0]["prompt"] == "How many days are in a week?"
    assert HOSTILE in {a["prompt"] for a in got["answers"]}  # data for scripts, as stored


def test_the_console_redraws_itself_once_when_a_job_ends(store):
    store.create_user("root", "root-password", is_admin=True)
    page = page_over(store)
    running = job_row(store, version=None, status="running", done=2)
    _, _, seen, ended = page.tick(None, req("root"))  # the page's first tick: nothing to redraw
    assert (seen, ended) == ("", False)
    _, _, seen, ended = page.tick(seen, req("root"))
    assert (seen, ended) == ("", False)
    store.update_job(running, status="succeeded", finished_utc=dt.datetime.now(dt.timezone.utc).isoformat())
    _, _, seen, ended = page.tick(seen, req("root"))
    assert (seen, ended) == (running, True)
    assert page.overview_after_job(True, req("root"))[2] is not None
    _, _, seen, ended = page.tick(seen, req("root"))  # once
    assert (seen, ended) == (running, False) and page.overview_after_job(False, req("root")) == gr.skip()


def test_the_scenario_has_votes_on_seven_days_at_any_time_of_day(tmp_path, monkeypatch):
    """console_scenario.seed at 00:19 UTC once put today's vote on yesterday (an hour
    earlier), so the console showed six days where its tests expect seven (a CI run)."""
    import console_scenario
    from store import Store

    for i, (hour, minute) in enumerate([(0, 0), (0, 19), (12, 0), (23, 59)]):
        class Clock(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return dt.datetime(2026, 12, 7, hour, minute, 30, tzinfo=dt.timezone.utc)

        monkeypatch.setattr(console_scenario, "dt", SimpleNamespace(
            datetime=Clock, timedelta=dt.timedelta, timezone=dt.timezone))
        s = Store(tmp_path / f"{i}.db")
        console_scenario.seed(s)
        assert len(s.ratings_per_day()) == 7, (hour, minute, s.ratings_per_day())
