"""Several vLLM servers kept in step, without a server: fake ones over httpx.MockTransport.

What a user would notice: every servable adapter is on every server that takes requests;
requests spread to the least busy server; a server that dies costs at most the stream open
on it and the next request (or the same request, before its first token) goes elsewhere; a
server that comes back is synced before it gets a request. The prober thread is off here:
each test calls ``probe()`` where the thread would. Two real servers: tests/integration/test_vllm_pool.py.
"""

from __future__ import annotations

import httpx
import pytest

from assistant.engine import Adapter, EngineError, Sampling
from assistant.vllm_engine import VLLMEngine
from fake_vllm import FakePool, delta, dies_after, sse
from tiny import save_tiny_checkpoint

GREEDY = Sampling(temperature=0.0, max_new_tokens=16)
HI = [{"role": "user", "content": "Hi"}]
BASE = Adapter("base-000000000000", "/adapters/base", 0)  # the zero adapter, as for --vllm-url servers
V1 = Adapter("v1-000000000001", "/adapters/v1", 1)
V2 = Adapter("v2-000000000002", "/adapters/v2", 2)
DONE = sse(delta("ok", "stop"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-chat")


@pytest.fixture
def pool() -> FakePool:
    return FakePool("tiny-chat", 2)


@pytest.fixture
def a(pool):
    return pool.servers[0]


@pytest.fixture
def b(pool):
    return pool.servers[1]


def open_pool(checkpoint, pool) -> VLLMEngine:
    engine = VLLMEngine(checkpoint, 256, url=pool.urls, api_key="secret", base=BASE,
                        transport=httpx.MockTransport(pool), probe_interval_s=0)
    for server in pool.servers:
        server.requests.clear()
    return engine


@pytest.fixture
def vllm(checkpoint, pool):
    engine = open_pool(checkpoint, pool)
    yield engine
    engine.close()


def answer(engine, adapter=None) -> str:
    return "".join(c.text for c in engine.stream(HI, GREEDY, adapter))


def test_every_adapter_is_on_every_server_and_an_unload_leaves_them_all(vllm, a, b):
    assert a.loaded == b.loaded == {BASE.name}  # the base (zero adapter) at start
    vllm.load_adapter(V1)
    vllm.load_adapter(V2)
    assert a.loaded == b.loaded == {BASE.name, V1.name, V2.name}
    vllm.unload_adapter(V1.name)
    assert a.loaded == b.loaded == {BASE.name, V2.name}
    assert a.keys == b.keys == {"Bearer secret"}


def test_a_refusal_by_one_server_refuses_the_adapter_everywhere(vllm, a, b):
    b.refuse_loads = True  # e.g. it cannot see the folder
    with pytest.raises(EngineError, match="vLLM refused adapter v1-000000000001"):
        vllm.load_adapter(V1)
    assert V1.name not in a.loaded | b.loaded
    with pytest.raises(EngineError, match="not loaded"):
        vllm.acquire(V1)


def test_requests_go_to_the_least_busy_server(vllm, a, b):
    a.answers += [sse(delta("long"), delta(" answer", "stop"))]
    b.answers += [DONE, DONE]
    first = vllm.stream(HI, GREEDY)
    assert next(first).text == "long"  # open on one server (a: idle servers take turns, a first)
    assert answer(vllm) == "ok" and answer(vllm) == "ok"  # both to b while a is busy
    assert [len(a.chats()), len(b.chats())] == [1, 2]
    assert "".join(c.text for c in first) == " answer"
    a.answers.append(DONE)
    answer(vllm)  # both idle again: the one that started fewer takes it
    assert [len(a.chats()), len(b.chats())] == [2, 2]


def test_a_server_that_dies_mid_stream_costs_that_stream_and_the_next_request_goes_elsewhere(vllm, a, b):
    vllm.load_adapter(V1)
    a.answers.append(dies_after(sse(delta("Once upon"), done=False)))
    cut = vllm.stream(HI, GREEDY, V1)
    assert next(cut).text == "Once upon"  # the user sees the start of the answer
    a.down = True  # killed
    with pytest.raises(EngineError, match="the model server at http://vllm-0.test did not answer"):
        list(cut)
    assert [r.url for r in vllm.up_replicas()] == ["http://vllm-1.test"]
    b.answers += [DONE, DONE]
    assert answer(vllm, V1) == "ok" and answer(vllm, V1) == "ok"  # the user's retry, and everyone after
    assert b.chats() == [V1.name, V1.name]
    vllm.probe()  # still dead: stays out
    assert len(vllm.up_replicas()) == 1


def test_a_request_that_fails_before_its_first_token_is_answered_by_another_server(vllm, a, b):
    a.down = True  # died between two probes: nobody knows yet
    b.answers.append(DONE)
    assert answer(vllm) == "ok"
    assert [r.url for r in vllm.up_replicas()] == ["http://vllm-1.test"]


def test_a_server_that_comes_back_is_synced_before_it_gets_a_request(vllm, a, b):
    vllm.load_adapter(V1)
    a.down = True
    vllm.probe()  # the prober sees it go
    assert [r.url for r in vllm.up_replicas()] == ["http://vllm-1.test"]
    vllm.load_adapter(V2)  # promoted while it was down
    vllm.unload_adapter(V1.name)  # and v1 retired while it was down
    a.restart()  # back, empty
    a.loaded.add(V1.name)  # ...or back without a restart, still holding v1
    a.forgetful = True  # loads "succeed" but /v1/models lists nothing new: not synced, no traffic
    vllm.probe()
    assert len(vllm.up_replicas()) == 1
    a.forgetful = False
    vllm.probe()
    assert len(vllm.up_replicas()) == 2
    assert a.loaded == b.loaded == {BASE.name, V2.name}  # v2 loaded, the owed v1 unloaded
    synced = a.paths()
    assert synced.index("/v1/unload_lora_adapter") < synced.index("/v1/models") and synced[-1] == "/v1/models"
    assert "/v1/chat/completions" not in synced  # no request before it was checked
    a.answers.append(DONE)
    b.answers.append(DONE)
    assert answer(vllm, V2) == answer(vllm, V2) == "ok"
    assert a.chats() == b.chats() == [V2.name]


def test_a_server_that_restarted_behind_our_back_is_taken_out_and_synced_by_the_prober(vllm, a, b):
    vllm.load_adapter(V1)
    a.restart()  # between two probes: up, empty
    before = len(a.paths())
    vllm.probe()
    assert a.loaded == {BASE.name, V1.name} and len(vllm.up_replicas()) == 2
    assert a.paths()[before:][0] == "/v1/models"  # found by looking, not by a user's request


def test_with_every_server_down_requests_and_loads_fail_fast_and_say_so(vllm, a, b):
    a.down = b.down = True
    vllm.probe()
    with pytest.raises(EngineError, match="none of the 2 model servers is answering"):
        answer(vllm)
    with pytest.raises(EngineError, match="none of the 2 model servers is answering"):
        vllm.load_adapter(V1)
    b.restart()
    vllm.probe()
    b.answers.append(DONE)
    assert answer(vllm) == "ok"


def test_a_pool_starts_with_a_server_down_and_takes_it_in_later(checkpoint, pool, a, b):
    a.down = True
    engine = open_pool(checkpoint, pool)
    try:
        assert [r.url for r in engine.up_replicas()] == ["http://vllm-1.test"]
        a.down = False
        engine.probe()
        assert len(engine.up_replicas()) == 2 and a.loaded == {BASE.name}
    finally:
        engine.close()


def test_a_lease_that_failed_marks_its_server_down(vllm, a, b):
    """What the OpenAI-compatible API does when its request to the server fails."""
    lease = vllm.acquire(None)
    vllm.release(lease, failed=httpx.ConnectError("refused"))
    assert lease.replica not in vllm.up_replicas()
    assert vllm.acquire(None).replica is not lease.replica
