"""Start the self-hosted assistant: a Gradio chat page on a local model, served by vLLM.

    python app.py                       # embedded SmolLM2-135M-Instruct, http://127.0.0.1:7860
    python app.py --model /path/to/hf-checkpoint --port 8000
    python app.py --data-dir /var/lib/assistant --host 0.0.0.0   # listen beyond loopback
    python app.py --vllm-url http://10.0.0.5:8000 --vllm-api-key KEY   # a vLLM already running
    python app.py --engine hf           # transformers+peft in process, where vLLM cannot run
    python app.py --api-keys keys.txt   # OpenAI-compatible API on port+1 for these users

Wiring only: parse options, open the store, start the engine, follow the live adapter
version, build the page, launch; stop the vLLM server on the way out.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from assistant.config import ServeConfig
from assistant.engine import Sampling


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    d = ServeConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=d.data_dir, help="where the database, models and adapters live")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--models-dir", type=Path, default=None, help="where prepared base models are kept (default DATA_DIR/models)")
    p.add_argument("--engine", choices=["vllm", "hf"], default=d.engine, help="serving engine (default vllm)")
    p.add_argument("--vllm-url", default=None, help="use this running vLLM server instead of starting one")
    p.add_argument("--vllm-api-key", default=os.environ.get("ASSISTANT_VLLM_API_KEY"), help="its API key (or env ASSISTANT_VLLM_API_KEY)")
    p.add_argument("--vllm-dtype", default=d.vllm_dtype, help="dtype of the started vLLM server")
    p.add_argument("--api-keys", type=Path, default=None, help="file of 'user_id key' lines: serve the OpenAI-compatible API")
    p.add_argument("--api-port", type=int, default=None, help="port of that API (default PORT+1)")
    p.add_argument("--host", default=d.host, help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--context-tokens", type=int, default=d.context_tokens, help="prompt + answer token budget")
    p.add_argument("--max-new-tokens", type=int, default=d.sampling.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.sampling.temperature, help="0 for greedy answers")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (repeatable answers, for tests)")
    a = p.parse_args(argv)
    sampling = Sampling(temperature=a.temperature, top_p=d.sampling.top_p, max_new_tokens=a.max_new_tokens, seed=a.seed)
    return ServeConfig(
        data_dir=a.data_dir, model=a.model, engine=a.engine, host=a.host, port=a.port,
        context_tokens=a.context_tokens, sampling=sampling, models_path=a.models_dir,
        vllm_url=a.vllm_url, vllm_api_key=a.vllm_api_key, vllm_dtype=a.vllm_dtype,
        api_keys_file=a.api_keys, api_port=a.api_port,
    )


def build(config: ServeConfig, closers: list | None = None):
    """Open the store, start the engine and return the Gradio app (not launched).

    What must be stopped on exit (the vLLM server, the API) is appended to ``closers``.
    """
    from assistant.adapters import base_weight_shapes
    from assistant.chat import ChatService
    from assistant.model_files import resolve_model
    from assistant.serving import AdapterRouter, record_from_row
    from store import Store
    from ui.chat_page import ChatPage

    closers = closers if closers is not None else []
    store = Store(config.db_path)
    model_path = resolve_model(config.model, config.models_dir)
    if config.engine == "vllm":
        from assistant.vllm_engine import open_vllm_engine

        engine = open_vllm_engine(config, model_path)
    else:
        from assistant.hf_engine import HFEngine

        engine = HFEngine(model_path, config.context_tokens)
    closers.append(engine.close)
    router = AdapterRouter(
        engine, lambda version: record_from_row(store.adapter(version), config.data_dir),
        base_shapes=base_weight_shapes(model_path), max_rank=config.max_lora_rank,
    )
    router.follow(store.live_version)
    closers.insert(0, router.close)
    if config.api_keys_file:
        if config.engine != "vllm":
            raise SystemExit("--api-keys needs --engine vllm")
        from assistant.openai_api import build_api, read_keys, serve_api

        api = serve_api(
            build_api(engine, router.adapter_for, read_keys(config.api_keys_file)),
            config.host, config.api_port or config.port + 1,
        )
        closers.insert(0, lambda: setattr(api, "should_exit", True))
    service = ChatService(store=store, engine=engine, sampling=config.sampling, adapter_for=router.adapter_for)
    return ChatPage(service).build()


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    config = parse_args(argv)
    # SIGTERM (systemd, docker stop, a test) unwinds like Ctrl-C so the finally below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    closers: list = []
    try:
        demo = build(config, closers)
        demo.queue(default_concurrency_limit=16).launch(
            server_name=config.host, server_port=config.port, show_error=True
        )
    finally:
        for close in closers:
            close()


if __name__ == "__main__":
    main()
