"""Admin console handlers: refused to non-admins, and what admins see after each action."""

import shutil
from types import SimpleNamespace

import gradio as gr
import pytest

from assistant.engine import Adapter
from test_adapters import tiny  # noqa: F401  (module fixture: a tiny base model and adapter)
from test_control import FakeRouter, _version, _vote
from loop.control import Controller
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
    return AdminPage(c, pair_summary=lambda: {"pairs": 3}, exporter=lambda: launched.append("export")), router, launched


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
    lambda a, r: a.export(r),
    lambda a, r: a.api_retrain("{}", r),
    lambda a, r: a.api_cancel(r),
    lambda a, r: a.api_rollback("base model", "", r),
    lambda a, r: a.api_canary("v1", 10, r),
    lambda a, r: a.api_stop_canary(r),
    lambda a, r: a.api_job(r),
    lambda a, r: a.review("v1", r),
    lambda a, r: a.tick(None, r),
    lambda a, r: a.overview_after_job(False, r),
    lambda a, r: a.review_after_job(False, "v1", r),
    lambda a, r: a.api_compare("v1", r),
    lambda a, r: a.check_dataset("/etc/passwd", None, r),
    lambda a, r: a.train_dataset("a" * 64, r),
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
    versions = out[2]
    assert list(versions["version"]) == [BASE, "v1"] and list(versions["status"]) == ["live", ""]
    assert "No summary of the preference data yet." in out[8]  # {"pairs": 3} is no pair builder summary
    page.promote("v1", "better", False, req("root"))
    assert router.live.version == 1
    table = page.api_versions(req("root"))
    assert [r["status"] for r in table] == ["", "live"] and table[1]["pairs"] == 2
    page.rollback(BASE, "", req("root"))
    assert router.live is None and "Live:** base model" in page._loop_text()
    with pytest.raises(gr.Error, match="not valid JSON"):
        page.retrain("{oops", req("root"))
    md, cancel = page.retrain('{"epochs": 1}', req("root"))
    assert "Queued" in md and cancel["interactive"] is True
    with pytest.raises(gr.Error, match="still queued"):
        page.retrain("{}", req("root"))


# -- promoting a version whose folder changed after registration (issue 7) --------------

def _nan(folder):
    import math

    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "adapter_model.safetensors")
    next(iter(weights.values()))[0, 0] = math.nan
    save_file(weights, folder / "adapter_model.safetensors")


def _rank(folder):
    import json

    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "r": 64}))


def _other_base(folder, tiny):
    from assistant.base_adapter import write_lora

    made = write_lora(folder.parent / "for-other", tiny / "other", rank=4, targets=("q_proj", "v_proj"), b_scale=0.1)
    for f in made.iterdir():
        shutil.copy(f, folder / f.name)


CORRUPTIONS = {
    "corrupted": ("weights", lambda f, t: (f / "adapter_model.safetensors").write_bytes(b"\x00not safetensors")),
    "emptied": ("files", lambda f, t: [p.unlink() for p in f.iterdir()]),
    "nan": ("finite", lambda f, t: _nan(f)),
    "wrong rank": ("rank", lambda f, t: _rank(f)),
    "other base model": ("base model", _other_base),
    "edited config": ("hash", lambda f, t: (f / "adapter_config.json").write_text((f / "adapter_config.json").read_text() + " ")),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_version_damaged_after_registration_is_refused_and_v1_keeps_serving(tiny, tmp_path, store, engine, corruption):  # noqa: F811
    from assistant.adapters import adapter_name, base_model_identity, base_weight_shapes, content_hash
    from assistant.chat import ChatService
    from assistant.serving import AdapterRouter
    from loop.versions import resolve_version

    check, damage = CORRUPTIONS[corruption]
    data = tmp_path / "data"
    base, shapes = base_model_identity(tiny / "base"), base_weight_shapes(tiny / "base")
    for v in (1, 2):
        folder = data / "adapters" / f"v{v}"
        shutil.copytree(tiny / "adapter", folder)
        digest = content_hash(folder)
        store.add_adapter({"version": v, "name": adapter_name(v, digest), "content_hash": digest, "base_model": base,
                           "path": f"adapters/v{v}", "gate_passed": 1})
    store.create_user("root", "root-password", is_admin=True)
    router = AdapterRouter(engine)
    c = Controller(store, router, lambda v: resolve_version(store, data, v, base_shapes=shapes, base_model=base, max_rank=16),
                   launcher=lambda job: None)
    page = AdminPage(c)
    page.promote("v1", "good", False, req("root"))
    damage(data / "adapters" / "v2", tiny)

    for attempt in (lambda: page.promote("v2", "try", False, req("root")),
                    lambda: page.api_promote("v2", "try", True, req("root")),
                    lambda: page.canary("v2", 10, req("root"))):
        with pytest.raises(gr.Error, match=rf"adapter refused \({check}\)"):
            attempt()
    live = router.adapter_for("alice")
    assert live.version == 1 and store.live_version() == 1 and len(store.promotions()) == 1
    # No canary started: every user gets v1, the only adapter the engine holds.
    assert {router.adapter_for(f"user{i}") for i in range(100)} == {live} and set(engine.loaded) == {live.name}
    service = ChatService(store=store, engine=engine, adapter_for=router.adapter_for)
    final = list(service.send(service.new_conversation("alice"), "alice", "still there?"))[-1]
    assert final.answer_id and final.model_label.startswith("fake-model · v1 ")


def test_an_admin_uploads_a_data_set_reads_its_report_and_trains_on_it(admin, store, tmp_path, monkeypatch):
    import json

    from tuning.dataset import read_uploaded, store_dataset

    page, _, launched = admin
    checked = []

    def checker(data, held, name):
        checked.append(name)
        report = read_uploaded(data, held, name=name)
        if report.ok:
            store_dataset(tmp_path, report)
        return report

    page.dataset_checker = checker
    uploads = tmp_path / "gradio"
    uploads.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(gr.Error, match="only a file uploaded"):  # a path an API caller names
        page.check_dataset(str(outside), None, req("root"))
    with pytest.raises(gr.Error, match="only a file uploaded"):
        page.check_dataset(str(uploads / ".." / "secret.jsonl"), None, req("root"))
    assert checked == []

    bad = uploads / "bad.jsonl"
    bad.write_text('{"prompt": "<script>alert(1)</script>", "completion": "x\\u0000"}\n')
    html, digest, button = page.check_dataset(str(bad), None, req("root"))
    assert "REFUSED" in html and "NUL" in html and "<script>" not in html
    assert digest is None and button["interactive"] is False
    with pytest.raises(gr.Error, match="Check a data set first"):
        page.train_dataset(digest, req("root"))

    good = uploads / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"q{i}?", "completion": f"a{i}."}) + "\n" for i in range(3)))
    html, digest, button = page.check_dataset(str(good), None, req("root"))
    assert "OK" in html and "3 training rows" in html and button["interactive"] is True
    assert (tmp_path / "datasets" / f"{digest}.jsonl").is_file()
    page.train_dataset(digest, req("root"))
    (job,) = store.jobs()
    assert launched == [job["id"]] and job["config_json"] == {"method": "sft", "dataset": digest}


def test_the_console_says_what_was_prepared_ahead_for_the_next_job(admin, store, tmp_path, monkeypatch):
    """The loop status names what ``tuning.prepare`` last did (``DATA_DIR/prepared.json``),
    whether one runs now and is paused under chat load, and what it no longer covers: a
    version that went live since, feedback given since. Off, nothing yet, or a damaged
    record are said, not failed on."""
    import json

    from assistant.config import ServeConfig
    from assistant.paths import DataPaths
    from loop.jobs import Preparer
    from store.rows import utc_now

    page, _, _ = admin
    assert "Prepared ahead for the next job:** off" in page._loop_text()
    prep = page.c.preparer = Preparer(ServeConfig(data_dir=tmp_path), [], store)
    assert "nothing yet: the next job answers and scores everything itself" in page._loop_text()
    record = {"format": "float32", "replayed": 128, "replay_s": 111.0, "pairs": 259, "pairs_s": 66.8,
              "live_version": None, "regression": 52, "regression_s": 20.1, "held_out": 29, "held_out_s": 95.5,
              "finished_utc": utc_now()}
    DataPaths(tmp_path).prepared.write_text(json.dumps(record))
    text = page._loop_text()
    assert ("last done 0 min" in text and "128 replayed answers (111.0 s), 259 pairs scored (66.8 s), "
            "52 regression answers of base model (20.1 s), 29 held-out pairs scored and their prompts answered "
            "(95.5 s)" in text)
    assert "went live since" not in text and "votes and edits since" not in text
    _version(store, 1)
    page.promote("v1", "", False, req("root"))
    asked = []
    monkeypatch.setattr(store, "feedback_count_since", lambda since: asked.append(since) or 5)
    text = page._loop_text()
    assert "v1 went live since" in text and "5 votes and edits since (scored ahead from 32 on" in text
    assert asked == [record["finished_utc"]]
    # One running now, for v1, stopped while users chat.
    prep._for, prep._at = 1, utc_now()
    prep._proc = SimpleNamespace(poll=lambda: None)
    prep._pauser = SimpleNamespace(paused=True)
    assert "answering for v1, started 0 min" in page._loop_text() and "paused while users chat" in page._loop_text()
    prep._pauser.paused = False
    assert "at idle priority" in page._loop_text()
    prep._proc, prep._pauser = SimpleNamespace(poll=lambda: 0), None
    for damaged in ("{not json", "[1, 2]", json.dumps({**record, "finished_utc": "2026-12-07T10:00:00"}),
                    json.dumps({**record, "finished_utc": 7})):
        DataPaths(tmp_path).prepared.write_text(damaged)
        assert prep.status()["last"] is None and "nothing yet" in page._loop_text()
