"""Start the self-hosted assistant: a Gradio chat page on a local model.

    python app.py                       # embedded SmolLM2-135M-Instruct, http://127.0.0.1:7860
    python app.py --model /path/to/hf-checkpoint --port 8000
    python app.py --data-dir /var/lib/assistant --host 0.0.0.0   # listen beyond loopback

Wiring only: parse options, open the store, start the engine, build the page, launch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from assistant.config import ServeConfig
from assistant.engine import Sampling


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    d = ServeConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=d.data_dir, help="where the database, models and adapters live")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--models-dir", type=Path, default=None, help="where prepared base models are kept (default DATA_DIR/models)")
    p.add_argument("--engine", choices=["hf"], default=d.engine, help="serving engine")
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
    )


def build(config: ServeConfig):
    """Open the store, start the engine and return the Gradio app (not launched)."""
    from assistant.chat import ChatService
    from assistant.hf_engine import HFEngine
    from assistant.model_files import resolve_model
    from store import Store
    from ui.chat_page import ChatPage

    store = Store(config.db_path)
    model_path = resolve_model(config.model, config.models_dir)
    engine = HFEngine(model_path, config.context_tokens)
    service = ChatService(store=store, engine=engine, sampling=config.sampling)
    return ChatPage(service).build()


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    config = parse_args(argv)
    demo = build(config)
    demo.queue(default_concurrency_limit=16).launch(
        server_name=config.host, server_port=config.port, show_error=True
    )


if __name__ == "__main__":
    main()
