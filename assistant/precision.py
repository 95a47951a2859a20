"""Choose the number format (bfloat16 or float32) from the machine the code runs on.

bfloat16 halves the memory of weights and activations and, where the hardware computes it
natively, is the fast format: x86 CPUs with AVX512_BF16 or AMX-BF16, Arm CPUs with the BF16
extension, NVIDIA GPUs from Ampere on. Elsewhere PyTorch falls back to a reference kernel:
on a 2-core AMD EPYC with AVX2 only, a bf16 matrix multiply ran at 1.2 GFLOPS against
60 GFLOPS in float32, a DPO step did not finish in 7 minutes, and vLLM served 2.6x fewer
tokens/s (docs/figures.md). So ``auto`` picks bfloat16 only when the CPU's flags say it is
native *and* a timed 256x256 matrix multiply agrees (flags can lie: a hypervisor, or
``ONEDNN_MAX_CPU_ISA``/``ATEN_CPU_CAPABILITY`` limiting the kernels, gives a CPU that has
the flag but runs the slow path); float32 everywhere else. An explicit format always wins.

The app, the vLLM server it starts and every training job use this one choice; it is
printed at start, written in the log, and recorded with each job and adapter version.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

FORMATS = ("auto", "bfloat16", "float32")
# CPU flags (Linux /proc/cpuinfo names) that mean bf16 matrix math in hardware.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # the last is Arm's "Features" name
# Flags worth naming beside a figure: they decide which kernels run.
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16", "sve")
# bf16 must reach this share of float32's measured speed to be chosen: native bf16 ran
# 2.8-4x float32 here, the reference fallback 0.01x; anything near 1 is a wash, and float32
# is then the safer format (no rounding differences between batch sizes).
MIN_BF16_SPEEDUP = 1.1


@dataclass(frozen=True)
class FormatChoice:
    dtype: str  # "bfloat16" or "float32"
    setting: str  # what was asked for: "auto", "bfloat16" or "float32"
    reason: str
    cpu: str  # model, the flags that matter, PyTorch's kernel level

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"number format {self.dtype} ({self.reason}; CPU: {self.cpu})"


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU; empty where the file is not there (macOS)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def describe_cpu(model: str, flags: set[str]) -> str:
    """A CPU as figures name it: model, the flags that decide kernels, PyTorch's level."""
    shown = [f for f in SHOWN_FLAGS if f in flags]
    try:
        import torch

        level = torch.backends.cpu.get_cpu_capability()
    except Exception:  # torch missing or too old: the flags still say most of it
        level = "?"
    # Caps set for a benchmark: ATEN_CPU_CAPABILITY shows in torch's level, but MKL (float32
    # matmul) and oneDNN (bf16) choose their own kernels unless these are set too.
    caps = [f"{name} {os.environ[var]}" for name, var in (("MKL", "MKL_ENABLE_INSTRUCTIONS"), ("oneDNN", "ONEDNN_MAX_CPU_ISA"))
            if os.environ.get(var)]
    return f"{model} [{' '.join(shown) or 'no AVX2'}; torch kernels {level}" + "".join(f", {c}" for c in caps) + "]"


def matmul_gflops(dtype: str, n: int = 256, reps: int = 4) -> float:
    """Best-of-``reps`` speed of one n x n matrix multiply in ``dtype`` on one thread (GFLOPS).

    One thread: the per-core kernel is what differs between formats, and a single thread is
    not thrown off by another process busy on the other core (two threads were, 100x).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(n, n).to(getattr(torch, dtype))
        b = torch.randn(n, n).to(getattr(torch, dtype))
        a @ b  # first call: kernel selection and allocation
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / max(best, 1e-9) / 1e9


def choose_format(
    setting: str = "auto",
    *,
    cpu: tuple[str, set[str]] | None = None,
    gpu: bool | None = None,
    timer: Callable[[str], float] = matmul_gflops,
) -> FormatChoice:
    """The format to compute in. ``cpu`` (model, flags), ``gpu`` and ``timer`` are for tests."""
    if setting not in FORMATS:
        raise ValueError(f"number format must be one of {', '.join(FORMATS)}, not {setting!r}")
    model, flags = cpu if cpu is not None else cpu_info()
    described = describe_cpu(model, flags)
    if setting != "auto":
        return FormatChoice(setting, setting, "set explicitly", described)
    if gpu is None:
        gpu = _cuda_available()
    if gpu:
        import torch

        if torch.cuda.is_bf16_supported():
            return FormatChoice("bfloat16", setting, "the GPU computes bfloat16 natively", described)
        return FormatChoice("float32", setting, "the GPU has no native bfloat16", described)
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if not native:
        return FormatChoice("float32", setting, "the CPU has no native bfloat16 (no avx512_bf16/amx_bf16)", described)
    f32, bf16 = timer("float32"), timer("bfloat16")
    measured = f"bf16 matmul {bf16:.0f} vs float32 {f32:.0f} GFLOPS"
    if bf16 >= MIN_BF16_SPEEDUP * f32:
        return FormatChoice("bfloat16", setting, f"the CPU has {native[0]} and {measured}", described)
    return FormatChoice("float32", setting, f"the CPU lists {native[0]} but {measured}", described)


@functools.cache
def machine_format(setting: str = "auto") -> FormatChoice:
    """``choose_format`` once per process (the timing takes ~50 ms), logged when made."""
    choice = choose_format(setting)
    log.info("%s", choice.describe())
    return choice


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False
