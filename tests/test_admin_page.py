"""Admin console handlers: refused to non-admins, and what admins see after each action."""

from types import SimpleNamespace

import gradio as gr
import pytest

from assistant.engine import Adapter
from test_control import FakeRouter, _version, _vote
from tuning.control import Controller
from ui.admin_page import BASE, AdminPage


def req(user):
    return SimpleNamespace(username=user)


@pytest.fixture
def admin(store):
    store.create_user("root", "root-password", is_admin=True)
    store.create_user("alice", "alice-password")
    router = FakeRouter()
    launched = []
    c = Controller(store, router, adapter_of=lambda v: Adapter(f"v{v}-{v:012x}", "/x", v), launcher=launched.append)
    return AdminPage(c, pair_summary=lambda: {"pairs": 3}), router, launched


ACTIONS = [
    lambda a, r: a.overview(r),
    lambda a, r: a.job_status(r),
    lambda a, r: a.retrain("{}", r),
    lambda a, r: a.cancel(r),
    lambda a, r: a.promote("v1", "", False, r),
    lambda a, r: a.rollback(BASE, "", r),
    lambda a, r: a.canary("v1", 10, r),
    lambda a, r: a.stop_canary(r),
    lambda a, r: a.api_versions(r),
    lambda a, r: a.api_promote("v1", "", False, r),
]


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("user", ["alice", None])
def test_everything_is_refused_to_non_admins(admin, store, action, user):
    page, router, launched = admin
    _version(store, 1)
    with pytest.raises(gr.Error, match="admin"):
        action(page, req(user))
    assert launched == [] and store.promotions() == [] and store.jobs() == []


def test_tab_and_timer_only_for_admins(admin):
    page, _, _ = admin
    tab, timer = page.on_load(req("alice"))
    assert tab["visible"] is False
    tab, timer = page.on_load(req("root"))
    assert tab["visible"] is True


def test_overview_promote_rollback_and_versions(admin, store):
    page, router, _ = admin
    _version(store, 1)
    store.update_adapter(1, eval_json={"preference_accuracy": 0.9, "reward_margin": 1.5}, pair_ids_json=["a", "b"])
    _vote(store, "u1", None, 1)
    out = page.overview(req("root"))
    versions = out[3]
    assert list(versions["version"]) == [BASE, "v1"] and list(versions["status"]) == ["live", ""]
    assert out[9] == {"pairs": 3}
    page.promote("v1", "better", False, req("root"))
    assert router.live.version == 1
    table = page.api_versions(req("root"))
    assert [r["status"] for r in table] == ["", "live"] and table[1]["pairs"] == 2
    page.rollback(BASE, "", req("root"))
    assert router.live is None and "Live:** base model" in page._loop_text()
    with pytest.raises(gr.Error, match="not valid JSON"):
        page.retrain("{oops", req("root"))
    md, cancel = page.retrain('{"epochs": 1}', req("root"))
    assert "queued" in md and cancel["interactive"] is True
    with pytest.raises(gr.Error, match="still queued"):
        page.retrain("{}", req("root"))
