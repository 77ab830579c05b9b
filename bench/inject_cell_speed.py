"""One knowledge-injection cell's time, split into load, train and evaluate, against the FLOP floor.

Prints the training step's achieved GFLOP/s beside the machine's GEMM throughput (a large fp32
matmul timed in the same run, same threads, the best of several timings before and after training)
and the floor of the steps timed: the forward + backward FLOPs of the tokens actually trained
(non-padding tokens x parameters that do matmul work, i.e. the embedding table counted once, as the
tied output head):

    full fine-tuning   6 P t      (forward 2 P t, backward 4 P t: activation and weight gradients)
    adapters (frozen)  4 P t      (forward 2 P t, backward 2 P t: activation gradients only)

Adam's step is memory traffic, not FLOPs: 28 bytes per trainable parameter (read weight, gradient and
both moments, write weight and moments). A second floor adds that traffic at the machine's memory
bandwidth (a large tensor copy timed in the same run); it matters only for full fine-tuning. The timed
steps are also split into forward (with the batch and the loss), backward and the optimizer's step.

    python bench/inject_cell_speed.py --model smollm2 --method lora --steps 10    # ~1 minute

On a GPU (``--device cuda``) it times the steps with the device synchronised at both ends, reports the
achieved TFLOP/s against the card's measured GEMM throughput in the training's dtype (a large matmul
timed in the same run; float32 with TF32 off, or bfloat16), and with ``--cells N`` starts N copies at
once on the card (as a grid's workers share it) and reports their combined throughput:

    python bench/inject_cell_speed.py --device cuda --dtype bfloat16 --cells 1 --steps 30
    python bench/inject_cell_speed.py --device cuda --dtype bfloat16 --cells 8 --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from factorlab.inject.train import FineTuneSettings, fine_tune
from factorlab.inject.world import World
from factorlab.recipes.inject import InjectConfig, cached_backend, relation_by_name


def gemm_gflops(size: int = 1024, seconds: float = 0.4, repeats: int = 5) -> list[float]:
    """``repeats`` timings of a large GEMM; their best is the machine's rate, not a moment's (a
    neighbour, a clock dip), their median shows how much the machine moves meanwhile."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    rates = []
    for _ in range(repeats):
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            runs += 1
        rates.append(2 * size**3 * runs / (time.perf_counter() - started) / 1e9)
    return rates


def model_gemm_gflops(model: torch.nn.Module, tokens: int, frozen: bool, seconds: float = 1.0) -> float:
    """The rate of the model's own matmuls at ``tokens`` rows: every linear layer's forward GEMM and its
    input-gradient GEMM with its own weight (streamed from memory as in training), the head included;
    ``frozen``: the forward through a contiguous W^T as training does (factorlab.layers.frozen);
    otherwise (full fine-tuning) also each weight's gradient ``grad^T x``, a fresh (out, in) tensor."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    forward = [w.T.contiguous() if frozen else w.T for w in weights]
    inputs = {w.shape: (torch.randn(tokens, w.shape[1]), torch.randn(tokens, w.shape[0])) for w in weights}

    def step() -> None:
        for w, w_t in zip(weights, forward):
            x, grad_out = inputs[w.shape]
            x @ w_t
            grad_out @ w
            if not frozen:
                grad_out.T @ x

    step()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        runs += 1
    flops = sum((4 if frozen else 6) * tokens * w.numel() for w in weights) * runs
    return flops / (time.perf_counter() - started) / 1e9


@contextmanager
def phase_seconds() -> Iterator[dict[str, float]]:
    """Seconds spent in ``Tensor.backward`` and in Adam's step while the block runs (bench only: the
    two are wrapped for the process, and restored on exit)."""
    spent = {"backward": 0.0, "optimizer": 0.0}
    backward, step = torch.Tensor.backward, torch.optim.Adam.step

    def timed(name, fn):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started

        return run

    torch.Tensor.backward = timed("backward", backward)
    torch.optim.Adam.step = timed("optimizer", step)
    try:
        yield spent
    finally:
        torch.Tensor.backward, torch.optim.Adam.step = backward, step


def cuda_gemm_tflops(dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> float:
    """The card's GEMM rate in ``dtype`` (float32: TF32 off, as factorlab trains), best of a few runs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12)
    return best


def cuda_main(args) -> dict:
    """One cell's training steps on the GPU: seconds, tokens, floor FLOPs and the share of the card."""
    import json

    dtype = getattr(torch, args.dtype)
    peak = cuda_gemm_tflops(dtype)
    cfg = InjectConfig(
        model=args.model, relation=args.relation, method=args.method, device="cuda", precision=args.dtype
    )
    backend = cached_backend(cfg.model, None, 0, "cuda")
    world = World.generate(relation_by_name(cfg.relation, cfg.known_relations()), 0, cfg.num_subjects)
    settings = FineTuneSettings(cfg.method, cfg.r, cfg.lora_alpha, seed=0, precision=args.dtype)
    stamps: list[float] = []
    step_tokens: list[int] = []
    encode = backend.encode

    def counting_encode(texts):
        enc = encode(texts)
        step_tokens.append(int(enc["attention_mask"].sum()))
        return enc

    def stamp(_) -> None:
        if len(stamps) in (0, args.steps):  # the ends of the timed steps: wait for the GPU there only
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    backend.encode = counting_encode
    fine_tune(backend, world, settings, stamp, stop_after=args.steps + 1)
    torch.cuda.synchronize()
    train = stamps[args.steps] - stamps[0]
    tokens = sum(step_tokens[1 : args.steps + 1])
    params = sum(p.numel() for p in backend.model.parameters())
    flops = (6 if cfg.method == "full" else 4) * params * tokens
    result = {
        "gpu": torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "method": cfg.method,
        "steps": args.steps,
        "seconds": train,
        "step_s": train / args.steps,
        "tokens_per_step": tokens / args.steps,
        "tflops": flops / train / 1e12,
        "gemm_tflops": peak,
        "share": flops / train / 1e12 / peak,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
    }
    print(json.dumps(result), flush=True)
    return result


def cuda_shared(args) -> None:
    """N copies of one cell at once on the card: their combined throughput."""
    import json
    import subprocess
    import sys

    command = [sys.executable, __file__, "--device", "cuda", "--cells", "1", "--dtype", args.dtype,
               "--method", args.method, "--model", args.model, "--steps", str(args.steps)]  # fmt: skip
    started = time.perf_counter()
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(args.cells)]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - started
    results = [json.loads(line) for out in outputs for line in out.splitlines() if line.startswith("{")]
    combined = sum(r["tflops"] * r["seconds"] for r in results) / max(r["seconds"] for r in results)
    peak = results[0]["gemm_tflops"]
    print(f"{args.cells} cells sharing one {results[0]['gpu']} ({args.dtype}, {args.method}): step "
          f"{statistics.median(r['step_s'] for r in results):.3f} s median, combined {combined:.1f} TFLOP/s "
          f"= {combined / peak:.1%} of the card's {peak:.0f} TFLOP/s GEMM; wall {wall:.0f} s")  # fmt: skip


def copy_gbytes_per_s(megabytes: int = 512, seconds: float = 1.0) -> float:
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        dst.copy_(src)
        runs += 1
    return 2 * src.numel() * 4 * runs / (time.perf_counter() - started) / 1e9  # read + write


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--relation", default="city-language")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--threads", type=int, default=1, help="as a grid worker runs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (GPU)")
    parser.add_argument("--cells", type=int, default=1, help="GPU: copies sharing the card")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if args.cells > 1:
            cuda_shared(args)
        else:
            result = cuda_main(args)
            print(f"one cell on {result['gpu']} ({args.dtype}, {args.method}): "
                  f"{result['step_s']:.3f} s/step, "
                  f"{result['tflops']:.2f} TFLOP/s = {result['share']:.1%} of {result['gemm_tflops']:.0f} "
                  f"TFLOP/s GEMM, peak memory {result['peak_memory_gb']:.1f} GB")  # fmt: skip
        return
    rates = gemm_gflops()
    bandwidth = copy_gbytes_per_s()
    cfg = InjectConfig(model=args.model, relation=args.relation, method=args.method)

    started = time.perf_counter()
    backend = cached_backend(cfg.model, None, 0)
    load = time.perf_counter() - started
    world = World.generate(relation_by_name(cfg.relation, cfg.known_relations()), 0, cfg.num_subjects)
    settings = FineTuneSettings(cfg.method, cfg.r, cfg.lora_alpha, seed=0)

    stamps: list[float] = []
    step_tokens: list[int] = []
    encode = backend.encode

    def counting_encode(texts):  # the tokens each training step really trains
        enc = encode(texts)
        step_tokens.append(int(enc["attention_mask"].sum()))
        return enc

    backend.encode = counting_encode
    with phase_seconds() as spent:

        def stamp(_) -> None:
            stamps.append(time.perf_counter())
            if len(stamps) == 1:  # the timed steps start here
                spent.update(backward=0.0, optimizer=0.0)

        started = time.perf_counter()
        model, _ = fine_tune(backend, world, settings, stamp, stop_after=args.steps + 1)
        whole = time.perf_counter() - started
    train = stamps[-1] - stamps[0]  # steps 2 .. steps + 1: no model copy, no first-step warm-up
    backend.encode = encode
    rates += gemm_gflops()  # measured before and after training; the best counts
    peak, typical = max(rates), statistics.median(rates)
    tokens = sum(step_tokens[1:])  # the timed steps
    params = sum(p.numel() for p in backend.model.parameters())  # tied head counted once
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = (6 if cfg.method == "full" else 4) * params * tokens
    optimizer_bytes = 28 * trainable * args.steps
    floor = flops / (peak * 1e9) + optimizer_bytes / (bandwidth * 1e9)
    attainable = model_gemm_gflops(backend.model, round(tokens / args.steps), cfg.method != "full")

    started = time.perf_counter()
    backend.ranks(model, world.queries())
    evaluate = time.perf_counter() - started

    achieved = flops / train / 1e9
    print(f"GEMM throughput (1024^3 fp32, {args.threads} thread(s)): {peak:.1f} GFLOP/s, best of "
          f"{len(rates)} (median {typical:.1f}, lowest {min(rates):.1f}); "
          f"memory bandwidth (512 MiB copy): {bandwidth:.1f} GB/s")  # fmt: skip
    print(f"{cfg.model} {cfg.method} {cfg.relation}: load {load:.1f} s, prepare + {args.steps + 1} steps "
          f"{whole:.1f} s, {args.steps} steps timed {train:.1f} s ({train / args.steps:.3f} s/step, "
          f"{tokens / args.steps:.0f} tokens/step), evaluate {evaluate:.1f} s")  # fmt: skip
    print(f"training: {flops / 1e9:.1f} GFLOP of floor work, {achieved:.1f} GFLOP/s = "
          f"{achieved / peak:.0%} of GEMM throughput ({achieved / typical:.0%} of its median; "
          f"floor time {flops / (peak * 1e9):.1f} s)")  # fmt: skip
    passes = "forward + input gradient" + ("" if cfg.method != "full" else " + weight gradient")
    print(f"the model's own GEMMs at {round(tokens / args.steps)} rows ({passes}): "
          f"{attainable:.1f} GFLOP/s = {attainable / peak:.0%} of the large GEMM; training reaches "
          f"{achieved / attainable:.0%} of that")  # fmt: skip
    print(f"with Adam's memory traffic ({optimizer_bytes / 1e9:.1f} GB): floor {floor:.1f} s = "
          f"{floor / train:.0%} of the time trained")  # fmt: skip
    backward_flops = flops * (4 if cfg.method == "full" else 2) / (6 if cfg.method == "full" else 4)
    backward, optimizer = spent["backward"] / args.steps, spent["optimizer"] / args.steps
    forward = train / args.steps - backward - optimizer
    forward_rate = (flops - backward_flops) / args.steps / forward / 1e9
    backward_rate = backward_flops / args.steps / backward / 1e9
    traffic_rate = optimizer_bytes / args.steps / max(optimizer, 1e-9) / 1e9
    print(f"per step: forward with batch and loss {forward:.3f} s ({forward_rate:.0f} GFLOP/s of its floor "
          f"work), backward {backward:.3f} s ({backward_rate:.0f} GFLOP/s), optimizer {optimizer:.3f} s "
          f"({traffic_rate:.1f} GB/s of Adam's traffic)")  # fmt: skip
    floor_step = flops / args.steps / (peak * 1e9)
    own_step = flops / args.steps / (attainable * 1e9)
    print(f"with nothing but this optimizer step besides the GEMMs, a step would take "
          f"{floor_step + optimizer:.3f} s = {floor_step / (floor_step + optimizer):.0%} of GEMM throughput "
          f"with the GEMMs at the large GEMM's rate, {own_step + optimizer:.3f} s = "
          f"{floor_step / (own_step + optimizer):.0%} at the model's own GEMMs' rate")  # fmt: skip


if __name__ == "__main__":
    main()
