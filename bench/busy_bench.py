"""Serving while training: chats with no job and with a DPO job running on the same machine,
and the job's seconds per step with and without chats, for each job priority, in one run.

    .venv/bin/python bench/busy_bench.py                       # 8 users, 60 s phases, both priorities
    .venv/bin/python bench/busy_bench.py --think-s 5 --priorities background

Users: ``--chats`` threads, each sending a message (``--new-tokens`` greedy tokens through a
rank-16 adapter, as the live version is served), then pausing ``--think-s`` seconds (0: the
next message at once, the heaviest load), until the phase ends. Chat throughput is completion
tokens over the phase; TTFT is per message. The job is a real DPO training loop
(tuning.dpo.train_loop, the machine's format, batch 4, ~250-token pairs) in its own
process under the priority the app gives jobs (tuning.priority); its speed is steps done
over the phase. "background+pause" is the app's default: background priority, and the job
stopped while ``--pause-at`` or more answers stream (``PauseWhileBusy``, as the app's
launcher uses it). Phases: chats alone; then per setting: the job alone, then chats + job.
Prints one table with the CPU, format and date. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving_bench import PROMPTS, chat, make_versions  # noqa: E402

from assistant.engine import Sampling  # noqa: E402

REJECTED = ("{q} That is a good question, and there are several things to say about it. First, it helps "
            "to look at the history of the idea and how people have thought about it over the years. "
            "Second, there are practical points that matter in everyday life, and they are often "
            "overlooked. Third, experts disagree on some details, but they agree on the main points. "
            "In short, the answer depends on the situation, and it is worth reading more about it. ") * 2


def job_worker(a) -> None:
    """The training job: real DPO steps until killed, one JSON line per step."""
    from tuning.priority import apply

    applied = apply(a.worker)  # before torch starts its threads: they inherit it
    from assistant.precision import machine_format
    from tuning.config import TrainConfig
    from tuning.dpo import train_loop
    from tuning.synthetic import prompts
    from tuning.trainer import load_for_training

    config = TrainConfig(epochs=1000, dtype=machine_format().dtype)
    pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": q}],
              "chosen": [{"role": "assistant", "content": f"{q} In one sentence: it depends."}],
              "rejected": [{"role": "assistant", "content": REJECTED.format(q=q)}]}
             for i, q in enumerate(prompts()[:32])]
    model, tok = load_for_training(Path(a.model_dir), config, None, Path("."))
    print(json.dumps({"priority": applied, "dtype": config.dtype}), flush=True)
    train_loop(model, tok, pairs, config, lambda row: print(json.dumps({"t": time.time(), "step": row["step"]}), flush=True))


class Job:
    """A job_worker process; ``steps_between(t0, t1)`` counts its steps in a window."""

    def __init__(self, setting: str, model_dir: Path, streaming, pause_at: int):
        from tuning.priority import PauseWhileBusy

        self.steps: list[float] = []
        self.info: dict = {}
        priority, _, pause = setting.partition("+")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", priority, "--model-dir", str(model_dir)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.pauser = PauseWhileBusy(self.proc.pid, lambda: streaming() >= pause_at).start() if pause else None

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                row = json.loads(line)
                if "t" in row:
                    self.steps.append(row["t"])
                else:
                    self.info = row

    def wait_steps(self, n: int, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while len(self.steps) < n and time.time() < deadline and self.proc.poll() is None:
            time.sleep(0.5)
        if len(self.steps) < n:
            raise RuntimeError(f"the training job made {len(self.steps)} steps (exit {self.proc.poll()})")

    def seconds_per_step(self, t0: float, t1: float) -> float:
        done = [t for t in self.steps if t0 <= t <= t1]
        return (t1 - t0) / len(done) if done else float("inf")

    def stop(self) -> None:
        if self.pauser is not None:
            self.pauser.stop()
        self.proc.kill()
        self.proc.wait()


STREAMING = [0]  # answers being written now (what the app's launcher reads from its slots)


def chat_phase(engine, adapter, users: int, seconds: float, think_s: float, new_tokens: int) -> dict:
    sampling = Sampling(temperature=0.0, max_new_tokens=new_tokens)
    ttfts, tokens, lock = [], [0], threading.Lock()
    start = time.time()
    deadline = start + seconds

    def user(i: int) -> None:
        n = i
        while time.time() < deadline:
            with lock:
                STREAMING[0] += 1
            try:
                first, count = chat(engine, PROMPTS[n % len(PROMPTS)], sampling, adapter)
            finally:
                with lock:
                    STREAMING[0] -= 1
            with lock:
                ttfts.append(first)
                tokens[0] += count
            n += users
            if think_s:
                time.sleep(think_s)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.time()
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) > 1 else [ttfts[0]] * 19
    return {"t0": start, "t1": end, "tok/s": tokens[0] / (end - start), "messages": len(ttfts),
            "ttft p50 ms": statistics.median(ttfts) * 1000, "ttft p95 ms": q[18] * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / "data" / "models")))
    p.add_argument("--chats", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--think-s", type=float, default=0.0, help="pause between a user's messages (0: none)")
    p.add_argument("--phase-s", type=float, default=60.0)
    p.add_argument("--priorities", default="background+pause,background,normal",
                   help="job settings to measure: a tuning.priority policy, '+pause' to stop it while busy")
    p.add_argument("--pause-at", type=int, default=4, help="answers streaming at once that stop the job (the app's default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.worker:
        return job_worker(a)

    from assistant.model_files import prepare_embedded_model
    from assistant.precision import machine_format
    from assistant.vllm_engine import VLLMEngine
    from assistant.vllm_server import VLLMServer, VLLMServerConfig

    fmt = machine_format()
    print(fmt.describe(), flush=True)
    model = prepare_embedded_model(a.models_dir)
    work = Path(tempfile.mkdtemp(prefix="busy-bench-"))
    adapter = make_versions(model, work, 1)[1].adapter
    server = VLLMServer(VLLMServerConfig(model_path=model, served_name=model.name, max_lora_rank=16,
                                         dtype=fmt.dtype, log_path=work / "vllm.log"))
    server.start()
    cols: dict[str, dict] = {}
    try:
        engine = VLLMEngine(model, 2048, url=server.url, api_key=server.api_key, server=server, base=None,
                            served_name=model.name)
        engine.load_adapter(adapter)
        chat_phase(engine, adapter, a.chats, 10, 0, 8)  # warm-up
        cols["no job"] = chat_phase(engine, adapter, a.chats, a.phase_s, a.think_s, a.new_tokens)
        print("no job:", cols["no job"], flush=True)
        for priority in a.priorities.split(","):
            job = Job(priority, model, lambda: STREAMING[0], a.pause_at)
            try:
                job.wait_steps(2)
                t0 = time.time()
                time.sleep(a.phase_s)
                alone = job.seconds_per_step(t0, time.time())
                row = chat_phase(engine, adapter, a.chats, a.phase_s, a.think_s, a.new_tokens)
                row["job s/step alone"] = alone
                row["job s/step with chats"] = job.seconds_per_step(row["t0"], row["t1"])
                row["applied"] = job.info.get("priority")
                row["pauses"] = job.pauser.pauses if job.pauser else 0
                cols[f"job {priority}"] = row
                print(f"job {priority}:", row, flush=True)
            finally:
                job.stop()
    finally:
        server.stop()

    quiet = cols["no job"]
    print(f"\n{time.strftime('%Y-%m-%d')}; CPU: {fmt.cpu}; {os.cpu_count()} CPUs; format {fmt.dtype}")
    print(f"{a.chats} users, {a.new_tokens} new tokens a message, think {a.think_s:g} s, {a.phase_s:g} s phases; "
          "job: DPO loop, batch 4 pairs\n")
    names = list(cols)
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")

    def line(label, key, fmt_):
        print(f"| {label} | " + " | ".join(fmt_(cols[n][key]) if key in cols[n] else "-" for n in names) + " |")

    line("chat tok/s", "tok/s", lambda v: f"{v:.1f}")
    print("| chat tok/s vs no job | " + " | ".join(f"{cols[n]['tok/s'] / quiet['tok/s']:.2f}" for n in names) + " |")
    line("messages", "messages", str)
    line("TTFT p50 ms", "ttft p50 ms", lambda v: f"{v:.0f}")
    line("TTFT p95 ms", "ttft p95 ms", lambda v: f"{v:.0f}")
    line("job s/step alone", "job s/step alone", lambda v: f"{v:.2f}")
    line("job s/step with chats", "job s/step with chats", lambda v: f"{v:.2f}")
    print("| job slowdown with chats | " + " | ".join(
        f"{cols[n]['job s/step with chats'] / cols[n]['job s/step alone']:.2f}x" if "job s/step alone" in cols[n] else "-"
        for n in names) + " |")
    line("scheduling applied", "applied", str)
    line("times the job was stopped", "pauses", str)


if __name__ == "__main__":
    main()
