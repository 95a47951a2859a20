"""Serving benchmark: vLLM engine vs transformers engine, base vs adapter, swap latency.

    .venv/bin/python bench/serving_bench.py                  # embedded model, 8 chats x 64 tokens
    .venv/bin/python bench/serving_bench.py --chats 8 --new-tokens 64 --swaps 5

Prints one table, all figures from the same run (the machine is shared: compare ratios
within a run, not figures across runs). Throughput is completion tokens / wall time of
N chats sent at once; time to first token is the median of single requests; swap latency
is from ``Controller.promote(new version)``, the path an admin's promotion takes (validate,
record in the store, load, pointer flip), to the first token of a request answered by the
new version. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from assistant.adapters import adapter_name, base_model_identity, base_weight_shapes, content_hash  # noqa: E402
from assistant.base_adapter import base_adapter, write_lora  # noqa: E402
from assistant.engine import Adapter, Sampling  # noqa: E402
from assistant.serving import AdapterRouter  # noqa: E402
from loop.control import Controller  # noqa: E402
from loop.versions import resolve_version  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe a walk through a forest in autumn.",
    "Give advice to someone learning to cook.",
    "Tell me about the history of paper.",
    "Write a letter to a friend about your holiday.",
    "Explain why the sky is blue.",
    "Describe your ideal city.",
]
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # all-linear, as DPO trains


def make_versions(model: Path, data: Path, store, n: int) -> dict[int, Adapter]:
    """n versions registered in ``store`` as training registers them, in ``data``/adapters."""
    out = {}
    for v in range(1, n + 1):
        folder = write_lora(data / "adapters" / f"v{v}", model, rank=RANK, targets=TARGETS, b_scale=0.02, seed=v)
        digest = content_hash(folder)
        store.add_adapter({"version": v, "name": adapter_name(v, digest), "content_hash": digest,
                           "base_model": base_model_identity(model), "path": f"adapters/v{v}", "gate_passed": 1})
        out[v] = Adapter(adapter_name(v, digest), str(folder.resolve()), v)
    return out


def chat(engine, prompt: str, sampling: Sampling, adapter) -> tuple[float, int]:
    """(seconds to first token, completion tokens) of one streamed answer."""
    start, first, tokens = time.perf_counter(), None, 0
    for chunk in engine.stream([{"role": "user", "content": prompt}], sampling, adapter):
        if chunk.text and first is None:
            first = time.perf_counter() - start
        if chunk.finish_reason:
            tokens = chunk.completion_tokens or 0
    return first or float("nan"), tokens


def throughput(engine, chats: int, sampling: Sampling, adapter) -> float:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(chats)]
    start = time.perf_counter()
    with ThreadPoolExecutor(chats) as pool:
        results = list(pool.map(lambda p: chat(engine, p, sampling, adapter), prompts))
    return sum(t for _, t in results) / (time.perf_counter() - start)


def ttft_ms(engine, sampling: Sampling, adapter, n: int = 5) -> float:
    short = Sampling(temperature=sampling.temperature, max_new_tokens=8)
    chat(engine, PROMPTS[0], short, adapter)  # warm
    return statistics.median(chat(engine, PROMPTS[i % 8], short, adapter)[0] for i in range(n)) * 1000


def swap_ms(control: Controller, router: AdapterRouter, engine, versions: list[int]) -> list[float]:
    """promote(v) -> first token answered by v, for each new version in turn."""
    short = Sampling(temperature=0.0, max_new_tokens=4)
    out = []
    for v in versions:
        start = time.perf_counter()
        control.promote("bench", v)
        adapter = router.adapter_for("bench")
        assert adapter.version == v
        asked = time.perf_counter()
        first, _ = chat(engine, PROMPTS[0], short, adapter)
        out.append((asked - start + first) * 1000)
    return out


def measure(name, engine, chats, sampling, adapter, control=None, router=None, swap_versions=()):
    row = {"engine": name}
    throughput(engine, chats, Sampling(temperature=0.0, max_new_tokens=8), adapter)  # warm-up: first batches allocate
    row["tok/s base"] = throughput(engine, chats, sampling, None)
    row["tok/s adapter"] = throughput(engine, chats, sampling, adapter)
    row["tok/s 1 chat"] = throughput(engine, 1, sampling, None)
    row["TTFT base ms"] = ttft_ms(engine, sampling, None)
    row["TTFT adapter ms"] = ttft_ms(engine, sampling, adapter)
    if control is not None and swap_versions:
        swaps = swap_ms(control, router, engine, swap_versions)
        row["swap ms (median)"] = statistics.median(swaps)
        row["swap ms (max)"] = max(swaps)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / "data" / "models")))
    p.add_argument("--chats", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--swaps", type=int, default=5)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="number format of both engines (default auto: what the app picks on this machine)")
    p.add_argument("--skip-hf", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from assistant.model_files import prepare_embedded_model
    from assistant.precision import choose_format
    from assistant.vllm_engine import VLLMEngine
    from assistant.vllm_server import VLLMServer, VLLMServerConfig
    from store import Store

    fmt = choose_format(a.dtype)
    print(fmt.describe())
    model = prepare_embedded_model(a.models_dir)
    sampling = Sampling(temperature=0.0, max_new_tokens=a.new_tokens)
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    store = Store(work / "assistant.db")
    store.create_user("bench", "bench-password", is_admin=True)
    versions = make_versions(model, work, store, 1 + a.swaps)
    rows = []

    server = VLLMServer(VLLMServerConfig(
        model_path=model, served_name=model.name, context_tokens=2048, max_lora_rank=RANK,
        dtype=fmt.dtype, log_path=work / "vllm.log",
    ))
    t = time.perf_counter()
    server.start()
    startup = time.perf_counter() - t
    try:
        # As the app does: the base model by its own name when the server runs our LoRA ops.
        engine = VLLMEngine(model, 2048, url=server.url, api_key=server.api_key, server=server,
                            base=None if server.fixed_lora_ops else base_adapter(model, work, RANK),
                            served_name=model.name)
        print(f"vLLM base requests: {'no adapter (our LoRA ops)' if engine.plain_base else 'zero adapter'}")
        router = AdapterRouter(engine)
        shapes, identity = base_weight_shapes(model), base_model_identity(model)
        control = Controller(store, router, lambda v: resolve_version(store, work, v, base_shapes=shapes,
                                                                      base_model=identity, max_rank=RANK),
                             launcher=lambda job: None)
        control.promote("bench", 1)
        row = measure(f"vLLM ({fmt.dtype})", engine, a.chats, sampling, versions[1],
                      control, router, list(range(2, 2 + a.swaps)))
        if engine.plain_base:  # what the base costs where the app must use the zero adapter
            zero = base_adapter(model, work, RANK)
            engine.load_adapter(zero)
            row["tok/s base, zero adapter"] = throughput(engine, a.chats, sampling, zero)
        row["start-up s"] = startup
        rows.append(row)
    finally:
        server.stop()

    if not a.skip_hf:
        from assistant.hf_engine import HFEngine

        hf = HFEngine(model, 2048, dtype=fmt.torch_dtype())
        hf.load_adapter(versions[1])
        rows.append(measure(f"transformers ({fmt.dtype})", hf, a.chats, sampling, versions[1]))

    print(f"\n{a.chats} concurrent chats x {a.new_tokens} new tokens, greedy, {model.name}, "
          f"adapter rank {RANK} all-linear; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{time.strftime('%Y-%m-%d')}\nCPU: {fmt.cpu}; format {fmt.dtype} ({fmt.reason})\n")
    keys = [k for k in rows[0] if k != "engine"]
    print(f"{'':26}" + "".join(f"{r['engine']:>22}" for r in rows))
    for k in keys:
        print(f"{k:26}" + "".join(f"{r[k]:>22.1f}" if k in r else f"{'-':>22}" for r in rows))
    if len(rows) == 2:
        for k in ("tok/s base", "tok/s adapter"):
            print(f"{'vLLM/hf ' + k:26}{rows[0][k] / rows[1][k]:>22.1f}x")


if __name__ == "__main__":
    main()
