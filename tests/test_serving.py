"""The adapter router and the base adapter, on a fake engine and a tiny in-process model."""

import threading

import pytest

from assistant.adapters import InvalidAdapter, base_weight_shapes, content_hash, validate_adapter
from assistant.base_adapter import base_adapter, write_lora
from assistant.engine import Adapter
from assistant.serving import AdapterRecord, AdapterRouter, record_from_row
from tiny import tiny_model


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "base"
    tiny_model(64).save_pretrained(path)
    return path


@pytest.fixture
def versions(tiny_base, tmp_path):
    """Four registered versions (folder + recorded hash), as the registry would list them."""
    records = {}
    for v in range(1, 5):
        folder = write_lora(tmp_path / f"v{v}", tiny_base, rank=4, targets=("q_proj", "v_proj"), b_scale=0.1, seed=v)
        digest = content_hash(folder)
        records[v] = AdapterRecord(Adapter(f"v{v}-{digest[:12]}", str(folder), v), digest)
    return records


@pytest.fixture
def router(engine, tiny_base, versions):
    return AdapterRouter(engine, versions.__getitem__, base_shapes=base_weight_shapes(tiny_base), max_rank=16)


def test_promote_loads_then_swaps_and_keeps_the_previous_version(router, engine, versions):
    assert router.adapter_for("alice") is None  # base until something is promoted
    router.promote(1)
    assert router.adapter_for("alice") == versions[1].adapter
    router.promote(2)
    assert set(engine.loaded) == {versions[1].adapter.name, versions[2].adapter.name}
    router.promote(3)  # v1 is neither live nor previous: unloaded
    assert set(engine.loaded) == {versions[2].adapter.name, versions[3].adapter.name}
    assert router.loaded_versions() == [2, 3]


def test_rollback_to_the_previous_version_needs_no_load(router, engine, versions):
    router.promote(1)
    router.promote(2)
    loads = []
    engine.load_adapter = lambda a: loads.append(a)
    router.promote(1)
    assert loads == [] and router.live == versions[1].adapter
    router.promote(None)  # back to the base model
    assert router.adapter_for("bob") is None and versions[1].adapter.name in engine.loaded


def test_a_changed_folder_is_refused_and_the_live_version_stays(router, engine, versions):
    router.promote(1)
    (lambda p: p.write_bytes(p.read_bytes() + b" "))(
        __import__("pathlib").Path(versions[2].adapter.path) / "adapter_config.json"
    )
    with pytest.raises(InvalidAdapter, match="hash"):
        router.promote(2)
    assert router.live == versions[1].adapter and versions[2].adapter.name not in engine.loaded


def test_a_request_keeps_the_adapter_it_started_with(router, versions):
    router.promote(1)
    captured = router.adapter_for("alice")  # what ChatService does at request start
    router.promote(2)
    assert captured == versions[1].adapter and router.adapter_for("alice") == versions[2].adapter


def test_concurrent_promotions_leave_a_consistent_state(router, engine, versions):
    threads = [threading.Thread(target=router.promote, args=(v,)) for v in (1, 2, 3, 4) * 5]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert router.live in [r.adapter for r in versions.values()]
    assert set(engine.loaded) == {a.name for a in router._recent if a is not None}
    assert len(engine.loaded) <= 2


def test_canary_serves_its_share_stickily_and_stays_loaded(router, engine, versions):
    router.promote(1)
    canary = versions[2].adapter
    router.set_canary(canary, 0.3, "canary-key")
    users = [f"user{i}" for i in range(1000)]
    served = {u: router.adapter_for(u) for u in users}
    on_canary = [u for u in users if served[u] == canary]
    assert 0.25 < len(on_canary) / len(users) < 0.35
    assert all(served[u] == versions[1].adapter for u in users if u not in on_canary)
    assert [router.adapter_for(u) for u in on_canary] == [canary] * len(on_canary)  # sticky
    router.promote(3)
    router.promote(4)  # live + previous evicted v1, but the canary stays loaded
    assert canary.name in engine.loaded
    router.set_canary(None, 0.0, "")
    assert canary.name not in engine.loaded
    assert all(router.adapter_for(u) == versions[4].adapter for u in on_canary)


def test_base_adapter_is_all_zero_valid_and_stable(tiny_base, tmp_path):
    from safetensors.torch import load_file

    a = base_adapter(tiny_base, tmp_path, max_rank=16)
    b = base_adapter(tiny_base, tmp_path, max_rank=16)  # reused, same identity
    assert a == b and a.name.startswith("base-")
    validate_adapter(a.path, base_shapes=base_weight_shapes(tiny_base), max_rank=16)
    weights = load_file(f"{a.path}/adapter_model.safetensors")
    assert weights and all(not w.any() for k, w in weights.items() if "lora_B" in k)
