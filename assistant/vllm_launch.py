"""Run vLLM's OpenAI server with every route behind its API key (used by ``vllm_server``).

    python -m assistant.vllm_launch --model DIR --host 127.0.0.1 --port N ...  (vLLM's options)

Why not start ``vllm.entrypoints.openai.api_server`` directly: vLLM 0.32 checks the API
key only on paths under ``/v1``, ``/v2``, ``/inference`` and ``/cohere``. Seen here with
``--api-key`` set: ``POST /adapters`` (a SageMaker-style route that loads a LoRA adapter
from any path), ``POST /invocations`` (chat completions) and ``/tokenize`` all answer
without a key. This launcher widens the guarded prefix to every path before the server
starts, so only the holder of the key (the app) can load adapters or generate.

It also stops the server's process group when the app that started it disappears without
stopping it (killed with SIGKILL, crashed), so no orphaned vLLM keeps 5 GB of memory.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from assistant.vllm_lora_ops import register as register_lora_ops


# Our CPU LoRA ops (assistant/vllm_lora_ops.py) are a vLLM general plugin (pyproject entry
# point), which vLLM loads in every process it starts. Registered here as well, at import:
# entry-point discovery can be shadowed (a stale *.egg-info in the working folder was seen to
# hide it), and vLLM's spawned processes import this main module again, so they run this too.
register_lora_ops()


def _guard_every_path() -> None:
    from vllm.entrypoints.serve.middleware import authenticate

    authenticate.GUARDED_PREFIX = ("/",)


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os.killpg(os.getpgrp(), signal.SIGTERM)
                time.sleep(10)
                os.killpg(os.getpgrp(), signal.SIGKILL)
            time.sleep(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def main() -> None:
    if not os.environ.get("VLLM_API_KEY"):
        raise SystemExit("assistant.vllm_launch refuses to start without VLLM_API_KEY")
    _guard_every_path()
    parent = os.environ.get("ASSISTANT_PARENT_PID")
    if parent:
        _exit_with_parent(int(parent))
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
