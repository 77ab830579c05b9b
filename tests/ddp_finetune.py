"""Fine-tune the tiny backend a few steps and write the loss curve; run alone or under torchrun."""

import json
import sys

import torch

from factorlab.distributed import is_main
from factorlab.inject.train import FineTuneSettings, fine_tune
from factorlab.inject.world import BUILTIN_RELATIONS, World
from factorlab.recipes.inject import cached_backend

torch.set_num_threads(1)
backend = cached_backend("tiny", None)
world = World.generate(BUILTIN_RELATIONS["city-language"], seed=0)
model, losses = fine_tune(backend, world, FineTuneSettings("lora", r=4, epochs=1, batch_size=16, seed=0))
if is_main():
    from safetensors.torch import save_file

    trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, sys.argv[1] + ".safetensors")
    with open(sys.argv[1], "w") as f:
        json.dump({"losses": losses}, f)
