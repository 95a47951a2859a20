"""bench/methods_bench.py on the tiny checkpoint: each method trains the parameters it says
(counted from the model's shapes, not from peft), and a 1-step run prints the whole table,
one process per method."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tiny import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("methods_bench", ROOT / "bench" / "methods_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-chat")


@pytest.fixture
def data(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"code {i}?", "completion": f"zed {i % 3}."}) + "\n" for i in range(8)))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"the code {i}?", "completion": f"zed {i % 3}.", "expect": ["zed"]}) + "\n"
                            for i in range(3)))
    return train, held


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer of the decoder, by its short name, per layer."""
    import torch

    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name}


def test_each_method_trains_the_parameters_it_names(checkpoint):
    from transformers import AutoModelForCausalLM

    from tuning.config import TrainConfig
    from tuning.cost import trainable_params

    plain = AutoModelForCausalLM.from_pretrained(checkpoint)
    total = sum(p.numel() for p in plain.parameters())
    linears = linear_shapes(plain)
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    expected = {
        "base": 0,
        "full": total,
        # r x (in + out) for each linear layer: A is (r, in), B is (out, r)
        "lora-r4": sum(4 * (i + o) for i, o in linears.values()),
        "lora-r16": sum(16 * (i + o) for i, o in linears.values()),
        # one scale per output of k_proj and v_proj, one per input of down_proj
        "ia3": sum(o for n, (i, o) in linears.items() if n.endswith(("k_proj", "v_proj")))
        + sum(i for n, (i, o) in linears.items() if n.endswith("down_proj")),
    }
    assert expected["ia3"] == 2 * (16 + 16 + 64)
    for name, method in bench.METHODS.items():
        model, _ = bench.build(checkpoint, method, TrainConfig(learning_rate=method.learning_rate or 1e-5))
        trainable, _, _ = trainable_params(model)
        assert trainable == expected[name], name
        base_weights = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "ia3_" not in n)
        assert base_weights == total, name  # peft added weights beside the base, none replaced


def test_a_one_step_run_prints_every_column_for_every_method(checkpoint, data, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny ops: one thread each (see conftest)
    train, held = data
    results = bench.main(["--model", str(checkpoint), "--train", str(train), "--heldout", str(held),
                          "--steps", "1", "--batch-size", "4", "--no-regression", "--dtype", "float32"])
    out = capsys.readouterr().out
    print(out)
    assert [r["method"] for r in results] == list(bench.METHODS)
    assert not [r for r in results if "error" in r], results
    lines = [x for x in out.splitlines() if x.startswith("| ")]
    header, rows = lines[0], lines[2:]  # after the --- line
    assert header == "| " + " | ".join(bench.COLUMNS) + " |"
    assert len(rows) == len(bench.METHODS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(bench.COLUMNS) and all(cells), row
    by = {r["method"]: r for r in results}
    assert all(by[m]["steps"] == 1 and by[m]["peak_train_mb"] > 0 for m in ("full", "lora-r4", "lora-r16", "ia3"))
    assert by["base"]["steps"] == 0 and by["base"]["domain_total"] == 3
    assert by["lora-r16"]["hot_swap"].startswith("yes") and by["lora-r4"]["hot_swap"].startswith("yes")
    assert by["ia3"]["hot_swap"].startswith("no") and "not a LoRA adapter" in by["ia3"]["hot_swap"]
    assert by["full"]["hot_swap"].startswith("no")
    assert "CPU:" in out and "format float32" in out  # the machine and format beside the figures
