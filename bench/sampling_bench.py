"""What users see before any training: how often sampled answers of the served model
degenerate, under a few sampling settings, and what the settings do to the regression set.

    .venv/bin/python bench/sampling_bench.py                     # embedded model, 100 prompts x 2 samples
    .venv/bin/python bench/sampling_bench.py --prompts 50 --samples 1

Starts the real vLLM server the app starts (``assistant.vllm_server.VLLMServer``, on
loopback) and asks it over its chat API, all settings in one run (compare within a run).
An answer is degenerate when ``tuning.gate.damage`` finds repeated words, another language
or a stock apology in it; "hit the limit" counts answers cut by max_tokens (cut mid-word
or mid-sentence). The regression set (``tuning.gate.REGRESSION``) is asked with the same
settings and scored by its expected words. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from assistant.model_files import prepare_embedded_model  # noqa: E402
from assistant.precision import machine_format  # noqa: E402
from assistant.vllm_server import VLLMServer, VLLMServerConfig  # noqa: E402
from tuning.gate import REGRESSION, damage, golden_passes  # noqa: E402
from tuning.synthetic import prompts  # noqa: E402

# (label, temperature, top_p, repetition_penalty, frequency_penalty). vLLM's repetition
# penalty counts the prompt's tokens too (so "The capital of France is" is penalised for
# repeating the question); the frequency penalty counts only the answer's own tokens.
SETTINGS = [
    ("greedy", 0.0, 1.0, 1.0, 0.0),
    ("greedy, repetition 1.1", 0.0, 1.0, 1.1, 0.0),
    ("greedy, frequency 0.3", 0.0, 1.0, 1.0, 0.3),
    ("T 0.3 top-p 0.9 (old default)", 0.3, 0.9, 1.0, 0.0),
    ("T 0.3 top-p 0.9 repetition 1.1", 0.3, 0.9, 1.1, 0.0),
    ("T 0.3 top-p 0.9 frequency 0.3", 0.3, 0.9, 1.0, 0.3),
    ("T 0.3 top-p 0.9 frequency 0.5", 0.3, 0.9, 1.0, 0.5),
    ("T 0.7 top-p 0.9 frequency 0.3", 0.7, 0.9, 1.0, 0.3),
]


def ask(http: httpx.Client, name: str, prompt: str, temperature: float, top_p: float, rep: float, freq: float,
        max_tokens: int, seed: int) -> tuple[str, str]:
    body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "top_p": top_p, "repetition_penalty": rep, "frequency_penalty": freq,
            "seed": seed}
    r = http.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["message"]["content"] or "", choice["finish_reason"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / "data" / "models")))
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--dtype", default="auto")
    a = p.parse_args()

    model = prepare_embedded_model(a.models_dir)
    fmt = machine_format(a.dtype)
    dtype = fmt.dtype
    qs = prompts()[: a.prompts]
    server = VLLMServer(VLLMServerConfig(model_path=model, served_name="base", dtype=dtype))
    server.start()
    rows = []
    try:
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=600)
        for label, t, top_p, rep, freq in SETTINGS:
            samples = 1 if t == 0 else a.samples
            jobs = [(q, s) for q in qs for s in range(samples)]
            start = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                out = list(pool.map(lambda j: ask(http, "base", j[0], t, top_p, rep, freq, a.max_tokens, j[1]), jobs))
                gold = list(pool.map(lambda g: ask(http, "base", g.prompt, t, top_p, rep, freq, 64, 0)[0], REGRESSION))
            kinds: dict[str, int] = {}
            examples = []
            for (q, _), (text, _) in zip(jobs, out):
                why = damage(text)
                if why:
                    kind = "repeats" if why.startswith("repeats") else why
                    kinds[kind] = kinds.get(kind, 0) + 1
                    if len(examples) < 2:
                        examples.append(f"{q!r} -> {text[:80]!r} ({why})")
            rows.append({
                "setting": label, "answers": len(out), "degenerate": sum(kinds.values()), "kinds": kinds,
                "hit the limit": sum(f == "length" for _, f in out),
                "mean words": round(sum(len(x.split()) for x, _ in out) / len(out), 1),
                "regression set": f"{sum(golden_passes(x, g) for g, x in zip(REGRESSION, gold))}/{len(REGRESSION)}",
                "seconds": round(time.monotonic() - start, 1), "examples": examples,
            })
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()

    print(f"\n{len(qs)} prompts (tuning.synthetic), {a.samples} samples each when sampling, max {a.max_tokens} tokens; "
          f"{time.strftime('%Y-%m-%d')}; vLLM, {fmt.describe()}")
    print("| setting | degenerate | of which | hit the limit | mean words | regression set |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items())) or "-"
        print(f"| {r['setting']} | {r['degenerate']}/{r['answers']} ({r['degenerate'] / r['answers']:.0%}) | {kinds} | "
              f"{r['hit the limit']} | {r['mean words']} | {r['regression set']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
