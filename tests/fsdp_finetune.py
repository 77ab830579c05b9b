"""Train a random Llama under FSDP2 (torchrun) or in one process; write losses, per-rank bytes and the
final trainable tensors. Under torchrun it also runs the same training stopped midway and resumed from
its sharded checkpoint. Usage: fsdp_finetune.py OUT_DIR [single]."""

import json
import sys
from pathlib import Path

import torch

import factorlab
from factorlab import fsdp
from factorlab.distributed import init_from_env, is_main, rank, world_size
from factorlab.training import run_training
from tiny_models import build

STEPS, BATCH, LENGTH = 8, 8, 24
DATA = torch.randint(1, 1000, (STEPS, BATCH, LENGTH), generator=torch.Generator().manual_seed(0))


def model_for(method: str):
    torch.manual_seed(0)
    model = build("llama", num_hidden_layers=4, hidden_size=64, intermediate_size=256)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return factorlab.adapt(
        model, factorlab.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
    )


def batch_for_step(step: int):
    rows = DATA[step][rank() :: world_size()]
    return {"input_ids": rows}, rows, {}


def train(method: str, sharded: bool, **kwargs):
    model = model_for(method)
    made = []

    def make(params):
        made.append(torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0))
        return made[-1]

    losses = run_training(model, make, STEPS, batch_for_step, fsdp=sharded, **kwargs)
    return model, made[0], losses


def trainable(model, sharded: bool) -> dict[str, torch.Tensor]:
    if sharded:
        return fsdp.full_trainable_state(model)
    with fsdp.whole_state_dict(model):
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def main() -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    sharded = len(sys.argv) < 3 or sys.argv[2] != "single"
    init_from_env()
    report = {}
    for method in ("lora", "full"):
        model, optimizer, losses = train(method, sharded)
        bytes_here = fsdp.local_bytes(model, optimizer)
        weights = trainable(model, sharded)
        entry = {"losses": losses, "bytes": bytes_here}
        if sharded:
            fsdp.write_sharded(model, out / f"{method}-written")
            ckpt = out / f"{method}-ckpt"
            _, _, partial = train(method, True, checkpoint_dir=ckpt, checkpoint_every=3, stop_after=7)
            resumed, _, resumed_losses = train(method, True, checkpoint_dir=ckpt, checkpoint_every=3)
            entry |= {"partial": partial, "resumed_losses": resumed_losses}
            resumed_weights = trainable(resumed, True)
            if is_main():
                save_file(
                    {k: v.contiguous() for k, v in resumed_weights.items()},
                    str(out / f"{method}-resumed.safetensors"),
                )
        gathered = [None] * world_size()
        if world_size() > 1:
            torch.distributed.all_gather_object(gathered, bytes_here)
            entry["bytes_per_rank"] = gathered
        if is_main():
            save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"{method}.safetensors"))
            report[method] = entry
    if is_main():
        (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
