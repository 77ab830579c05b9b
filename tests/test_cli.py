import json

import torch
from typer.testing import CliRunner

from factorlab.cli import app

runner = CliRunner()


def test_ocr_run_writes_metrics_summary_and_plot(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "ocr",
            "run",
            "--steps",
            "90",
            "--eval-every",
            "30",
            "--d-h",
            "16",
            "--association",
            "spurious",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 30, 60, 90]
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "train_fact_acc",
        "train_impl_acc",
        "test_fact_acc",
        "test_impl_acc",
        "test_impl_loss",
        "nuclear_norm",
        "frobenius_norm",
        "steps",
        "seconds",
        "config",
        "hallucination_rate",
    ):
        assert key in summary
    assert summary["config"]["d_h"] == 16 and summary["config"]["association"] == "spurious"
    assert summary["steps"] == 90
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_ocr_sweep_writes_results_tables_and_plots(tmp_path):
    out = tmp_path / "sweep"
    result = runner.invoke(
        app,
        [
            "ocr",
            "sweep",
            "--d-h",
            "4,8",
            "--seeds",
            "2",
            "--steps",
            "40",
            "--workers",
            "1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 6  # (2 d_h + combined) x 2 seeds
    (machine,) = json.loads((out / "sweep.json").read_text())["machine"]  # one worker, one machine
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and machine["threads"] == 1
    assert (
        f"Machine: {machine['cpu_capability']} kernels, torch {machine['torch']}"
        in (out / "report.md").read_text()
    )
    assert {(r["model"], r["seed"]) for r in records} == {
        (m, s) for m in ("factorized d_h=4", "factorized d_h=8", "combined") for s in (42, 43)
    }
    for r in records:
        assert {"test_impl_acc", "nuclear_norm", "config"} <= set(r)
    for name in ("table.md", "table.csv", "table.json", "curves.png", "accuracy_vs_dh.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert len(json.loads((out / "table.json").read_text())) == 3


def test_bad_input_gives_a_clear_error_and_exit_code_2(tmp_path):
    cases = [
        (["ocr", "run", "--d-h", "0"], "d_h must be >= 1"),
        (["ocr", "run", "--batch-size", "100"], "multiple of 3"),
        (["ocr", "run", "--train-fraction", "1.0"], "0 test"),
        (["ocr", "run", "--seq-len", "2"], "seq_len must be >= 3"),
        (["ocr", "sweep", "--d-h", "4,0"], "d_h must be >= 1"),
        (["inject", "run", "--device", "gpu"], "not a torch device; use 'cpu', 'cuda'"),
    ]
    if not torch.cuda.is_available():
        cases += [
            (["inject", "run", "--device", "cuda"], "sees no CUDA GPU; use --device cpu"),
            (["inject", "grid", "--device", "cuda:0"], "sees no CUDA GPU"),
        ]
    for args, message in cases:
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output
        assert not (tmp_path / "x").exists()  # failed before doing any work


def test_demo_quick_writes_a_report(tmp_path):
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Factorized generalizes" in report and "max-margin" in report and "Knowledge injection" in report
    for png in ("ocr/curves.png", "rank-sweep/accuracy_vs_dh.png", "theory/theory.png"):
        assert (tmp_path / "demo" / png).exists()


def test_set_overrides_any_mixer_setting():
    from factorlab.cli import _mixer_config

    cfg = _mixer_config(
        "quick",
        None,
        None,
        None,
        None,
        None,
        [0],
        None,
        ["router_lr=0.005", "balance_coef=0", 'tasks=["first","max"]'],
    )
    assert cfg.router_lr == 0.005 and cfg.balance_coef == 0 and cfg.tasks == ["first", "max"]
    assert cfg.steps == 1500  # the rest keeps the preset's values


def test_report_on_a_folder_without_cells_names_what_to_pass(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "has no cells/ folder; pass the --out folder of `factorlab inject grid`" in result.output
