"""Training under torchrun (DDP, gloo) and resuming from a checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factorlab.inject.train import FineTuneSettings, fine_tune
from factorlab.inject.world import BUILTIN_RELATIONS, World
from factorlab.recipes.inject import cached_backend

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def backend():
    return cached_backend("tiny", None)


def test_resume_gives_the_same_final_weights_as_an_uninterrupted_run(backend, tmp_path):
    world = World.generate(BUILTIN_RELATIONS["city-language"], seed=1)
    settings = FineTuneSettings("lora", r=4, epochs=2, seed=1)
    straight, straight_losses = fine_tune(backend, world, settings)
    ckpt = tmp_path / "ckpt"
    _, partial = fine_tune(backend, world, settings, checkpoint_dir=ckpt, checkpoint_every=5, stop_after=13)
    assert len(partial) == 13 and (ckpt / "training_state.json").exists()
    assert json.loads((ckpt / "training_state.json").read_text())["step"] == 10  # the last checkpoint
    resumed, losses = fine_tune(backend, world, settings, checkpoint_dir=ckpt, checkpoint_every=5)
    assert losses == straight_losses
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(backend, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    script = str(HERE / "ddp_finetune.py")
    subprocess.run([sys.executable, script, str(single)], check=True, env=env, timeout=300)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
    ]
    subprocess.run([*torchrun, script, str(double)], check=True, env=env, timeout=300)
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert len(one["losses"]) == len(two["losses"]) == 15  # 240 training texts, global batch 16
    for a, b in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    # The weights after 15 Adam steps, as whole tensors: elementwise, Adam turns the all-reduce's other
    # summation order into differences of up to 8e-4 in single entries (AVX2 kernels). Measured
    # ||two - one|| / ||one||: B 9.6e-6 (AVX-512) and 9.2e-5 (AVX2), A 8.9e-6 and 1.2e-4; one process on
    # AVX-512 vs AVX2 differs by 5.8e-4 (B). B starts at zero, so ||B|| is the whole update.
    trained = {n: load_file(f"{f}.safetensors") for n, f in (("one", single), ("two", double))}
    assert trained["one"].keys() == trained["two"].keys()
    for kind in ("lora_A", "lora_B"):
        one_w, two_w = (
            torch.cat([t.flatten() for k, t in sorted(trained[n].items()) if kind in k]) for n in trained
        )
        assert float((two_w - one_w).norm() / one_w.norm()) < 1e-3, kind


def test_accelerate_launch_matches_one_process(backend, tmp_path):
    pytest.importorskip("accelerate")
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    script = str(HERE / "ddp_finetune.py")
    subprocess.run([sys.executable, script, str(tmp_path / "one.json")], check=True, env=env, timeout=300)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29518",
    ]
    subprocess.run([*launch, script, str(tmp_path / "two.json")], check=True, env=env, timeout=300)
    one = json.loads((tmp_path / "one.json").read_text())["losses"]
    two = json.loads((tmp_path / "two.json").read_text())["losses"]
    assert len(one) == len(two) and all(b == pytest.approx(a, rel=1e-4, abs=1e-5) for a, b in zip(one, two))


def test_mixer_training_resumes_to_the_same_weights(tmp_path):
    import copy

    from factorlab import LoraMixerConfig, adapt
    from factorlab.methods.lora_mixer import set_stage
    from factorlab.mixer.config import MixerExperimentConfig, build_base
    from factorlab.mixer.tasks import SyntheticTasks
    from factorlab.mixer.train import train

    cfg = MixerExperimentConfig()
    tasks = SyntheticTasks(cfg.tasks)
    data = [tasks.examples(k, 200, 0) for k in range(4)]
    base = build_base(cfg, tasks, 0)

    def fresh():
        torch.manual_seed(0)
        mixer = adapt(copy.deepcopy(base), LoraMixerConfig(num_experts=4, r=2))
        set_stage(mixer, "experts")
        return mixer

    straight = fresh()
    losses = train(straight, data, 20, 3e-3, 16, seed=0, hard=True, pad_id=0)
    resumed = fresh()
    train(
        resumed, data, 10, 3e-3, 16, seed=0, hard=True, pad_id=0, checkpoint_dir=tmp_path, checkpoint_every=5
    )
    resumed = fresh()  # a new process would start from scratch and find the checkpoint
    again = train(
        resumed, data, 20, 3e-3, 16, seed=0, hard=True, pad_id=0, checkpoint_dir=tmp_path, checkpoint_every=5
    )
    assert again == losses
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
