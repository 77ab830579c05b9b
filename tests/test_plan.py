"""`factorlab plan`: per-GPU memory before launch, checked against measured peak memory of factorlab's
training loop on this CPU (random Llamas, every method; bench/plan_accuracy.py has all three sizes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factorlab.errors import ConfigError
from factorlab.plan import GIB, PlanConfig, make_plan, parse_size

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "bench"))


METHODS = ["full", "lora", "compacter++", "lora-mixer"]


def check_against_measured(size: str) -> None:
    from plan_accuracy import SIZES, measure, planned

    peaks = measure(SIZES[size], METHODS)
    for method in METHODS:
        plan = planned(SIZES[size], method)
        assert 0.75 <= plan / peaks[method] <= 1.25, (size, method, plan, peaks[method])


def test_the_plan_is_within_25_percent_of_measured_peak_memory():
    check_against_measured("small")  # every method; measured ratios in BENCHMARKS.md


@pytest.mark.slow
@pytest.mark.parametrize("size", ["medium", "large"])
def test_the_plan_holds_at_other_sizes(size):
    check_against_measured(size)


def test_fsdp_shards_and_checkpointing_trims_what_they_should():
    cfg = dict(model="llama-3-8b", precision="bfloat16", gpus=8, batch=8, seq=128)
    full = make_plan(PlanConfig(method="full", **cfg))
    ddp, fsdp = full.per_gpu("ddp"), full.per_gpu("fsdp")
    for part in ("weights", "gradients", "optimizer"):
        assert fsdp[part] == pytest.approx(ddp[part] / 8)
    assert full.parameters == 8_030_261_248  # Llama-3-8B's published count
    assert full.trainable == full.parameters
    assert ddp["optimizer"] == 8 * full.trainable  # Adam's two float32 moments
    checked = make_plan(PlanConfig(method="full", gradient_checkpointing=True, **cfg))
    assert checked.per_gpu("ddp")["activations"] < 0.3 * ddp["activations"]
    lora = make_plan(PlanConfig(method="lora", r=16, **cfg))
    assert (
        lora.trainable
        == 16 * sum((4096 + o) for o in (4096, 1024, 1024, 4096, 14336, 14336)) * 32
        + 16 * (4096 + 14336) * 32
    )  # r (in + out) for q, k, v, o, gate, up and down, 32 layers
    assert lora.frozen_bytes == 2 * (lora.parameters - lora.trainable)  # the base in bf16
    assert full.fits("fsdp") and not full.fits("ddp") and lora.fits("ddp")


def test_the_meta_model_counts_what_training_builds():
    import factorlab
    from factorlab.plan import adapt_for_plan
    from tiny_models import build

    for method in ("lora", "compacter++", "lora-mixer"):
        real = adapt_for_plan(build("llama"), PlanConfig(model="x", method=method, device="cpu"))
        config = {"model_type": "llama", **build("llama").config.to_diff_dict()}
        config.pop("transformers_version", None)
        folder = HERE / "_plan_config"
        folder.mkdir(exist_ok=True)
        try:
            (folder / "config.json").write_text(json.dumps(config))
            planned = make_plan(
                PlanConfig(model=str(folder), method=method, device="cpu", precision="float32")
            )
        finally:
            (folder / "config.json").unlink()
            folder.rmdir()
        assert planned.trainable == factorlab.count_parameters(real)["trainable"], method


def test_cli_plan_prints_a_table_and_advice(tmp_path):
    args = [
        "plan",
        "--model",
        "llama-3-8b",
        "--gpus",
        "8",
        "--gpu-memory",
        "80GB",
        "--json",
        str(tmp_path / "p.json"),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "factorlab", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| FSDP x 8 |" in result.stdout and "fits with FSDP over 8 GPUs" in result.stdout
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["fits"] == {"ddp": False, "fsdp": True}
    from factorlab.plan import advice

    one_gpu = make_plan(PlanConfig(model="llama-3-8b", gpus=1, gpu_memory=24.0))
    assert "it fits with DDP with --gradient-checkpointing, --method lora" in advice(one_gpu)
    bad = subprocess.run(
        [sys.executable, "-m", "factorlab", "plan", "--model", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "one of" in bad.stderr


def test_sizes_and_bad_values():
    assert parse_size("80GB") == 80 and parse_size("141 GiB") == 141 and parse_size("512MB") == 0.5
    for text in ("eighty", "-3GB", ""):
        with pytest.raises(ConfigError):
            parse_size(text)
    for change in ({"method": "dora"}, {"gpus": 0}, {"batch": -1}, {"precision": "fp8"}, {"gpu_memory": 0.0}):
        with pytest.raises(ConfigError):
            PlanConfig(model="llama-3-8b", **change)
    assert GIB == 2**30
