"""Knowledge-injection recipes: does fine-tuning on new facts generalize or hallucinate, and how
does the adaptation method change it?

``inject_cell`` is one relation x method x seed: generate a world, measure ranks before,
fine-tune on the world's training texts, measure ranks after. ``grid`` runs many cells in
parallel, resumably, and writes a paper-style table and plots.

Metric (as in the paper): the rank (0 = best) of the correct answer's first-token logit among the
relation's candidate answers, averaged over queries of one kind: training facts (all subjects,
training phrasings), test facts (a held-out phrasing), bridge implications (trained), and test
implications (never shown). For a non-causal relation a low test-implication rank is
hallucination: the model asserts a link the world does not have.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from factorlab.cells import has_keys
from factorlab.distributed import is_main
from factorlab.errors import ConfigError, GridCellsFailed, SharedModelChangedError
from factorlab.grid import GridReport, check_grid_options, check_pack, load_summary, run_grid
from factorlab.inject.backends import Backend, load_backend
from factorlab.inject.pack import PACKED_METHODS, Member, fine_tune_packed
from factorlab.inject.report import KINDS, write_grid_report
from factorlab.inject.spectrum import aggregate, update_spectrum
from factorlab.inject.tiny import (
    PROBE_THRESHOLD,
    SHIPPED_DIR,
    TinyPretrainConfig,
    backend_key,
    pretraining_recall,
    save_backend,
    shipped_folder,
    tiny_cache_key,
    tiny_model,
    tiny_spec,
)
from factorlab.inject.train import DEFAULTS, METHODS, FineTuneSettings, fine_tune, total_steps
from factorlab.inject.world import (
    BUILTIN_RELATIONS,
    WORLD_NAMES,
    Relation,
    World,
    load_relations,
    relation_by_name,
)
from factorlab.models import cache_dir
from factorlab.precision import check_precision
from factorlab.progress import StepBars, console
from factorlab.runtime import machine_info, resolve_device, write_json
from factorlab.validation import check_fields, check_ranges

CHANCE_MARGIN = 0.25  # a drop in mean rank smaller than this is not counted as transfer


@dataclasses.dataclass
class InjectConfig:
    model: str = "tiny"
    relation: str = "city-language"
    method: str = "lora"
    r: int = 4
    lora_alpha: float = 8.0
    seed: int = 0
    """Seed of the world (names, split) and of fine-tuning."""
    lr: float | None = None
    epochs: int | None = None
    num_subjects: int = 100
    bridge_fraction: float = 0.2
    relations_file: str | None = None
    batch_size: int | None = None
    pretrain_seed: int = 0
    """Tiny backend only: which independently pretrained tiny model (seed 0 ships with factorlab)."""
    device: str = "cpu"
    """Where to train and evaluate: "cpu", "cuda", "cuda:N". A GPU run follows the same data order,
    but its float rounding and its adapters' random initialisation (drawn on the device) differ from
    a CPU run's, so compare the two over seeds, not cell by cell."""
    precision: str = "float32"
    """"float32", "bfloat16" or "float16" (factorlab.precision): part of a grid cell's id when not
    float32, so a 16-bit result never stands in for a float32 one."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward (less memory; the same gradients)."""
    fsdp: bool = False
    """Under torchrun / accelerate launch: shard with FSDP2 instead of replicating with DDP."""
    names: str = "pooled"
    """Where the world's subjects come from: "pooled", the world half of the name space (never a tiny
    backend's pretraining person); "any", every name (cells made before 2026-12-03, whose worlds shared
    11-20 names with the tiny backend's pretraining people)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.names not in WORLD_NAMES:
            raise ConfigError(f"names must be one of {WORLD_NAMES}, got {self.names!r}.")
        check_precision(self.precision)
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}.")
        check_ranges(
            self,
            positive=("r", "num_subjects", "lr", "epochs", "batch_size"),
            non_negative=("seed", "pretrain_seed"),
        )
        if self.pretrain_seed and self.model != "tiny":
            raise ConfigError("pretrain_seed applies to the tiny backend only; drop it for other models.")
        if self.fsdp and self.precision == "float16":
            raise ConfigError("fsdp trains in float32 or bfloat16 (float16 needs a sharded gradient scaler).")
        relation_by_name(self.relation, self.known_relations())  # fails fast on an unknown relation
        resolve_device(self.device)  # and on a GPU this machine does not have

    def known_relations(self) -> dict[str, Relation]:
        return known_relations(self.relations_file)


def known_relations(relations_file: str | None = None) -> dict[str, Relation]:
    """The built-in relations plus those of ``relations_file``."""
    return {**BUILTIN_RELATIONS, **(load_relations(relations_file) if relations_file else {})}


def cached_backend(
    model: str, relations_file: str | None, pretrain_seed: int = 0, device: str = "cpu"
) -> Backend:
    """One backend per worker process (the tiny one is built from every known relation). Every
    argument is passed on by position, so calls that spell the defaults out or leave them off share
    one loaded model; a relations file or model folder changed on disk since is loaded anew."""
    return _cached_backend(model, relations_file, pretrain_seed, device, _on_disk(model, relations_file))


def _on_disk(model: str, relations_file: str | None) -> tuple:
    """What the cached backend was made from on disk: the relations file's bytes (they decide the tiny
    model's pretraining) and the model folder's files' sizes and modification times."""
    relations = None  # a missing file is load_relations' to report
    if relations_file and Path(relations_file).is_file():
        relations = hashlib.sha256(Path(relations_file).read_bytes()).hexdigest()
    folder = Path(model)
    files = ()
    if model not in ("tiny", "smollm2") and folder.is_dir():
        files = tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in folder.iterdir()))
    return relations, files


@functools.lru_cache(maxsize=2)
def _cached_backend(
    model: str, relations_file: str | None, pretrain_seed: int, device: str, on_disk: tuple
) -> Backend:
    return load_backend(model, known_relations(relations_file), pretrain_seed, device)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def verdict(relation: Relation, before: float | None, after: float | None) -> str:
    """Transfer = the test-implication rank ends clearly below both its start and chance level."""
    chance = (len(relation.pairs) - 1) / 2
    if before is None or after is None or after > min(before, chance) - CHANCE_MARGIN:
        return "no out-of-context transfer"
    return "generalization" if relation.causal else "hallucination"


@dataclasses.dataclass
class _Cell:
    """A cell made ready to train: its config, backend, world, queries and ranks before."""

    cfg: InjectConfig
    relation: Relation
    backend: Backend
    probe: dict[str, Any]
    world: World
    queries: list
    before: list[int]
    settings: FineTuneSettings
    started: float
    curve: Curve
    known: list


CURVE_POINTS = 20  # evaluations during training
CURVE_QUERIES = 32  # queries of each kind evaluated at each point (the first of each kind)


class Curve:
    """Mean ranks of each query kind on a fixed subset of a cell's queries at ~20 points of training:
    when memorisation, generalization and hallucination appear (step 0: the base model)."""

    def __init__(self, queries: list, before: list[int], total_steps: int):
        taken: dict[str, int] = {}
        self.index = []
        for i, q in enumerate(queries):
            if taken.get(q.kind, 0) < CURVE_QUERIES:
                self.index.append(i)
                taken[q.kind] = taken.get(q.kind, 0) + 1
        self.queries = [queries[i] for i in self.index]
        self.steps = sorted(
            {max(1, round(i * total_steps / CURVE_POINTS)) for i in range(1, CURVE_POINTS + 1)}
        )
        self.points = [self._point(0, [before[i] for i in self.index])]

    def _point(self, step: int, ranks: list[int]) -> dict[str, Any]:
        point: dict[str, Any] = {"step": step}
        for kind in KINDS:
            point[kind] = mean([r for q, r in zip(self.queries, ranks) if q.kind == kind])
        return point

    def watch(self, backend: Backend, step: int, model) -> None:
        self.points.append(self._point(step, backend.ranks(model, self.queries)))


@functools.lru_cache(maxsize=8)
def _known_queries(model: str, relations_file: str | None, pretrain_seed: int) -> tuple:
    """Facts the base model knows, unrelated to any injected world: every relation's background
    knowledge ("People in Paris speak" -> French) and, on the tiny backend, 20 pretraining people's
    facts per relation."""
    from factorlab.inject.backends import background_queries
    from factorlab.inject.tiny import pretraining_fact_queries

    relations = known_relations(relations_file)
    out, seen = [], set()
    for relation in relations.values():
        if relation.background:
            for q in background_queries(relation, relations):
                if q.prompt not in seen:
                    seen.add(q.prompt)
                    out.append(q)
    if model == "tiny":
        out += pretraining_fact_queries(relations, TinyPretrainConfig(seed=pretrain_seed))
    return tuple(out)


def _known_summary(backend: Backend, model, queries: list) -> dict[str, Any] | None:
    if not queries:
        return None
    before, after = backend.base_ranks(queries), backend.ranks(model, queries)
    top1_before = sum(r == 0 for r in before) / len(before)
    top1_after = sum(r == 0 for r in after) / len(after)
    return {
        "queries": len(queries),
        "rank_before": mean(before),
        "rank_after": mean(after),
        "top1_before": top1_before,
        "top1_after": top1_after,
        "top1_drop": top1_before - top1_after,
    }


def _ready(cell: dict[str, Any]) -> _Cell:
    cell = dict(cell)
    expected_key = cell.pop("backend_key", None)
    cfg = InjectConfig(**cell)
    started = time.perf_counter()
    known = cfg.known_relations()
    relation = relation_by_name(cfg.relation, known)
    backend = cached_backend(cfg.model, cfg.relations_file, cfg.pretrain_seed, cfg.device)
    backend.check_candidates(relation.fact_answers)
    backend.check_candidates(relation.implication_answers)
    if expected_key is not None and backend.info.get("key") != expected_key:
        raise ConfigError(
            f"the tiny backend's key {backend.info.get('key')} is not the cell's {expected_key}."
        )
    probe = backend.probe(relation, known)
    world = World.generate(relation, cfg.seed, cfg.num_subjects, cfg.bridge_fraction, names=cfg.names)
    queries = world.queries()
    settings = FineTuneSettings(
        cfg.method,
        cfg.r,
        cfg.lora_alpha,
        cfg.lr,
        cfg.epochs,
        cfg.batch_size,
        seed=cfg.seed,
        precision=cfg.precision,
        gradient_checkpointing=cfg.gradient_checkpointing,
        fsdp=cfg.fsdp,
    )
    before = backend.base_ranks(queries)
    curve = Curve(queries, before, total_steps(backend, world, settings))
    known = list(_known_queries(cfg.model, cfg.relations_file, cfg.pretrain_seed))
    return _Cell(cfg, relation, backend, probe, world, queries, before, settings, started, curve, known)


def _check_shared_base(backend: Backend, run: str) -> None:
    try:  # the loaded model is reused by this process's next cells: it must come out as it went in
        backend.check_weights_unchanged(run)
    except SharedModelChangedError:
        _cached_backend.cache_clear()
        raise


def inject_cell(
    cell: dict[str, Any], folder: Path, progress=None, save_adapter: Path | None = None
) -> dict[str, Any]:
    """One relation x method x seed; writes ranks.json into ``folder`` and returns the summary.
    ``save_adapter``: also write the trained adapter there (full fine-tuning: the whole model)."""
    ready = _ready(cell)
    cfg = ready.cfg
    model, losses = fine_tune(
        ready.backend,
        ready.world,
        ready.settings,
        progress,
        watch=lambda step, m: ready.curve.watch(ready.backend, step, m),
        watch_steps=ready.curve.steps,
    )
    after = ready.backend.ranks(model, ready.queries)
    known = _known_summary(ready.backend, model, ready.known) if is_main() else None
    _check_shared_base(ready.backend, f"{cfg.method} on {cfg.relation}, seed {cfg.seed}")
    if save_adapter is not None and cfg.fsdp:
        from factorlab.fsdp import write_sharded

        write_sharded(model, save_adapter)  # gathered on rank 0, which writes (every rank takes part)
    elif save_adapter is not None and is_main():
        model.save_pretrained(save_adapter)  # an AdaptedModel writes its adapter; full: the whole model
    update = update_spectrum(cfg.method, model, ready.backend.model) if is_main() and not cfg.fsdp else None
    return _summary(ready, after, losses, folder, time.perf_counter() - ready.started, update, known)


def _summary(
    ready: _Cell,
    after: list[int],
    losses: list[float],
    folder: Path,
    seconds: float,
    update: dict[str, Any] | None,
    known: dict[str, Any] | None,
) -> dict[str, Any]:
    """The cell's summary (``update``: the spectrum of the update it made, factorlab.inject.spectrum);
    writes its ranks.json (rank 0)."""
    cfg, relation, backend, world, queries, before = (
        ready.cfg, ready.relation, ready.backend, ready.world, ready.queries, ready.before
    )  # fmt: skip
    summary: dict[str, Any] = {}
    for kind in KINDS:
        summary[f"{kind}_rank"] = mean([r for q, r in zip(queries, after) if q.kind == kind])
        summary[f"{kind}_rank_before"] = mean([r for q, r in zip(queries, before) if q.kind == kind])
    lr, epochs, batch = ready.settings.resolved(backend)
    summary |= {
        "num_candidates": len(relation.pairs),
        "chance_rank": (len(relation.pairs) - 1) / 2,
        "causal": relation.causal,
        "probe": ready.probe,
        "probe_ok": ready.probe["accuracy"] is None or ready.probe["accuracy"] >= PROBE_THRESHOLD,
        "verdict": verdict(
            relation, summary["test_implication_rank_before"], summary["test_implication_rank"]
        ),
        "final_loss": losses[-1],
        "update": update,
        "curve": ready.curve.points,
        "known": known,
        "steps": len(losses),
        "seconds": seconds,
        "config": {**dataclasses.asdict(cfg), "lr": lr, "epochs": epochs, "batch_size": batch},
        "backend": backend.info,
        "machine": machine_info(cfg.device),
        "world": {
            "subjects": len(world.subjects),
            "bridge": len(world.bridge),
            "test": len(world.test),
            "training_texts": len(world.training_texts()),
        },
    }
    if is_main():  # under torchrun / accelerate only rank 0 writes
        rows = [
            {
                "kind": q.kind,
                "subject": q.subject,
                "prompt": q.prompt,
                "answer": q.answer,
                "candidates": q.candidates,
                "rank_before": b,
                "rank": a,
            }
            for q, b, a in zip(queries, before, after)
        ]
        write_json(folder / "ranks.json", rows)
    return summary


def pack_key(cell: dict[str, Any]) -> tuple | None:
    """Cells with the same key share a frozen base and may train as one pack (inject.pack): LoRA cells
    (any ranks) or Compacter++ cells, in float32 on one process; other cells train alone."""
    if cell.get("method") not in PACKED_METHODS or cell.get("precision", "float32") != "float32":
        return None
    if cell.get("fsdp") or cell.get("gradient_checkpointing"):
        return None
    keys = ("method", "model", "pretrain_seed", "backend_key", "relations_file", "device")
    return tuple(cell.get(k) for k in keys)


def run_pack(cells: list[dict[str, Any]], folders: list[Path], write) -> None:
    """Cells of one pack key trained as one model (factorlab.inject.pack); each cell's summary is
    written (``write(j, summary)``) as it finishes. Its ``seconds`` is its share of the pack's time;
    ``pack`` records the pack. More cells than fit in memory train as consecutive packs."""
    started = time.perf_counter()
    ready = [_ready(c) for c in cells]
    backend = ready[0].backend
    size = cells_that_fit(backend, ready[0].world, ready[0].settings, len(cells))
    for first in range(0, len(cells), size):
        part = list(range(first, min(first + size, len(cells))))
        members = [Member(ready[j].world, ready[j].settings) for j in part]

        def finished(k: int, pack, losses: list[float], part=part) -> None:
            j = part[k]
            after = backend.ranks(pack, ready[j].queries)
            seconds = (time.perf_counter() - started) / len(cells)
            update = aggregate(pack.spectra(k))
            known = _known_summary(backend, pack, ready[j].known)
            summary = _summary(ready[j], after, losses, folders[j], seconds, update, known)
            write(j, {**summary, "pack": {"cells": len(part), "seconds": time.perf_counter() - started}})

        fine_tune_packed(
            backend,
            members,
            progress=_pack_progress(backend, members, time.perf_counter()),
            on_finished=finished,
            watch=lambda k, step, pack, part=part: ready[part[k]].curve.watch(backend, step, pack),
            watch_steps=[ready[j].curve.steps for j in part],
        )
    _check_shared_base(backend, f"a pack of {len(cells)} {cells[0]['method']} cells")


def _pack_progress(backend: Backend, members: list[Member], started: float):
    """A line on the console at every tenth of a pack's steps: its cells all finish at its end (equal
    steps), so the grid's bar of finished cells would stand still until then."""
    total = max(total_steps(backend, m.world, m.settings) for m in members)
    marks = {max(1, round(total * k / 10)) for k in range(1, 11)}
    what = f"pack of {len(members)} {members[0].settings.method} cells"

    def progress(step: int) -> None:
        if step in marks:
            console.print(f"{what}: step {step}/{total}, {time.perf_counter() - started:.0f} s")

    return progress


def cells_that_fit(backend: Backend, world: World, settings: FineTuneSettings, wanted: int) -> int:
    """How many cells of this backend one pack may hold: a cell's training activations (measured as
    ``factorlab plan`` measures them, one row of the world's longest step) within half the memory
    left (the GPU's, for a backend on one), shared by the machine's cores (one grid worker each)."""
    import os

    import torch

    from factorlab.plan import pack_cell_bytes
    from factorlab.runtime import available_memory

    device = next(backend.model.parameters()).device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    if free is None or wanted <= 1:
        return max(1, wanted)
    _, _, batch = settings.resolved(backend)
    longest = int(
        backend.encode(world.training_texts())["attention_mask"].sum(1).max()
    )  # one call, all texts
    tokens = longest * batch
    per_cell = pack_cell_bytes(backend.model.config, tokens, settings.r)
    budget = free / 2 / (os.cpu_count() or 1)
    return max(1, min(wanted, int(budget // per_cell)))


def run(cfg: InjectConfig, out: str | Path, save_adapter: bool = False) -> dict[str, Any]:
    """`factorlab inject run`: one cell into ``out`` (summary.json, ranks.json; with ``save_adapter``
    the trained adapter in ``out/adapter``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backend = cached_backend(cfg.model, cfg.relations_file, cfg.pretrain_seed, cfg.device)
    relation = relation_by_name(cfg.relation, cfg.known_relations())
    world = World.generate(relation, cfg.seed, cfg.num_subjects, cfg.bridge_fraction, names=cfg.names)
    steps = total_steps(
        backend,
        world,
        FineTuneSettings(
            cfg.method, cfg.r, cfg.lora_alpha, cfg.lr, cfg.epochs, cfg.batch_size, seed=cfg.seed
        ),
    )
    with StepBars(f"{cfg.method} on {cfg.relation}") as bars:
        bars.start([f"{cfg.method}, {cfg.relation}, seed {cfg.seed}"], [steps])
        summary = inject_cell(
            dataclasses.asdict(cfg),
            out,
            progress=lambda s: bars.update(0, s),
            save_adapter=out / "adapter" if save_adapter else None,
        )
    if is_main():
        write_json(out / "summary.json", summary)
    return summary


# ---- grids ------------------------------------------------------------------------------------------


def grid_cells(
    model: str,
    relations: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    r: int,
    rank_sweep: Sequence[int] = (),
    relations_file: str | None = None,
    pretrain_seeds: Sequence[int] = (0,),
    device: str = "cpu",
    lr_scales: Sequence[float] = (1.0,),
    epochs_sweep: Sequence[int] = (),
    **fixed: Any,
) -> list[dict]:
    """Relations x pretraining seeds (tiny only) x seeds x methods (+ LoRA ranks), validated; with
    ``lr_scales`` and ``epochs_sweep``, x each method's default learning rate times each scale x each
    number of epochs (the scale 1 at the default epochs is the plain grid's cell, same id).

    A ``device`` other than "cpu" is part of each cell (its own folder: a GPU result never stands
    in for a CPU one, nor the reverse); CPU cells keep the ids they had before devices existed."""
    for name, values in (("lr_scales", lr_scales), ("epochs_sweep", epochs_sweep)):
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0]
        if bad:
            raise ConfigError(f"{name} must hold positive numbers, got {bad}.")
    if not lr_scales:
        raise ConfigError("give at least one lr scale (1 keeps each method's default learning rate).")
    if epochs_sweep and fixed.get("epochs") is not None:
        raise ConfigError("give --epochs or --epochs-sweep, not both.")
    for name, values in (("relations", relations), ("methods", methods), ("seeds", seeds)):
        if not values:
            raise ConfigError(f"give at least one of {name}.")
    unknown = sorted(set(methods) - set(DEFAULTS["tiny"]))
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(DEFAULTS['tiny'])}.")
    if model != "tiny":
        pretrain_seeds = (0,)
    if not pretrain_seeds:
        raise ConfigError("give at least one pretraining seed.")
    cells = []
    for relation in relations:
        for pretrain_seed in pretrain_seeds:
            for seed in seeds:
                base = {"model": model, "relation": relation, "seed": seed}
                if model == "tiny":
                    base["pretrain_seed"] = pretrain_seed
                for method in methods:
                    cells.append({**base, "method": method, "r": r})
                for rank in rank_sweep:
                    if not ("lora" in methods and rank == r):
                        cells.append({**base, "method": "lora", "r": rank})
    relations = known_relations(relations_file)
    backend_keys = (
        {  # one key per pretrained tiny backend (hashing builds the tokenizer)
            seed: backend_key(relations, TinyPretrainConfig(seed=seed)) for seed in pretrain_seeds
        }
        if model == "tiny"
        else {}
    )
    for cell in cells:
        # Everything that determines a cell's result is part of its id, defaults included, so a
        # changed default or pretraining recipe never reuses an old result.
        cell["lora_alpha"] = 8.0
        cell["names"] = "pooled"
        lr, epochs, batch = DEFAULTS["tiny" if model == "tiny" else "hf"][cell["method"]]
        cell.update(lr=lr, epochs=epochs, batch_size=batch)
        if model == "tiny":
            cell["backend_key"] = backend_keys[cell["pretrain_seed"]]
        if relations_file:
            cell["relations_file"] = relations_file
        if device != "cpu":
            cell["device"] = device
        # settings at their defaults stay out of the id, so the committed cells keep theirs
        defaults = {"precision": "float32", "gradient_checkpointing": False, "fsdp": False}
        cell.update({k: v for k, v in fixed.items() if v is not None and defaults.get(k, ...) != v})
    swept = [  # without a sweep (scale 1, the cell's own epochs), each cell as it is
        {
            **cell,
            "lr": cell["lr"] if scale == 1 else float(f"{cell['lr'] * scale:.6g}"),
            "epochs": int(epochs),
        }
        for cell in cells
        for scale in lr_scales
        for epochs in epochs_sweep or (cell["epochs"],)
    ]
    for cell in swept:
        InjectConfig(**{k: v for k, v in cell.items() if k != "backend_key"})  # validate before any work
    return swept


# what the grid's reports read; a summary without it is recomputed
inject_cell.summary_is_complete = has_keys(
    "config", "causal", "probe", "world", "verdict", "chance_rank", "num_candidates", "train_fact_rank",
    "test_fact_rank", "test_implication_rank", "test_implication_rank_before", "machine",
)  # fmt: skip
inject_cell.pack_key = pack_key  # cells that train as one model (grid --pack)
inject_cell.run_pack = run_pack


def pretrain_cell(cell: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A grid cell that builds (or finds) one tiny backend, so missing seeds pretrain in parallel."""
    relations = known_relations(cell.get("relations_file"))
    started = time.perf_counter()
    _, _, info = tiny_model(relations, TinyPretrainConfig(seed=cell["pretrain_seed"]))
    return {**info, "seconds": time.perf_counter() - started}


def prepare_tiny_backends(cells: list[dict], workers: int | None, out: Path) -> None:
    """Pretrain every tiny backend the cells need and that is neither shipped nor cached."""
    relations_file = next((c.get("relations_file") for c in cells), None)
    relations = known_relations(relations_file)
    missing = []
    for seed in sorted({c.get("pretrain_seed", 0) for c in cells if c["model"] == "tiny"}):
        key = backend_key(relations, TinyPretrainConfig(seed=seed))
        if (
            shipped_folder(key) is None
            and not (cache_dir() / f"inject-tiny-{key}" / "manifest.json").exists()
        ):
            missing.append({"pretrain_seed": seed, "key": key, "relations_file": relations_file})
    if not missing:
        return
    console.print(
        f"pretraining {len(missing)} tiny backend(s) (seeds {[m['pretrain_seed'] for m in missing]})"
    )
    report = run_grid("factorlab.recipes.inject:pretrain_cell", missing, out / "pretrain", workers)
    if report.failed:
        raise GridCellsFailed("tiny backend pretraining(s)", report.failed)


def grid(
    cells: list[dict],
    out: str | Path,
    workers: int | None = None,
    backend: str = "local",
    address: str | None = None,
    retries: int = 1,
    pack: int = 16,
) -> dict[str, Any]:
    """`factorlab inject grid`: run (or reuse) every cell, then write results.json, table.{md,csv,json},
    ranks.png, rank_sweep.png and report.md. LoRA (or Compacter++) cells that share a base train in
    packs of up to ``pack`` (factorlab.inject.pack; a packed cell's summary records its pack); 1: every
    cell alone."""
    out = Path(out)
    check_grid_options(backend, address, workers)  # before pretraining anything
    check_pack(pack)
    (out / "cells").mkdir(parents=True, exist_ok=True)  # an unusable --out fails here too
    started = time.perf_counter()
    prepare_tiny_backends(cells, workers if backend == "local" else None, out)
    with StepBars("injection grid") as bars:
        bars.start([f"{len(cells)} cells"], [len(cells)])
        report = run_grid(
            "factorlab.recipes.inject:inject_cell",
            cells,
            out,
            workers,
            retries,
            backend,
            address,
            on_done=lambda done, total: bars.update(0, done),
            pack=pack,
        )
    result = write_grid_report(out, report, time.perf_counter() - started)
    if report.failed:
        raise GridCellsFailed(f"of {len(cells)} injection cells", report.failed)
    return result


def report_from_cells(out: str | Path) -> dict[str, Any]:
    """`factorlab report OUT`: rebuild the grid's tables, plots and report from OUT/cells/*/summary.json."""
    out = Path(out)
    summaries = [load_summary(folder) for folder in sorted((out / "cells").glob("*/"))]
    results = [s for s in summaries if s is not None and "config" in s]
    if not results:
        raise ConfigError(
            f"{out}/cells holds no finished injection cells; run `factorlab inject grid` first."
        )
    report = GridReport(results=results, reused=len(results))
    seconds = sum(s.get("seconds", 0.0) for s in results)
    return write_grid_report(out, report, seconds, cell_seconds=True)


def pretrain_command(seed: int, relations_file: str | None = None, ship: bool = False) -> list[str]:
    """`factorlab inject pretrain`: build (or find) the tiny backend of ``seed``; report its probe.

    ``ship`` copies it into factorlab's package data (``factorlab/inject/data/tiny-seed<N>``), where
    every installation finds it without pretraining; only the built-in relations can be shipped.
    """
    if ship and relations_file:
        raise ConfigError("only the built-in relations' backend can be shipped; drop --relations-file.")
    relations = known_relations(relations_file)
    config = TinyPretrainConfig(seed=seed)
    model, tokenizer, info = tiny_model(relations, config)
    backend = Backend("tiny", model, tokenizer, info)
    lines = [f"tiny backend, pretraining seed {seed}: {info['source']} ({info['folder']}), key {info['key']}"]
    failed = []
    for name, relation in relations.items():
        probe = backend.probe(relation, relations)
        if probe["accuracy"] is None:
            lines.append(f"  {name}: no background knowledge to probe")
            continue
        lines.append(f"  {name}: background probe {probe['accuracy']:.2f} ({probe['queries']} queries)")
        if probe["accuracy"] < PROBE_THRESHOLD:
            failed.append(name)
    lines.append("  recall of pretraining people (fact / implication; causal implications can be derived):")
    for name, recall in pretraining_recall(backend, relations, config).items():
        kind = "causal" if recall["causal"] else "non-causal"
        lines.append(f"    {name} ({kind}): {recall['fact']:.2f} / {recall['implication']:.2f}")
    if failed:
        raise ConfigError(
            f"the tiny backend of seed {seed} fails its background probe on {failed} "
            f"(< {PROBE_THRESHOLD}); its fine-tuning results would mean little. Pretrain longer."
        )
    if ship:
        target = SHIPPED_DIR / f"tiny-seed{seed}"
        key = tiny_cache_key(relations, config)  # a shipped backend is the same bits on every machine
        manifest = {"key": key, "spec": tiny_spec(relations, config), "machine": machine_info()}
        save_backend(model, tokenizer, target, manifest)
        lines.append(f"shipped into {target}")
    return lines
