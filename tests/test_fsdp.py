"""FSDP2 on CPU (gloo): 2 processes train a random Llama (LoRA and full fine-tuning) like one process,
each holding about half of the parameter and optimizer bytes; a run stopped midway resumes from its
sharded checkpoint to bit-identical weights; rank 0 writes the result as a PEFT / from_pretrained folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import factorlab
from tiny_models import build

HERE = Path(__file__).parent
SCRIPT = str(HERE / "fsdp_finetune.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    subprocess.run([sys.executable, SCRIPT, str(one), "single"], check=True, env=env, timeout=300)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29541",
    ]
    subprocess.run([*torchrun, SCRIPT, str(two)], check=True, env=env, timeout=600)
    return one, two


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_sharded_processes_follow_one_process(runs, method):
    one, two = (json.loads((folder / "report.json").read_text())[method] for folder in runs)
    assert len(one["losses"]) == len(two["losses"]) == 8
    # measured: losses within 1e-6 of one process (AVX-512); the all-gathers and reduce-scatters only
    # change the order of float sums
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)
    single, sharded = (load_file(folder / f"{method}.safetensors") for folder in runs)
    assert single.keys() == sharded.keys()
    for key in single:  # measured ||two - one|| / ||one|| <= 2.5e-6 (AVX-512); the DDP test's margin
        assert float((sharded[key] - single[key]).norm() / single[key].norm()) < 1e-3, key


@pytest.mark.parametrize("method", ["lora", "full"])
def test_each_rank_holds_about_half_the_bytes(runs, method):
    one, two = (json.loads((folder / "report.json").read_text())[method] for folder in runs)
    whole = one["bytes"]["parameters"] + one["bytes"]["optimizer"]
    for rank in two["bytes_per_rank"]:
        assert rank["parameters"] + rank["optimizer"] <= 0.6 * whole  # measured: 0.50 on both ranks
        assert rank["optimizer"] <= 0.6 * one["bytes"]["optimizer"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_stopped_midway_resumes_to_bit_identical_weights(runs, method):
    _, two = runs
    report = json.loads((two / "report.json").read_text())[method]
    assert len(report["partial"]) == 7 and report["resumed_losses"] == report["losses"]
    straight, resumed = (
        load_file(two / f"{method}.safetensors"),
        load_file(two / f"{method}-resumed.safetensors"),
    )
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_rank_0_writes_loadable_results(runs):
    _, two = runs
    sys.path.insert(0, str(HERE))
    from fsdp_finetune import model_for

    gathered = load_file(two / "lora.safetensors")
    adapted = factorlab.AdaptedModel.from_pretrained(
        build("llama", num_hidden_layers=4, intermediate_size=256), two / "lora-written"
    )
    expected = model_for("lora")
    with torch.no_grad():
        for name, param in expected.named_parameters():
            key = name
            if param.requires_grad:
                param.copy_(gathered[key])
    ids = torch.randint(1, 1000, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        adapted(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5, rtol=0
    )
    import transformers as tf

    full = tf.AutoModelForCausalLM.from_pretrained(two / "full-written", local_files_only=True)
    weights = load_file(two / "full.safetensors")
    for name, param in full.named_parameters():
        assert torch.equal(param, weights[name]), name
