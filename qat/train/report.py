"""Offline comparison of finished runs: `python -m qat.train.report <dir of runs> [--out DIR]`.

Finds every summary.json below the directory and writes
  report.md   one row per run (method, estimator, W/A bits, accuracy, size, compression, speed)
  report.png  accuracy against quantized model size (log x), one marker per W/A bit-width
The accuracy plotted is test_acc1 when the run has a test split, else best_val_acc1.
A missing directory, no summary.json or an unreadable one print one line and exit with status 2
(`qat.train.cli`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = (("run", "run"), ("model", "model"), ("data", "data"), ("method", "method"),
           ("estimator", "estimator"), ("W/A", "bits"), ("seed", "seed"), ("epochs", "epochs"),
           ("best val top-1", "best_val_acc1"), ("test top-1", "test_acc1"),
           ("quantized KiB", "quantized_kib"), ("compression", "compression"),
           ("s/epoch", "seconds_per_epoch"))


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
    return run.get("test_acc1") if run.get("test_acc1") is not None else run.get("best_val_acc1")


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
    header = "| " + " | ".join(title for title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(_cell(run, key) for _, key in COLUMNS) + " |" for run in runs]
    return "\n".join([header, rule, *rows])


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
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
    axes.set_ylabel("top-1 accuracy (%) (test, else best validation)")
    axes.set_title("accuracy vs model size and bit-width")
    axes.grid(True, which="both", alpha=0.3)
    if by_bits:
        axes.legend(title="weights/activations")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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
