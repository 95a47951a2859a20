"""The number format is chosen from the machine: each kind of CPU faked, and one real check
that a CPU whose kernels are limited to AVX2 gets float32 even though its flags say bf16."""

import os
import subprocess
import sys

import pytest

from assistant.precision import choose_format, cpu_info
from tuning.config import TrainConfig

EPYC_AVX2 = ("AMD EPYC 7B12", {"fpu", "sse4_2", "avx", "avx2", "fma"})
XEON_BF16 = ("Intel(R) Xeon(R) Platinum 8481C", {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
ARM_BF16 = ("Neoverse-V1", {"fp", "asimd", "sve", "bf16"})


def timer(speeds):
    calls = []

    def measure(dtype):
        calls.append(dtype)
        return speeds[dtype]

    measure.calls = calls
    return measure


def test_a_cpu_without_native_bf16_gets_float32_without_timing_anything():
    t = timer({"float32": 60.0, "bfloat16": 1.2})
    choice = choose_format("auto", cpu=EPYC_AVX2, gpu=False, timer=t)
    assert choice.dtype == "float32" and "no native bfloat16" in choice.reason
    assert t.calls == [] and choice.cpu.startswith("AMD EPYC 7B12 [avx2;")


@pytest.mark.parametrize("cpu", [XEON_BF16, ARM_BF16])
def test_a_cpu_with_native_bf16_that_measures_faster_gets_bfloat16(cpu):
    choice = choose_format("auto", cpu=cpu, gpu=False, timer=timer({"float32": 200.0, "bfloat16": 560.0}))
    assert choice.dtype == "bfloat16" and "560 vs float32 200 GFLOPS" in choice.reason


def test_flags_that_promise_bf16_but_a_slow_matmul_give_float32():
    # A hypervisor or ONEDNN_MAX_CPU_ISA can leave the flag while the kernels fall back.
    choice = choose_format("auto", cpu=XEON_BF16, gpu=False, timer=timer({"float32": 200.0, "bfloat16": 2.5}))
    assert choice.dtype == "float32" and "lists avx512_bf16 but" in choice.reason


def test_an_explicit_format_always_wins_and_a_wrong_one_is_refused():
    t = timer({"float32": 60.0, "bfloat16": 1.2})
    assert choose_format("bfloat16", cpu=EPYC_AVX2, gpu=False, timer=t).dtype == "bfloat16"
    assert choose_format("float32", cpu=XEON_BF16, gpu=False, timer=t).reason == "set explicitly"
    with pytest.raises(ValueError, match="auto, bfloat16, float32"):
        choose_format("fp8", cpu=EPYC_AVX2, timer=t)


def test_cpuinfo_is_read_for_model_and_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B45\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                 "processor\t: 1\nmodel name\t: AMD EPYC 9B45\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_info(f) == ("AMD EPYC 9B45", {"fpu", "avx2", "avx512f", "avx512_bf16"})
    assert cpu_info(tmp_path / "missing")[1] == set()


def test_kernel_caps_set_for_a_benchmark_are_named_beside_the_cpu(monkeypatch):
    """ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA leave MKL's float32 matmul on AVX-512
    (150-165 vs 91-95 GFLOPS with MKL_ENABLE_INSTRUCTIONS=AVX2 too, Xeon, 2026-12-07): a
    figure measured under caps says which."""
    from assistant.precision import describe_cpu

    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert "MKL" not in describe_cpu("Xeon", {"avx2"}) and describe_cpu("Xeon", {"avx2"}).endswith("]")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert describe_cpu("Xeon", {"avx2", "avx512f"}).endswith("MKL AVX2, oneDNN AVX2]")


def test_training_takes_a_format_setting_and_reads_the_old_boolean():
    assert TrainConfig().dtype == "auto"
    assert TrainConfig().replace(bf16=False).dtype == "float32"
    assert TrainConfig().replace(bf16=True).dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be"):
        TrainConfig().replace(dtype="float16")


@pytest.mark.slow
def test_on_this_machine_kernels_limited_to_avx2_get_float32():
    """Real torch, real timing: limit PyTorch, MKL and oneDNN to AVX2 (the kernels an
    AVX2-only EPYC runs; bf16 matmul then takes the reference path) and ask for the format."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    code = "from assistant.precision import choose_format as c; x = c('auto', gpu=False); print(x.dtype, '|', x.reason)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    assert out.stdout.startswith("float32 |"), out.stdout


def test_a_background_job_is_scheduled_idle_and_a_normal_one_is_not():
    # numpy's import starts OpenBLAS threads before the policy is applied: they yield too.
    code = ("import os, sys, numpy; from tuning.priority import apply; print(apply(sys.argv[1]), "
            "{os.sched_getscheduler(int(t)) for t in os.listdir('/proc/self/task')} == {os.SCHED_IDLE})")
    for policy, expected in (("background", "SCHED_IDLE True"), ("normal", "unchanged False")):
        out = subprocess.run([sys.executable, "-c", code, policy], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == expected, out.stderr


def _state(pid):
    import psutil

    return psutil.Process(pid).status()


def _wait_for(predicate, timeout=5.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_job_is_stopped_while_serving_is_busy_and_continued_after():
    import psutil

    from tuning.priority import PauseWhileBusy

    job = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"], start_new_session=True)
    busy, cancel = [False], [False]
    pauser = PauseWhileBusy(job.pid, lambda: busy[0], must_run=lambda: cancel[0], calm_s=0.2,
                            max_pause_s=1.0, run_s=0.5).start()
    try:
        assert _wait_for(lambda: _state(job.pid) != psutil.STATUS_STOPPED)
        busy[0] = True
        assert _wait_for(lambda: _state(job.pid) == psutil.STATUS_STOPPED), "not stopped while busy"
        # However busy serving stays, the job runs now and then (its heartbeat goes on).
        assert _wait_for(lambda: _state(job.pid) != psutil.STATUS_STOPPED, timeout=3), "never let run"
        assert _wait_for(lambda: _state(job.pid) == psutil.STATUS_STOPPED, timeout=3), "not stopped again"
        busy[0] = False
        assert _wait_for(lambda: _state(job.pid) != psutil.STATUS_STOPPED), "not continued when calm"
        busy[0] = True
        assert _wait_for(lambda: _state(job.pid) == psutil.STATUS_STOPPED)
        cancel[0] = True  # a cancel was asked for: the job must run to see it
        assert _wait_for(lambda: _state(job.pid) != psutil.STATUS_STOPPED, timeout=3), "a cancel left it stopped"
        assert pauser.pauses >= 3
    finally:
        pauser.stop()
        assert _state(job.pid) != psutil.STATUS_STOPPED  # stop() always leaves it running
        job.kill()
        job.wait()
