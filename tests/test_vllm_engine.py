"""The vLLM client without a vLLM server: its HTTP surface over httpx.MockTransport.

What is tested here is the client's own logic: parsing the event stream (in whatever
pieces the network delivers it), draining an adapter before it is unloaded, loading an
adapter again when a restarted server has forgotten it, and the errors it raises. The
real server is exercised once per behaviour in tests/integration/test_vllm.py.
"""

from __future__ import annotations

import os

import httpx
import pytest

from assistant.engine import Adapter, Chunk, EngineError, Sampling
from assistant.vllm_engine import VLLMEngine, sse_event
from fake_vllm import FakeVLLM, delta, sse
from tiny import save_tiny_checkpoint

GREEDY = Sampling(temperature=0.0, max_new_tokens=16)
HI = [{"role": "user", "content": "Hi"}]
V1 = Adapter("v1-000000000001", "/adapters/v1", 1)
V2 = Adapter("v2-000000000002", "/adapters/v2", 2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-chat")


@pytest.fixture
def server(checkpoint) -> FakeVLLM:
    return FakeVLLM(checkpoint.name)


def open_engine(checkpoint, server, base: Adapter | None = None) -> VLLMEngine:
    """An engine on ``server`` (a pool of one), with what it asked at start forgotten."""
    engine = VLLMEngine(checkpoint, 256, url="http://vllm.test", api_key="secret", base=base,
                        transport=httpx.MockTransport(server), probe_interval_s=0)
    server.requests.clear()
    return engine


@pytest.fixture
def vllm(checkpoint, server):
    engine = open_engine(checkpoint, server)
    yield engine
    engine.close()


def test_sse_lines():
    assert sse_event('data: {"a": 1}') == {"a": 1}
    assert sse_event("data: [DONE]") is None and sse_event("") is None and sse_event(": keep-alive") is None
    with pytest.raises(ValueError):
        sse_event("data: {not json")


def test_the_event_stream_is_read_in_whatever_pieces_it_arrives(vllm, server):
    server.answers.append(
        b": a comment vLLM may send\n\n"
        + sse({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
              delta("Hel"), delta("lo, wörld"), delta("", "stop"),
              {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 3}})
    )
    chunks = list(vllm.stream(HI, GREEDY))
    assert [c.text for c in chunks[:-1]] == ["Hel", "lo, wörld"]  # a split multi-byte character too
    assert chunks[-1] == Chunk("", finish_reason="stop", completion_tokens=3)
    path, body = server.requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == server.base_name  # the plain base: no adapter
    assert body["stream"] and body["temperature"] == 0.0 and "top_p" not in body  # greedy
    assert body["max_tokens"] == GREEDY.max_new_tokens and server.keys == {"Bearer secret"}


def test_an_answer_that_fails_or_stops_early_raises_instead_of_ending_quietly(vllm, server):
    server.answers.append(sse(delta("Hi"), {"error": {"message": "engine died", "code": 500}}))
    with pytest.raises(EngineError, match="failed mid-answer: .*engine died"):
        list(vllm.stream(HI, GREEDY))
    server.answers.append(sse(delta("Half an answer"), done=False))  # no finish_reason: cut short
    with pytest.raises(EngineError, match="ended the answer early$"):
        list(vllm.stream(HI, GREEDY))
    server.answers.append(b"")
    with pytest.raises(EngineError, match=r"ended the answer early \(no text\)"):
        list(vllm.stream(HI, GREEDY))


def test_an_adapter_is_unloaded_only_after_its_last_streaming_request(vllm, server):
    vllm.load_adapter(V1)
    assert server.loaded == {V1.name}
    server.answers.append(sse(delta("one"), delta(" two", "stop")))
    answer = vllm.stream(HI, GREEDY, V1)
    assert next(answer).text == "one"  # streaming from v1 now
    vllm.unload_adapter(V1.name)  # a swap retires v1 mid-answer
    assert "/v1/unload_lora_adapter" not in server.paths() and server.loaded == {V1.name}
    assert [c.text for c in answer] == [" two", ""]  # the answer finishes on v1
    assert server.paths()[-1] == "/v1/unload_lora_adapter" and server.loaded == set()
    with pytest.raises(EngineError, match="not loaded"):
        vllm.acquire(V1)

    vllm.load_adapter(V2)
    vllm.unload_adapter(V2.name)  # nobody streaming: unloaded at once
    assert server.paths()[-1] == "/v1/unload_lora_adapter" and server.loaded == set()


def test_a_rollback_to_a_draining_adapter_keeps_it(vllm, server):
    vllm.load_adapter(V1)
    held = vllm.acquire(V1)
    vllm.unload_adapter(V1.name)  # retiring while a request holds it
    vllm.load_adapter(V1)  # rolled back to before it drained: no second load, no unload
    vllm.release(held)
    assert server.paths().count("/v1/load_lora_adapter") == 1 and "/v1/unload_lora_adapter" not in server.paths()
    assert vllm.acquire(V1).adapter == V1


def test_a_server_that_forgot_an_adapter_gets_it_again_and_the_request_is_retried_once(vllm, server):
    vllm.load_adapter(V1)
    server.loaded.clear()  # restarted behind our back (someone else's server)
    server.answers.append(sse(delta("back", "stop")))
    assert [c.text for c in vllm.stream(HI, GREEDY, V1)] == ["back", ""]
    assert server.paths() == ["/v1/load_lora_adapter", "/v1/chat/completions", "/v1/load_lora_adapter",
                              "/v1/chat/completions"]
    assert server.requests[2][1] == {"lora_name": V1.name, "lora_path": V1.path}

    server.loaded.clear()
    server.forgetful = True  # the load "succeeds" and the adapter is still missing: no loop
    with pytest.raises(EngineError, match="vLLM answered 404"):
        list(vllm.stream(HI, GREEDY, V1))
    assert server.paths()[-3:] == ["/v1/chat/completions", "/v1/load_lora_adapter", "/v1/chat/completions"]


def test_the_plain_base_model_is_never_loaded_as_an_adapter(vllm, server):
    server.base_name = "renamed"  # the server no longer knows the base name: 404, no load to retry with
    with pytest.raises(EngineError, match="vLLM answered 404"):
        list(vllm.stream(HI, GREEDY))
    assert server.paths() == ["/v1/chat/completions"]


def test_after_a_restart_every_adapter_is_loaded_again_base_first_and_checked(checkpoint, server):
    base = Adapter("base-000000000000", "/adapters/base", 0)  # the zero adapter
    engine = open_engine(checkpoint, server, base=base)
    engine.load_adapter(V1)
    engine.load_adapter(V2)
    server.requests.clear()
    server.loaded.clear()
    assert engine.sync(engine.replicas[0])  # what the app's server calls when it restarted
    loads = [body["lora_name"] for path, body in server.requests if path == "/v1/load_lora_adapter"]
    assert loads[0] == base.name and sorted(loads) == sorted([base.name, V1.name, V2.name])
    assert server.paths()[0] == "/health" and server.paths()[-1] == "/v1/models"  # checked, not assumed
    engine.close()


def test_a_refused_load_is_not_recorded_and_already_loaded_counts_as_loaded(vllm, server):
    server.refuse_loads = True
    with pytest.raises(EngineError, match="vLLM refused adapter v1-000000000001: invalid adapter"):
        vllm.load_adapter(V1)
    with pytest.raises(EngineError, match="not loaded"):
        vllm.acquire(V1)
    server.refuse_loads = False
    server.loaded.add(V1.name)  # loaded by an earlier engine on the same server
    vllm.load_adapter(V1)
    assert vllm.acquire(V1).adapter == V1


def test_an_unreachable_server_and_a_full_context_are_engine_errors(checkpoint):
    def down(request):
        raise httpx.ConnectError("connection refused")

    with pytest.raises(EngineError, match=r"no model server answered at http://vllm.test"):
        VLLMEngine(checkpoint, 256, url="http://vllm.test", api_key="k", base=None, transport=httpx.MockTransport(down))


def test_a_server_that_stops_answering_fails_that_request_then_fast_until_it_is_back(vllm, server):
    server.down = True
    with pytest.raises(EngineError, match=r"the model server at http://vllm.test did not answer \(ConnectError"):
        list(vllm.stream(HI, GREEDY))
    with pytest.raises(EngineError, match="the model server at http://vllm.test is not answering; try again"):
        list(vllm.stream(HI, GREEDY))
    with pytest.raises(EngineError, match="not answering"):
        vllm.load_adapter(V1)
    server.down = False
    vllm.probe()  # what the prober thread does each second
    server.answers.append(sse(delta("back", "stop")))
    assert [c.text for c in vllm.stream(HI, GREEDY)] == ["back", ""]


def test_a_prompt_that_fills_the_context_is_refused(vllm):
    with pytest.raises(EngineError, match="fills the whole context"):
        list(vllm.stream([{"role": "user", "content": "x" * 300}], GREEDY))


class OwnServer:
    """What the engine reads of the VLLMServer the app started: is it ready, its restart hook."""

    def __init__(self):
        self.is_ready = True
        self.on_restart = lambda: None
        self.stopped = False

    def ready(self) -> bool:
        return self.is_ready

    def stop(self) -> None:
        self.stopped = True


def test_the_apps_own_server_is_judged_by_its_process_and_synced_by_its_restart_hook(checkpoint, server):
    own = OwnServer()
    engine = VLLMEngine(checkpoint, 256, url="http://vllm.test", api_key="secret", base=None, server=own,
                        transport=httpx.MockTransport(server), probe_interval_s=0)
    engine.load_adapter(V1)
    server.requests.clear()
    engine.probe()
    assert server.requests == []  # no HTTP probe: a slow answer on a busy machine cannot take it out
    own.is_ready = False  # died; its watchdog is restarting it
    server.restart()
    with pytest.raises(EngineError, match="the model server stopped and is restarting"):
        list(engine.stream(HI, GREEDY, V1))
    engine.probe()
    assert server.requests == [] and engine.up_replicas() == []  # no sync until the restart answers
    own.is_ready = True
    own.on_restart()  # what VLLMServer calls once the new process answers
    assert server.loaded == {V1.name} and server.paths()[-1] == "/v1/models" and engine.up_replicas()
    server.answers.append(sse(delta("back", "stop")))
    assert [c.text for c in engine.stream(HI, GREEDY, V1)] == ["back", ""]
    engine.close()
    assert own.stopped


def test_servers_sharing_a_cpu_machine_get_their_own_cores():
    from assistant.vllm_server import VLLMServerConfig, server_env, split_cores

    assert split_cores(2, cores=2) == ["0", "1"]
    assert split_cores(2, cores=8) == ["0-3", "4-7"] and split_cores(3, cores=8) == ["0-1", "2-3", "4-5"]
    assert split_cores(1, cores=8) == [None] and split_cores(3, cores=2) == [None, None, None]
    config = VLLMServerConfig(model_path="m", served_name="m", cpus="1")
    env = server_env(config, "key")
    if "VLLM_CPU_OMP_THREADS_BIND" in env:  # CPU machines only (a GPU server binds nothing)
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
        assert server_env(VLLMServerConfig(model_path="m", served_name="m"), "key")["VLLM_CPU_OMP_THREADS_BIND"] in (
            os.environ.get("VLLM_CPU_OMP_THREADS_BIND"), f"0-{os.cpu_count() - 1}")
