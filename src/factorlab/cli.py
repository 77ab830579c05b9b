"""The `factorlab` command line: one entry point for every recipe."""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from factorlab.errors import ConfigError, GridCellsFailed, explain
from factorlab.ocr.train import OCRConfig
from factorlab.recipes.inject import InjectConfig

app = typer.Typer(
    help="factorlab: factorized adaptation (LoRA, Compacter, LoRA-Mixer) and out-of-context reasoning lab.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
ocr_app = typer.Typer(
    help="Out-of-context reasoning lab: one-layer attention-only transformers on the synthetic "
    "factual-recall task (factorized W_O W_V^T vs combined W_OV).",
    no_args_is_help=True,
)
app.add_typer(ocr_app, name="ocr")
mixer_app = typer.Typer(
    help="LoRA-Mixer: routed LoRA experts inside attention (and Mamba) projections.", no_args_is_help=True
)
app.add_typer(mixer_app, name="mixer")
inject_app = typer.Typer(
    help="Knowledge injection: fine-tune on fictitious facts; measure generalization vs hallucination.",
    no_args_is_help=True,
)
app.add_typer(inject_app, name="inject")


def friendly_errors(fn):
    """Expected failures as a clear message instead of a traceback: failed grid cells (listed, exit
    status 1); factorlab's own errors, and what ``factorlab.errors.explain`` translates (unusable
    paths, bad regular expressions, allocations that fail, an unreachable Ray cluster): one line
    naming the fix, exit status 2. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GridCellsFailed as err:
            typer.secho(f"error: {err}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            typer.secho("interrupted (finished grid cells are kept; rerun to resume)", fg="red", err=True)
            sys.exit(130)
        except Exception as err:
            clean = explain(err)
            if clean is None:
                raise
            typer.secho(f"error: {_short(str(clean))}", fg="red", err=True)
            sys.exit(2)

    return wrapper


def _short(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


# Options shared by the OCR commands; their defaults are OCRConfig's (the paper's code).
OCR = OCRConfig()


def _ocr_config(options: dict) -> OCRConfig:
    """An OCRConfig from a command's options (those that are OCRConfig fields)."""
    names = {f.name for f in dataclasses.fields(OCRConfig)}
    return OCRConfig(**{k: v for k, v in options.items() if k in names})


Param = Annotated[str, typer.Option(help="factorized (W_O W_V^T) or combined (one W_OV).")]
DH = Annotated[
    int | None, typer.Option("--d-h", help="Inner dimension of W_O W_V^T \\[default: d = vocab size].")
]
Steps = Annotated[int, typer.Option(help="Training steps.")]
BatchSize = Annotated[
    int, typer.Option(help="Batch size; thirds: train facts, train implications, test facts.")
]
LR = Annotated[float, typer.Option("--lr", help="AdamW learning rate.")]
WD = Annotated[float, typer.Option(help="AdamW weight decay.")]
Init = Annotated[str, typer.Option(help="default (N(0, 1/d)) or identity (the paper's 1e-4 init).")]
Seed = Annotated[int, typer.Option(help="Random seed (data, init and evaluation set).")]
Groups = Annotated[int, typer.Option(help="Fact answers (= implication answers).")]
SubjectsPerGroup = Annotated[int, typer.Option(help="Subjects per fact answer.")]
TrainFraction = Annotated[float, typer.Option(help="Fraction of subjects whose implication is trained.")]
NoiseTokens = Annotated[int, typer.Option(help="Distinct noise tokens.")]
SeqLen = Annotated[int, typer.Option(help="Sequence length, EOS included.")]
Association = Annotated[
    str, typer.Option(help="causal, or spurious (test implications independent of group).")
]
EvalEvery = Annotated[int | None, typer.Option(help="Steps between evaluations \\[default: steps // 50].")]
Pack = Annotated[
    int,
    typer.Option(
        help="Most cells that train together as one model on a shared base (LoRA cells; the rest train "
        "alone); 1 trains every cell alone. Packs are split to fit memory and to give every worker one."
    ),
]
Workers = Annotated[int | None, typer.Option(help="Worker processes \\[default: CPU count].")]
Threads = Annotated[
    int,
    typer.Option(
        help="torch threads for this run. Default 1, as every grid worker uses: on a machine busy with "
        "other work more threads can be many times slower (a SmolLM2 cell: 25 min with 2, 1.5 with 1); "
        "raise it on an idle machine with many cores."
    ),
]


def _threads(threads: int) -> None:
    from factorlab.runtime import limit_threads

    if isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}.")
    limit_threads(threads)


GridBackend = Annotated[str, typer.Option(help="local (process pool on this machine) or ray.")]
RayAddress = Annotated[
    str | None, typer.Option(help="Address of an existing Ray cluster \\[default: start a local one].")
]


@ocr_app.command("run")
@friendly_errors
def ocr_run(
    param: Param = OCR.param,
    d_h: DH = OCR.d_h,
    steps: Steps = OCR.steps,
    batch_size: BatchSize = OCR.batch_size,
    lr: LR = OCR.lr,
    weight_decay: WD = OCR.weight_decay,
    init: Init = OCR.init,
    seed: Seed = OCR.seed,
    groups: Groups = OCR.groups,
    subjects_per_group: SubjectsPerGroup = OCR.subjects_per_group,
    train_fraction: TrainFraction = OCR.train_fraction,
    noise_tokens: NoiseTokens = OCR.noise_tokens,
    seq_len: SeqLen = OCR.seq_len,
    association: Association = OCR.association,
    eval_every: EvalEvery = OCR.eval_every,
    threads: Threads = 1,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/ocr-run"),
) -> None:
    """Train one model; write OUT/metrics.jsonl, OUT/summary.json and OUT/curves.png."""
    _threads(threads)
    from factorlab.recipes import ocr

    config = _ocr_config(locals())
    summary = ocr.run(config, out)
    line = (
        f"{config.label}: train impl acc {summary['train_impl_acc']:.3f}, test impl acc "
        f"{summary['test_impl_acc']:.3f}, test impl loss {summary['test_impl_loss']:.3f}"
    )
    if summary["hallucination_rate"] is not None:
        line += f", hallucination rate {summary['hallucination_rate']:.3f}"
    typer.echo(line)
    typer.echo(f"wrote {out}/summary.json, metrics.jsonl, curves.png")


def _float_list(text: str, what: str = "values") -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers like 0.3,1,3, got {text!r}") from None
    if not values:
        raise ConfigError(f"give at least one value for {what}, e.g. 1.")
    return values


def _int_list(text: str, what: str = "values", allow_empty: bool = False) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers like 3,4,8, got {text!r}") from None
    if not values and not allow_empty:
        raise ConfigError(f"give at least one value for {what}, e.g. 0,1,2.")
    return values


@ocr_app.command("sweep")
@friendly_errors
def ocr_sweep(
    d_h: Annotated[
        str, typer.Option("--d-h", help="Comma-separated factorized inner dimensions.")
    ] = "3,4,8,16,32,64,128",
    combined: Annotated[bool, typer.Option(help="Also train the combined W_OV model.")] = True,
    seeds: Annotated[int, typer.Option(help="Seeds per configuration: seed, seed+1, ...")] = 3,
    seed: Annotated[int, typer.Option(help="First seed.")] = OCR.seed,
    steps: Steps = 20000,  # the sweep script's length (sweep_rank_attn1_1heads.sh), not OCRConfig's
    batch_size: BatchSize = OCR.batch_size,
    lr: LR = OCR.lr,
    weight_decay: WD = OCR.weight_decay,
    init: Init = OCR.init,
    groups: Groups = OCR.groups,
    subjects_per_group: SubjectsPerGroup = OCR.subjects_per_group,
    train_fraction: TrainFraction = OCR.train_fraction,
    noise_tokens: NoiseTokens = OCR.noise_tokens,
    seq_len: SeqLen = OCR.seq_len,
    association: Association = OCR.association,
    eval_every: EvalEvery = OCR.eval_every,
    workers: Workers = None,
    backend: GridBackend = "local",
    address: RayAddress = None,
    out: Annotated[Path, typer.Option(help="Output folder (finished groups there are reused).")] = Path(
        "runs/ocr-sweep"
    ),
) -> None:
    """Rank sweep over d_h (and combined) x seeds; same-shape runs train as one batched model."""
    from factorlab.grid import check_grid_options
    from factorlab.recipes import ocr

    check_grid_options(backend, address, workers)
    d_hs = _int_list(d_h, "--d-h", allow_empty=combined)
    base = _ocr_config({k: v for k, v in locals().items() if k != "d_h"})
    for value in d_hs:  # validate every d_h before any training starts
        OCRConfig(**{**base.__dict__, "d_h": value})
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1 (seeds per configuration), got {seeds}.")
    ocr.sweep(
        base,
        d_hs,
        combined,
        [seed + i for i in range(seeds)],
        out,
        workers,
        associations=(association,),
        backend=backend,
        address=address,
    )
    typer.echo((out / "table.md").read_text())
    typer.echo(f"wrote {out}/report.md, results.json, table.{{md,csv,json}}, curves.png, accuracy_vs_dh.png")


@ocr_app.command("theory")
@friendly_errors
def ocr_theory(
    groups: Groups = 4,
    subjects_per_group: SubjectsPerGroup = 4,
    train_fraction: TrainFraction = 0.25,
    optimizer: Annotated[
        str,
        typer.Option(
            help="gd: plain gradient descent, the setting of Theorem 1 (defaults: lr 1.0, no weight "
            "decay, 20,000 steps, small 'identity' init); adamw: the paper's trainer (lr 5e-3, wd 0.03, "
            "3,000 steps)."
        ),
    ] = "gd",
    steps: Annotated[int | None, typer.Option(help="Training steps \\[default: per optimizer].")] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate \\[default: per optimizer].")
    ] = None,
    seed: Seed = 42,
    solver: Annotated[str | None, typer.Option(help="cvxpy solver \\[default: CLARABEL].")] = None,
    competitors: Annotated[
        str,
        typer.Option(
            help="Tokens a margin compares the answer with: vocabulary (as the loss), answers, or relation."
        ),
    ] = "vocabulary",
    threads: Threads = 1,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/ocr-theory"),
) -> None:
    """Solve the nuclear- and Frobenius-norm max-margin programs on a small instance and compare
    them with factorized and combined models trained with attention fixed (Theorem 1), over training."""
    _threads(threads)
    from factorlab.recipes import ocr

    defaults = {
        "gd": {"steps": 20000, "lr": 1.0, "weight_decay": 0.0, "init": "identity"},
        "adamw": {"steps": 3000, "lr": 5e-3, "weight_decay": 0.03, "init": "default"},
    }
    if optimizer not in defaults:
        raise ConfigError(f"--optimizer must be gd or adamw, got {optimizer!r}.")
    chosen = {**defaults[optimizer], **{k: v for k, v in {"steps": steps, "lr": lr}.items() if v is not None}}
    base = OCRConfig(
        groups=groups,
        subjects_per_group=subjects_per_group,
        train_fraction=train_fraction,
        seed=seed,
        optimizer=optimizer,
        **chosen,
    )
    result = ocr.theory(base, out, solver, competitors)
    typer.echo(ocr.theory_report(result))
    typer.echo(f"wrote {out}/theory.json, theory.png, report.md")


# ---- LoRA-Mixer ---------------------------------------------------------------------------------

Preset = Annotated[str, typer.Option(help="quick (tiny model, synthetic tasks) or smollm2 (reasoning-gym).")]
Tasks = Annotated[str | None, typer.Option(help="Comma-separated task names \\[default: the preset's].")]
Model = Annotated[
    str | None, typer.Option(help="tiny, smollm2 or a local causal-LM folder \\[default: preset's].")
]
Rank = Annotated[int | None, typer.Option("--r", help="Rank of every expert (the multi-task LoRA: E x r).")]
ExpertSteps = Annotated[int | None, typer.Option(help="Steps of every multi-task system and of stage 1.")]
RouterSteps = Annotated[int | None, typer.Option(help="Router training steps (stage 2).")]
Settings = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="key=value override of any experiment setting (repeatable), e.g. --set router_lr=0.005 "
        "--set balance_coef=0; see factorlab.mixer.config.MixerExperimentConfig for the keys.",
    ),
]
RouteLabelCoef = Annotated[
    float | None,
    typer.Option(
        help="Ours, not the paper's: weight of the supervised routing term (cross-entropy of the router "
        "to each sample's task label) while the routers train \\[default: 1; 0: the paper's losses only]."
    ),
]


def _mixer_config(
    preset: str,
    tasks: str | None,
    model: str | None,
    r: int | None,
    steps: int | None,
    router_steps: int | None,
    seeds: list[int],
    route_label_coef: float | None = None,
    settings: list[str] | None = None,
    precision: str = "float32",
    gradient_checkpointing: bool = False,
):
    from factorlab.recipes.mixer import MixerExperimentConfig

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    options = {
        "tasks": task_list,
        "model": model,
        "r": r,
        "steps": steps,
        "router_steps": router_steps,
        "seeds": seeds,
        "route_label_coef": route_label_coef,
        "precision": precision,
        "gradient_checkpointing": gradient_checkpointing,
    }
    options = {k: v for k, v in options.items() if v is not None}
    options |= _key_values(settings or [], MixerExperimentConfig)  # --set wins over the named options
    return MixerExperimentConfig.preset_config(preset, **options)


def _key_values(pairs: list[str], config_cls) -> dict:
    """torchtune-style ``key=value`` overrides of a config dataclass's fields; values are JSON
    (numbers, true/false, lists) or plain strings. The config itself checks them."""
    import json

    fields = {f.name for f in dataclasses.fields(config_cls)}
    out: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in fields:
            raise ConfigError(
                f"--set {pair!r}: expected key=value with key one of {sorted(fields)}, "
                "e.g. --set router_lr=0.005."
            )
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


@mixer_app.command("run")
@friendly_errors
def mixer_run(
    preset: Preset = "quick",
    tasks: Tasks = None,
    model: Model = None,
    r: Rank = None,
    steps: ExpertSteps = None,
    router_steps: RouterSteps = None,
    route_label_coef: RouteLabelCoef = None,
    settings: Settings = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    workers: Annotated[
        int, typer.Option(help="Parallel cells (1: in this process, with progress bars).")
    ] = 1,
    backend: GridBackend = "local",
    address: RayAddress = None,
    dtype: Dtype = "float32",
    gradient_checkpointing: GradientCheckpointing = False,
    peers: Annotated[
        str,
        typer.Option(
            help="Comma-separated mixture-of-LoRA peers run beside the comparison from the same frozen "
            "experts: HydraLoRA, MixLoRA, LoRAHub, MoLE, Arrow."
        ),
    ] = "",
    skip: Annotated[
        str,
        typer.Option(
            help="Comma-separated baselines left out (their rows absent; other cells keep their ids): "
            "full, multi-task LoRA, Compacter++, X-LoRA, base, plug."
        ),
    ] = "",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/mixer"),
) -> None:
    """Compare base, one multi-task LoRA of the mixer's total rank, Compacter++, full fine-tuning, per-task
    LoRA (oracle), the uniform average of the experts, LoRA-Mixer joint and plug-and-play, and X-LoRA, per
    task and seed; report trainable parameters, training time and tokens/s, and routing accuracy."""
    from factorlab.grid import check_grid_options
    from factorlab.recipes.mixer import run_experiment

    check_grid_options(backend, address, workers)
    cfg = _mixer_config(
        preset,
        tasks,
        model,
        r,
        steps,
        router_steps,
        _int_list(seeds),
        route_label_coef,
        settings,
        dtype,
        gradient_checkpointing,
    )
    if peers or skip:
        cfg = dataclasses.replace(
            cfg,
            peers=[p.strip() for p in peers.split(",") if p.strip()],
            skip=[u.strip() for u in skip.split(",") if u.strip()],
        )
    result = run_experiment(cfg, out, workers=workers, backend=backend, address=address)
    typer.echo((out / "table.md").read_text())
    typer.echo(f"router accuracy {result['router_accuracy']:.3f}; {result['verdict']}")
    typer.echo(f"wrote {out}/report.md, results.json, table.*, accuracy.png, routing.png, mixer/, experts/")


@mixer_app.command("train")
@friendly_errors
def mixer_train(
    preset: Preset = "quick",
    tasks: Tasks = None,
    model: Model = None,
    r: Rank = None,
    steps: ExpertSteps = None,
    router_steps: RouterSteps = None,
    route_label_coef: RouteLabelCoef = None,
    settings: Settings = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    dtype: Dtype = "float32",
    gradient_checkpointing: GradientCheckpointing = False,
    threads: Threads = 1,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/mixer-train"),
) -> None:
    """Joint workflow: stage 1 trains one expert per task (hard routing), stage 2 the routers."""
    _threads(threads)
    from factorlab.recipes.mixer import joint

    cfg = _mixer_config(
        preset,
        tasks,
        model,
        r,
        steps,
        router_steps,
        [seed],
        route_label_coef,
        settings,
        dtype,
        gradient_checkpointing,
    )
    result = joint(cfg, out)
    typer.echo((out / "table.md").read_text())
    typer.echo(f"router accuracy {result['router_accuracy']:.3f}")
    typer.echo(f"wrote {out}/report.md, mixer/ (factorlab adapter), experts/<task>/ (PEFT LoRA), base/")


@mixer_app.command("plug")
@friendly_errors
def mixer_plug(
    base: Annotated[Path, typer.Option(help="The base model folder the adapters were trained on.")],
    adapters: Annotated[str, typer.Option(help="Comma-separated PEFT LoRA folders, one per task.")],
    preset: Preset = "quick",
    tasks: Annotated[
        str | None, typer.Option(help="Task of each adapter, same order \\[default: folder names].")
    ] = None,
    router_steps: RouterSteps = None,
    route_label_coef: RouteLabelCoef = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    dtype: Dtype = "float32",
    gradient_checkpointing: GradientCheckpointing = False,
    threads: Threads = 1,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/mixer-plug"),
) -> None:
    """Plug-and-play: route between existing PEFT LoRA adapters; only the routers train."""
    _threads(threads)
    import json

    from factorlab.recipes.mixer import plug

    folders = [Path(a.strip()) for a in adapters.split(",") if a.strip()]
    not_adapters = [str(f) for f in folders if not (f / "adapter_config.json").is_file()]
    if not folders or not_adapters:
        raise ConfigError(
            f"--adapters: {not_adapters or repr(adapters)} "
            f"{'are not PEFT LoRA folders' if len(not_adapters) > 1 else 'is not a PEFT LoRA folder'} "
            "(no adapter_config.json); pass the folders, comma-separated, e.g. the "
            "experts/<task>/ that `factorlab mixer train` writes."
        )
    if str(base) != "smollm2" and not (base / "config.json").is_file():
        raise ConfigError(
            f"--base {base} is not a model folder (no config.json); pass the folder of the model the "
            "adapters were trained on, e.g. the base/ that `factorlab mixer train` writes, or smollm2."
        )
    task_names = tasks or ",".join(f.name for f in folders)
    saved = base / "factorlab_tasks.json"

    def config_for(names: str, model: str | None):
        return _mixer_config(
            preset, names, model, None, None, router_steps, [seed], route_label_coef, None, dtype,
            gradient_checkpointing,
        )  # fmt: skip

    cfg = config_for(task_names, str(base) if preset != "quick" else None)
    if preset == "quick" and saved.exists():  # the tiny preset's vocabulary depends on the full task list
        trained = json.loads(saved.read_text())["tasks"]
        if sorted(trained) != sorted(cfg.tasks):
            raise ConfigError(
                f"the base was trained with tasks {trained}; the adapters give {cfg.tasks}. Pass one adapter "
                "per task the base was trained with (--tasks names them when folder names differ)."
            )
        cfg = config_for(",".join(trained), None)
        by_task = dict(zip(task_names.split(","), folders))
        folders = [by_task[t] for t in trained]
    result = plug(cfg, base, folders, out)
    typer.echo((out / "table.md").read_text())
    typer.echo(f"router accuracy {result['router_accuracy']:.3f}")
    typer.echo(f"wrote {out}/report.md, results.json, routing.png, mixer/")


# ---- knowledge injection --------------------------------------------------------------------------

INJECT = InjectConfig()  # the defaults of `inject run` / `inject grid`

InjModel = Annotated[
    str, typer.Option("--model", help="tiny, smollm2, or a local Hugging Face causal-LM folder.")
]
RelationsFile = Annotated[
    str | None, typer.Option("--relations-file", help="YAML/JSON file with your own relations.")
]
LoraRank = Annotated[int, typer.Option("--r", help="Rank of LoRA and LoRA-Mixer experts.")]
InjLR = Annotated[
    float | None, typer.Option("--lr", help="Learning rate \\[default: per backend and method].")
]
Epochs = Annotated[int | None, typer.Option(help="Epochs over the training texts \\[default: per backend].")]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="float32, bfloat16 or float16: the base model stored in it, adapters kept float32, the "
        "forward under autocast, loss and ranks in float32 (full fine-tuning keeps float32 master weights; "
        "float16 adds a gradient scaler).",
    ),
]
GradientCheckpointing = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute each block's activations in the backward: less memory, the same gradients.",
    ),
]
InjDevice = Annotated[
    str,
    typer.Option(
        help="Train and evaluate on this device: cpu, cuda or cuda:N (several grid workers share one GPU)."
    ),
]


@inject_app.command("run")
@friendly_errors
def inject_run(
    model: InjModel = INJECT.model,
    method: Annotated[str, typer.Option(help="full, lora, compacter++ or lora-mixer.")] = INJECT.method,
    relation: Annotated[
        str,
        typer.Option(
            help="city-language, city-language-cf, country-code, "
            "profession-color, sport-music, or one from --relations-file."
        ),
    ] = INJECT.relation,
    seed: Annotated[int, typer.Option(help="Seed of the world and of training.")] = INJECT.seed,
    r: LoraRank = INJECT.r,
    lr: InjLR = None,
    epochs: Epochs = None,
    relations_file: RelationsFile = None,
    pretrain_seed: Annotated[
        int, typer.Option(help="Tiny backend: which pretrained model (seed 0 ships with factorlab).")
    ] = INJECT.pretrain_seed,
    save_adapter: Annotated[
        bool, typer.Option(help="Also write the trained adapter (full: the model) to OUT/adapter.")
    ] = False,
    device: InjDevice = INJECT.device,
    dtype: Dtype = INJECT.precision,
    gradient_checkpointing: GradientCheckpointing = False,
    fsdp: Annotated[
        bool,
        typer.Option(
            help="Under torchrun / accelerate launch: shard weights, gradients and optimizer state over "
            "the processes (FSDP2, one unit per decoder block) instead of replicating them (DDP)."
        ),
    ] = False,
    threads: Threads = 1,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/inject"),
) -> None:
    """One relation x method x seed: ranks before and after fine-tuning -> OUT/summary.json, and every
    query with its candidates and ranks -> OUT/ranks.json."""
    _threads(threads)
    import os

    from factorlab.recipes.inject import InjectConfig, run

    if fsdp and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise ConfigError(
            "--fsdp shards over processes: launch with torchrun --nproc-per-node N (or accelerate launch)."
        )
    cfg = InjectConfig(
        model=model,
        relation=relation,
        method=method,
        r=r,
        seed=seed,
        lr=lr,
        epochs=epochs,
        relations_file=relations_file,
        pretrain_seed=pretrain_seed,
        device=device,
        precision=dtype,
        gradient_checkpointing=gradient_checkpointing,
        fsdp=fsdp,
    )
    s = run(cfg, out, save_adapter=save_adapter)
    from factorlab.distributed import is_main

    if not is_main():  # under torchrun / accelerate, rank 0 reports
        return
    probe = s["probe"]["accuracy"]
    typer.echo(
        "background probe (base model ranks the known implication first): "
        + ("no background knowledge for this relation" if probe is None else f"{probe:.2f}")
    )
    typer.echo(
        f"{relation} ({'causal' if s['causal'] else 'non-causal'}), {method}: train-fact rank "
        f"{s['train_fact_rank']:.2f}; test-implication rank {s['test_implication_rank_before']:.2f} -> "
        f"{s['test_implication_rank']:.2f} ({s['verdict']}). Rank = place of the right answer among "
        f"{s['num_candidates']} candidates by first-token logit, 0 = best, guessing = {s['chance_rank']:.1f}."
    )
    typer.echo(f"wrote {out}/summary.json, ranks.json (each query, its candidates and ranks)")
    if save_adapter:
        typer.echo(f"wrote {out}/adapter (load with factorlab.AdaptedModel.from_pretrained)")


@inject_app.command("grid")
@friendly_errors
def inject_grid(
    model: InjModel = INJECT.model,
    relations: Annotated[
        str, typer.Option(help="Comma-separated relations.")
    ] = "city-language,city-language-cf,country-code,profession-color,sport-music",
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "full,lora,compacter++",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    r: LoraRank = INJECT.r,
    rank_sweep: Annotated[
        str, typer.Option(help="Extra LoRA ranks, e.g. 1,2,4,8,16,32,64 (empty: none).")
    ] = "",
    epochs: Epochs = None,
    relations_file: RelationsFile = None,
    pretrain_seeds: Annotated[
        str,
        typer.Option(
            help="Tiny backend: comma-separated pretraining seeds, each an independently pretrained "
            "model (0 ships with factorlab; others are pretrained once and cached)."
        ),
    ] = "0,1,2",
    workers: Workers = None,
    backend: GridBackend = "local",
    address: RayAddress = None,
    device: InjDevice = INJECT.device,
    dtype: Dtype = INJECT.precision,
    gradient_checkpointing: GradientCheckpointing = False,
    pack: Pack = 16,
    lr_scales: Annotated[
        str,
        typer.Option(help="Comma-separated factors on each method's default learning rate, e.g. 0.3,1,3."),
    ] = "1",
    epochs_sweep: Annotated[
        str, typer.Option(help="Comma-separated numbers of epochs to sweep, e.g. 4,8,16 (empty: --epochs).")
    ] = "",
    out: Annotated[Path, typer.Option(help="Output folder (finished cells there are reused).")] = Path(
        "runs/inject-grid"
    ),
) -> None:
    """Relations x pretraining seeds x seeds x methods (+ a LoRA rank sweep, learning-rate scales and
    epochs), parallel and resumable."""
    from factorlab.grid import check_grid_options, check_pack
    from factorlab.recipes.inject import grid, grid_cells

    check_grid_options(backend, address, workers)
    check_pack(pack)
    cells = grid_cells(
        model,
        [x.strip() for x in relations.split(",") if x.strip()],
        [x.strip() for x in methods.split(",") if x.strip()],
        _int_list(seeds),
        r,
        _int_list(rank_sweep) if rank_sweep else (),
        relations_file,
        pretrain_seeds=_int_list(pretrain_seeds),
        device=device,
        epochs=epochs,
        precision=dtype,
        gradient_checkpointing=gradient_checkpointing,
        lr_scales=_float_list(lr_scales),
        epochs_sweep=_int_list(epochs_sweep) if epochs_sweep else (),
    )
    result = grid(cells, out, workers, backend, address, pack=pack)
    typer.echo((out / "table.md").read_text())
    typer.echo(result["report"].line())
    typer.echo(f"wrote {out}/report.md, results.json, table.*, ranks.png, cells/")


@inject_app.command("pretrain")
@friendly_errors
def inject_pretrain(
    seed: Annotated[int, typer.Option(help="Pretraining seed.")] = 0,
    relations_file: RelationsFile = None,
    ship: Annotated[
        bool,
        typer.Option(help="Write into factorlab's package data (for maintainers: the shipped backend)."),
    ] = False,
) -> None:
    """Pretrain (or find) the tiny backend for a seed, print its background probe, cache it."""
    from factorlab.recipes.inject import pretrain_command

    for line in pretrain_command(seed, relations_file, ship):
        typer.echo(line)


@app.command("report")
@friendly_errors
def report(
    folder: Annotated[Path, typer.Argument(help="A grid's output folder (it holds cells/).")],
) -> None:
    """Rebuild a grid's tables, plots and report.md from its committed cell summaries (a fact-injection
    grid or a LoRA-Mixer comparison)."""
    from factorlab.cells import load_summary

    if not (folder / "cells").is_dir():
        raise ConfigError(
            f"{folder} has no cells/ folder; pass the --out folder of `factorlab inject grid` or "
            "`factorlab mixer run` (e.g. results/inject-smollm2)."
        )
    summaries = [load_summary(f) for f in sorted((folder / "cells").glob("*/"))]
    if any(s is not None and "unit" in s.get("cell", {}) for s in summaries):
        from factorlab.recipes.mixer import report_from_cells as mixer_report

        result = mixer_report(folder)
        typer.echo((folder / "table.md").read_text())
        typer.echo(f"{len(result['missing'])} cells missing; wrote {folder}/report.md, table.*, results.json")
        return
    from factorlab.recipes.inject import report_from_cells

    result = report_from_cells(folder)
    typer.echo((folder / "table.md").read_text())
    typer.echo(f"{len(result['records'])} cells; wrote {folder}/report.md, table.*, results.json, ranks.png")


@app.command("plan")
@friendly_errors
def plan(
    model: Annotated[
        str,
        typer.Option(
            help="A model folder, its config.json, or one of the OCR paper's LLMs: llama-3-8b, mistral-7b, "
            "qwen2-7b, gemma-2-9b, olmo-7b."
        ),
    ],
    method: Annotated[str, typer.Option(help="full, lora, compacter++ or lora-mixer.")] = "full",
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "bfloat16",
    gpus: Annotated[int, typer.Option(help="GPUs (FSDP shards over them; DDP replicates).")] = 8,
    gpu_memory: Annotated[str, typer.Option(help="Memory of one GPU, e.g. 80GB, 141GB.")] = "80GB",
    batch: Annotated[int, typer.Option(help="Sequences per GPU per step.")] = 8,
    seq: Annotated[int, typer.Option(help="Tokens per sequence.")] = 128,
    gradient_checkpointing: GradientCheckpointing = False,
    r: Annotated[int, typer.Option("--r", help="LoRA / LoRA-Mixer rank.")] = 16,
    device: Annotated[str, typer.Option(help="cuda (fused attention) or cpu.")] = "cuda",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the plan as JSON here.")] = None,
) -> None:
    """Per-GPU memory of a training run before launch (weights, gradients, optimizer, activations) under
    DDP and FSDP, whether it fits, and the smallest change that would. Nothing is allocated: the model is
    built on the meta device and its activations are measured there."""
    from factorlab.plan import PlanConfig, format_plan, make_plan, parse_size, write_plan

    cfg = PlanConfig(
        model=model,
        method=method,
        precision=dtype,
        gpus=gpus,
        gpu_memory=parse_size(gpu_memory),
        batch=batch,
        seq=seq,
        gradient_checkpointing=gradient_checkpointing,
        r=r,
        device=device,
    )
    result = make_plan(cfg)
    typer.echo(format_plan(result))
    if json_out is not None:
        write_plan(result, json_out)


@app.command("demo")
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    quick: Annotated[
        bool, typer.Option(help="Tiny version for smoke tests; numbers are not the paper's.")
    ] = False,
) -> None:
    """Short reproduction of the OCR paper's central claims, with plots and a Markdown report."""
    from factorlab.recipes.demo import run_demo

    run_demo(out, quick=quick)


@app.command("version")
def version() -> None:
    """Print factorlab's version."""
    from factorlab.version import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
