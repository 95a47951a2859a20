"""Serving through the path the app runs, and the base adapter.

Promotions, rollbacks and canaries go as in the app: ``Controller`` -> ``resolve_version``
(validated against the registry) -> the store's log -> ``AdapterRouter`` -> an engine (the
fake one), over a real store and LoRA folders of a tiny in-process model. The refusal of a
folder damaged after registration is tested the same way in
``tests/test_admin_page.py::test_a_version_damaged_after_registration_is_refused_and_v1_keeps_serving``.
"""

import threading

import pytest

from assistant.adapters import adapter_name, base_model_identity, base_weight_shapes, content_hash, validate_adapter
from assistant.base_adapter import base_adapter, write_lora
from assistant.chat import ChatService
from assistant.engine import Adapter
from assistant.serving import AdapterRouter
from loop.control import Controller
from loop.versions import resolve_version
from tiny import tiny_model


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "base"
    tiny_model(64).save_pretrained(path)
    return path


@pytest.fixture
def served(tiny_base, tmp_path, store, engine):
    """Four versions that passed the gate, registered as training registers them, and the
    app's wiring over them (app.build): (controller, router, {version: Adapter})."""
    data = tmp_path / "data"
    base, shapes = base_model_identity(tiny_base), base_weight_shapes(tiny_base)
    adapters = {}
    for v in range(1, 5):
        folder = write_lora(data / "adapters" / f"v{v}", tiny_base, rank=4, targets=("q_proj", "v_proj"),
                            b_scale=0.1, seed=v)
        digest = content_hash(folder)
        store.add_adapter({"version": v, "name": adapter_name(v, digest), "content_hash": digest, "base_model": base,
                           "path": f"adapters/v{v}", "gate_passed": 1})
        adapters[v] = Adapter(adapter_name(v, digest), str(folder.resolve()), v)
    store.create_user("root", "root-password", is_admin=True)
    router = AdapterRouter(engine)
    controller = Controller(
        store, router, lambda v: resolve_version(store, data, v, base_shapes=shapes, base_model=base, max_rank=16),
        launcher=lambda job: None,
    )
    return controller, router, adapters


def test_promotion_loads_then_swaps_and_keeps_the_previous_version(served, engine):
    c, router, a = served
    assert router.adapter_for("alice") is None  # the base model until something is promoted
    c.promote("root", 1)
    assert router.adapter_for("alice") == a[1]
    c.promote("root", 2)
    assert router.adapter_for("alice") == a[2] and set(engine.loaded) == {a[1].name, a[2].name}
    c.promote("root", 3)  # v1 is neither live nor previous: unloaded
    assert set(engine.loaded) == {a[2].name, a[3].name}


def test_rollback_to_the_previous_version_is_a_pointer_move_with_no_load(served, store, engine):
    c, router, a = served
    c.promote("root", 1)
    c.promote("root", 2)
    loads, load = [], engine.load_adapter
    engine.load_adapter = lambda adapter: loads.append(adapter) or load(adapter)
    c.rollback("root", 1)
    assert loads == [] and router.adapter_for("bob") == a[1] and store.live_version() == 1
    c.rollback("root", None)  # back to the base model; v1 is the previous version now
    assert loads == [] and router.adapter_for("bob") is None and set(engine.loaded) == {a[1].name}


def test_an_answer_in_progress_finishes_on_the_version_it_started_with(served, store, engine):
    c, router, a = served
    c.promote("root", 1)
    service = ChatService(store=store, engine=engine, adapter_for=router.adapter_for)
    engine.enqueue("one two three four")
    answering = service.send(service.new_conversation("alice"), "alice", "hi")
    assert next(answering).text == "one"  # mid-answer
    c.promote("root", 2)
    final = list(answering)[-1]
    assert final.text == "one two three four" and engine.history[0]["adapter"] == a[1]
    logged = store.answer(final.answer_id, "alice")
    assert (logged["adapter_name"], logged["adapter_version"]) == (a[1].name, 1)
    final = list(service.send(service.new_conversation("alice"), "alice", "again"))[-1]
    assert engine.history[1]["adapter"] == a[2] and store.answer(final.answer_id, "alice")["adapter_version"] == 2


def test_concurrent_promotions_leave_serving_and_the_log_agreeing(served, store, engine):
    c, router, a = served
    threads = [threading.Thread(target=c.promote, args=("root", v)) for v in (1, 2, 3, 4) * 5]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.promotions()) == 20
    assert router.adapter_for("alice") == a[store.live_version()]
    newest_first = list(dict.fromkeys(p["version"] for p in store.promotions()))
    assert set(engine.loaded) == {a[v].name for v in newest_first[:2]}  # live and previous, as logged


def test_a_canary_serves_its_share_stickily_and_stays_loaded_until_it_stops(served, engine):
    c, router, a = served
    c.promote("root", 1)
    c.start_canary("root", 2, 0.3)
    users = [f"user{i}" for i in range(1000)]
    first = {u: router.adapter_for(u) for u in users}
    on_canary = [u for u in users if first[u] == a[2]]
    assert 0.25 < len(on_canary) / len(users) < 0.35
    assert all(first[u] == a[1] for u in users if u not in on_canary)
    assert [router.adapter_for(u) for u in on_canary] == [a[2]] * len(on_canary)  # sticky
    c.promote("root", 3)
    c.promote("root", 4)  # live + previous are v4 and v3: v1 goes, the canary stays
    assert set(engine.loaded) == {a[2].name, a[3].name, a[4].name}
    c.stop_canary("root")
    assert set(engine.loaded) == {a[3].name, a[4].name}
    assert all(router.adapter_for(u) == a[4] for u in on_canary)


def test_a_canary_of_a_version_loaded_as_the_previous_one_stays_loaded_after_it_is_not(served, engine):
    c, router, a = served
    c.promote("root", 1)
    c.promote("root", 2)
    c.start_canary("root", 1, 0.5)  # v1 is loaded already, as the previous live version
    c.promote("root", 3)  # v1 is neither live nor previous now, but its canary still serves it
    assert set(engine.loaded) == {a[1].name, a[2].name, a[3].name}
    c.stop_canary("root")
    assert set(engine.loaded) == {a[2].name, a[3].name}


def test_base_adapter_is_all_zero_valid_and_stable(tiny_base, tmp_path):
    from safetensors.torch import load_file

    a = base_adapter(tiny_base, tmp_path, max_rank=16)
    b = base_adapter(tiny_base, tmp_path, max_rank=16)  # reused, same identity
    assert a == b and a.name.startswith("base-")
    validate_adapter(a.path, base_shapes=base_weight_shapes(tiny_base), max_rank=16)
    weights = load_file(f"{a.path}/adapter_model.safetensors")
    assert weights and all(not w.any() for k, w in weights.items() if "lora_B" in k)


def test_replicas_starting_together_write_one_base_adapter(tiny_base, tmp_path, monkeypatch):
    """App replicas on one shared adapters folder create the zero adapter at the same moment."""
    from concurrent.futures import ThreadPoolExecutor

    import assistant.base_adapter as module

    both_written = threading.Barrier(2, timeout=60)

    def write_then_wait(*args, **kwargs):  # both have written before either renames
        out = write_lora(*args, **kwargs)
        both_written.wait()
        return out

    monkeypatch.setattr(module, "write_lora", write_then_wait)
    with ThreadPoolExecutor(2) as pool:
        made = list(pool.map(lambda _: base_adapter(tiny_base, tmp_path, max_rank=16), range(2)))
    assert made[0] == made[1]
    assert [p.name for p in tmp_path.iterdir()] == [f"base-zero-{tiny_base.name}"]  # no temporary folder left
