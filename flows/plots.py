"""Figures of a pipeline run: loss curves per objective (from MLflow's metric history) and
minimal-pair accuracy by phenomenon (from the evaluation results)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss_curves(client, run_id: str, out_png: str | Path) -> list[str]:
    """Training/validation loss curves, one line per objective, from the run's metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = client.get_run(run_id)
    keys = sorted(k for k in run.data.metrics if "loss" in k and not k.startswith("stage."))
    if not keys:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if len(hist) >= 1:
            ax.plot([m.step for m in hist], [m.value for m in hist], label=key,
                    marker="o" if len(hist) < 3 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title("GPT-BERT pretraining loss per objective")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return keys


def plot_by_phenomenon(by_phenomenon: dict[str, dict[str, float]], out_png: str | Path,
                       chance: float = 0.5) -> None:
    """Grouped bars: accuracy per phenomenon (rows) and scoring mode (bars), with chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phenomena = sorted(by_phenomenon)
    modes = sorted({m for v in by_phenomenon.values() for m in v})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(phenomena) + 2), 4))
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        xs = [i + j * width for i in range(len(phenomena))]
        ax.bar(xs, [by_phenomenon[p].get(mode, float("nan")) for p in phenomena], width, label=mode)
    ax.axhline(chance, color="k", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(phenomena))])
    ax.set_xticklabels(phenomena, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.15)  # headroom for the legend above bars that reach 1.0
    ax.set_ylabel("accuracy")
    ax.set_title("Minimal-pair accuracy by phenomenon")
    ax.legend(fontsize=8, loc="upper center", ncol=len(modes) + 1)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def phenomenon_table(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{phenomenon: {mode: accuracy at the mode's best temperature}} of the ``blimp`` task."""
    table: dict[str, dict[str, float]] = {}
    for mode, r in results.get("tasks", {}).get("blimp", {}).get("modes", {}).items():
        for name, acc in r["best"]["phenomena"].items():
            table.setdefault(name, {})[mode] = acc
    return table


def evaluation_figures(results: dict[str, Any], folder: Path) -> None:
    """The evaluation folder's figures (``by_phenomenon.png`` when minimal pairs were scored)."""
    table = phenomenon_table(results)
    if table:
        plot_by_phenomenon(table, Path(folder) / "by_phenomenon.png")


__all__ = ["evaluation_figures", "phenomenon_table", "plot_by_phenomenon", "plot_loss_curves"]
