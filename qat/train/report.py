"""Offline comparison of finished runs: `python -m qat.train.report <dir of runs> [--out DIR]`.

Finds every summary.json below the directory and writes
  report.md   one row per run (method, estimator, W/A bits, accuracy, size, compression, speed)
  report.png  accuracy against quantized model size (log x), one marker per W/A bit-width
The accuracy plotted is test_acc1 when the run has a test split, else best_val_acc1. The figures are
the run's task's (`qat.train.tasks`, the summary's `task`; classification when absent): for language
models bits per byte (test_bpb, else best_val_bpb) instead of top-1. Runs of different tasks get one
table each and one panel each in report.png.
A missing directory, no summary.json or an unreadable one print one line and exit with status 2
(`qat.train.cli`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qat.train.tasks import get_task

LEADING_COLUMNS = (("run", "run"), ("model", "model"), ("data", "data"), ("method", "method"),
                   ("estimator", "estimator"), ("W/A", "bits"), ("seed", "seed"), ("epochs", "epochs"))
TRAILING_COLUMNS = (("quantized KiB", "quantized_kib"), ("compression", "compression"),
                    ("s/epoch", "seconds_per_epoch"))


def columns(task_name: str | None = None) -> tuple[tuple[str, str], ...]:
    """(title, key) of the table's columns for runs of the task `task_name`."""
    return LEADING_COLUMNS + get_task(task_name).report_columns + TRAILING_COLUMNS


COLUMNS = columns()  # classification


def load_runs(directory: Path) -> list[dict[str, Any]]:
    """Every summary.json under `directory`, with `run` = its folder relative to `directory`."""
    runs = []
    for path in sorted(Path(directory).rglob("summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); delete it or rerun that run") from error
        if not isinstance(summary, dict):
            raise ValueError(f"{path} holds a {type(summary).__name__}, not a run summary (a JSON object); "
                             f"delete it or rerun that run")
        summary["run"] = str(path.parent.relative_to(directory)) or "."
        runs.append(summary)
    return runs


def accuracy(run: dict[str, Any]) -> float | None:
    """The run's headline figure: top-1 (test, else best validation), or bits per byte for a language model."""
    return get_task(run.get("task")).headline(run)


def by_task(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The runs grouped by task name, classification first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(get_task(run.get("task")).name, []).append(run)
    return dict(sorted(groups.items(), key=lambda item: item[0] != "classification"))


def _cell(run: dict[str, Any], key: str) -> str:
    if key == "bits":
        return f"{run.get('w_bits')}/{run.get('a_bits')}"
    if key == "quantized_kib":
        value = run.get("quantized_bytes")
        return "" if value is None else f"{value / 1024:.1f}"
    value = run.get(key)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """One table per task (the task's name above it when there is more than one)."""
    groups = by_task(runs)
    tables = []
    for task_name, group in groups.items():
        table_columns = columns(task_name)
        header = "| " + " | ".join(title for title, _ in table_columns) + " |"
        rule = "|" + "|".join("---" for _ in table_columns) + "|"
        rows = ["| " + " | ".join(_cell(run, key) for _, key in table_columns) + " |" for run in group]
        title = [f"## {task_name.replace('_', ' ')}", ""] if len(groups) > 1 else []
        tables.append("\n".join([*title, header, rule, *rows]))
    return "\n\n".join(tables)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_task(runs) or {"classification": []}
    figure, panels = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.5), squeeze=False)
    for axes, (task_name, group) in zip(panels[0], groups.items(), strict=True):
        _plot_panel(axes, group, get_task(task_name).report_axis)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_panel(axes, runs: list[dict[str, Any]], ylabel: str) -> None:
    markers = "osD^v<>pPX*h"
    by_bits: dict[str, list[dict]] = {}
    for run in runs:
        if accuracy(run) is not None and run.get("quantized_bytes"):
            by_bits.setdefault(f"W{run.get('w_bits')}/A{run.get('a_bits')}", []).append(run)
    for index, (bits, group) in enumerate(sorted(by_bits.items())):
        xs = [run["quantized_bytes"] / 1024 for run in group]
        ys = [accuracy(run) for run in group]
        axes.scatter(xs, ys, marker=markers[index % len(markers)], s=50, label=bits)
        for run, x, y in zip(group, xs, ys, strict=True):
            axes.annotate(f"{run.get('model')}/{run.get('data')}/{run.get('method')}", (x, y), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    axes.set_xscale("log")
    axes.set_xlabel("quantized model size (KiB, log scale)")
    axes.set_ylabel(ylabel)
    axes.set_title("accuracy vs model size and bit-width")
    axes.grid(True, which="both", alpha=0.3)
    if by_bits:
        axes.legend(title="weights/activations")


def write_report(directory: Path, out: Path | None = None) -> tuple[Path, Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory of runs")
    runs = load_runs(directory)
    if not runs:
        raise FileNotFoundError(f"no summary.json found under {directory}")
    out = Path(out) if out else directory
    out.mkdir(parents=True, exist_ok=True)
    markdown, image = out / "report.md", out / "report.png"
    markdown.write_text(f"# Runs under {directory}\n\n{markdown_table(runs)}\n\n![accuracy vs size]({image.name})\n")
    plot(runs, image)
    return markdown, image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat.train.report", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a folder holding run directories with summary.json")
    parser.add_argument("--out", type=Path, default=None, help="where report.md / report.png go (default: directory)")
    args = parser.parse_args(argv)
    markdown, image = write_report(args.directory, args.out)
    print(f"wrote {markdown} and {image}")
    return 0


if __name__ == "__main__":
    from qat.train import cli

    sys.exit(cli.guard(main, "python -m qat.train.report"))
