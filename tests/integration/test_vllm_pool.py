"""Two real vLLM servers (CPU build) kept in step by one engine, as ``--vllm-url`` twice.

The servers are started by this module (in parallel, 1 GiB of KV cache each) and restarted
by their own watchdogs when killed, as someone else's supervisor would; the engine is given
only their URLs, so it sees a death and a restart only through vLLM's HTTP API. The tests
run in order: a promotion reaches both servers; one server is killed under concurrent
streams; it comes back and is synced before it gets a request.
"""

import logging
import os
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from assistant.adapters import adapter_name, base_model_identity, base_weight_shapes, content_hash
from assistant.base_adapter import write_lora
from assistant.engine import Adapter, EngineError, Sampling
from assistant.serving import AdapterRouter
from loop.control import Controller
from loop.versions import resolve_version

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

RANK = 8
GREEDY = Sampling(temperature=0.0, max_new_tokens=16)
LONG = Sampling(temperature=0.0, max_new_tokens=64)  # still streaming when the kill comes
PROMPT = "What is the capital of France?"
STORY = "Write a long story about a dragon who learns to cook."


def ask(engine, prompt, adapter, sampling=GREEDY):
    return "".join(c.text for c in engine.stream([{"role": "user", "content": prompt}], sampling, adapter))


def wait_for(condition, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, embedded_model):
    from assistant.vllm_server import VLLMServer, VLLMServerConfig, split_cores

    root = tmp_path_factory.mktemp("vllm-pool")
    key = secrets.token_urlsafe(24)
    servers = [VLLMServer(VLLMServerConfig(
        model_path=embedded_model, served_name="smol", context_tokens=1024, max_lora_rank=RANK, kv_cache_gib=1,
        dtype="float32", log_path=root / f"vllm-{i}.log", api_key=key, cpus=cpus,  # each its own cores
        startup_timeout_s=600,  # a CI machine busy with other work was seen to need more than 300 s
    )) for i, cpus in enumerate(split_cores(2))]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: s.start(), servers))
        yield servers
    finally:
        for s in servers:
            s.stop()
    assert not any(s.alive() for s in servers)


@pytest.fixture(scope="module")
def engine(servers, data, embedded_model):
    """As ``open_vllm_engine`` makes it for --vllm-url twice (base through the zero adapter),
    with a longer read timeout: on a CI machine starved by other work a surviving server was
    seen silent for over the app's 60 s, and that is not what these tests are about."""
    from assistant.base_adapter import base_adapter
    from assistant.vllm_engine import VLLMEngine

    engine = VLLMEngine(embedded_model, 1024, url=[s.url for s in servers], api_key=servers[0].api_key,
                        base=base_adapter(embedded_model, data / "adapters", RANK), read_timeout_s=600)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def versions(data, embedded_model):
    """Two versions registered as training registers them: (store, {version: Adapter})."""
    from store import Store

    store = Store(data / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    base = base_model_identity(embedded_model)
    out = {}
    for v in (1, 2):
        folder = write_lora(data / "adapters" / f"v{v}", embedded_model, rank=RANK,
                            targets=("q_proj", "v_proj", "o_proj", "down_proj"), b_scale=0.08, seed=v)
        digest = content_hash(folder)
        store.add_adapter({"version": v, "name": adapter_name(v, digest), "content_hash": digest, "base_model": base,
                           "path": f"adapters/v{v}", "gate_passed": 1})
        out[v] = Adapter(adapter_name(v, digest), str(folder.resolve()), v)
    return store, out


@pytest.fixture(scope="module")
def router(engine):
    return AdapterRouter(engine)


@pytest.fixture(scope="module")
def control(versions, router, data, embedded_model):
    store, _ = versions
    shapes, base = base_weight_shapes(embedded_model), base_model_identity(embedded_model)
    return Controller(store, router, lambda v: resolve_version(store, data, v, base_shapes=shapes, base_model=base,
                                                               max_rank=RANK),
                      launcher=lambda job: None)


@pytest.fixture(scope="module")
def expected(engine, control, versions):
    """v1 promoted (test 1), and its greedy answer as each server gives it."""
    control.promote("root", 1)
    v1 = versions[1][1]
    answers = [ask(engine, PROMPT, v1) for _ in engine.replicas]  # idle servers take turns: one each
    assert [r.started for r in engine.replicas] == [1, 1]
    return answers


def test_a_promoted_version_is_loaded_on_both_servers_and_both_answer_with_it(engine, versions, expected):
    v1 = versions[1][1]
    for replica in engine.replicas:
        assert {v1.name, engine.base.name} <= replica.model_ids(), replica.url
    assert expected[0] == expected[1] and expected[0] != ask(engine, PROMPT, None)  # v1's answer, from both


def test_a_killed_server_costs_at_most_its_streams_and_the_next_requests_go_to_the_other(
        engine, servers, versions, router, expected):
    killed, other = engine.replicas
    streaming, outcomes = threading.Semaphore(0), []

    def user(i):
        text = ""
        try:
            for chunk in engine.stream([{"role": "user", "content": STORY}], LONG, router.adapter_for(f"u{i}")):
                if not text and chunk.text:
                    streaming.release()
                text += chunk.text
            outcomes.append(("ok", text))
        except EngineError as e:
            outcomes.append(("failed", str(e)))
            streaming.release()

    users = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    for t in users:
        t.start()
    for _ in users:
        assert streaming.acquire(timeout=120), "a stream did not start"
    on_killed = killed.inflight
    assert on_killed == other.inflight == 2  # least busy: two streams each
    os.killpg(servers[0].pid, signal.SIGKILL)  # mid-answer, streams open; its watchdog restarts it
    for t in users:
        t.join(timeout=180)
    failed = [o for o in outcomes if o[0] == "failed"]
    assert len(outcomes) == 4 and len(failed) <= on_killed, failed
    assert all("did not answer" in why or "stopped mid-answer" in why for _, why in failed), failed
    assert not killed.up and other.up
    before = other.started, killed.started
    with ThreadPoolExecutor(4) as pool:  # the users' retries, and everyone after
        answers = list(pool.map(lambda i: ask(engine, PROMPT, router.adapter_for(f"u{i}")), range(4)))
    assert answers == [expected[1]] * 4
    assert (other.started, killed.started) == (before[0] + 4, before[1])
    assert not killed.up  # all this while it was still down (its restart takes 30 s and more)


def test_the_restarted_server_is_synced_before_it_gets_requests(engine, servers, versions, router, expected, caplog):
    killed, other = engine.replicas
    v1 = versions[1][1]
    caplog.set_level(logging.INFO, logger="assistant.vllm_engine")
    stop, results = threading.Event(), []

    def traffic():  # one user asking all along: nothing fails while the server comes back
        while not stop.is_set():
            try:
                results.append(ask(engine, PROMPT, router.adapter_for("steady")))
            except EngineError as e:
                results.append(e)
            # A user's pace (reading, typing): at one question every 0.5 s the other server's
            # answering took both cores all along, and on 2 cores the restart did not finish
            # in 600 s (CI, 2026-12-02); at this pace it still gets questions all through it.
            time.sleep(5)

    asking = threading.Thread(target=traffic)
    asking.start()
    try:
        assert wait_for(lambda: servers[0].ready(), 600), "the killed server was not restarted"
        assert wait_for(lambda: killed.up, 120), "the restarted server was not synced"
    finally:
        stop.set()
        asking.join(timeout=60)
    assert {v1.name, engine.base.name} <= killed.model_ids()
    assert results and all(r == expected[0] for r in results), [r for r in results if r != expected[0]][:3]
    # Synced (and checked with /v1/models) before its first request: it never had to be told
    # about an adapter by a request that found it missing.
    assert f"vLLM at {killed.url} is up with 2 adapter(s)" in caplog.text
    assert "had forgotten" not in caplog.text
    before = killed.started
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda i: ask(engine, PROMPT, router.adapter_for(f"u{i}")), range(2)))
    assert answers == [expected[0]] * 2 and killed.started > before  # it takes its share again
    assert servers[0].restarts == 1 and other.up
