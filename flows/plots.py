"""Figures of a pipeline run: loss curves per objective (from MLflow's metric history) and
minimal-pair accuracy by phenomenon, word-milestone curves and the in-context-learning curve
(from the evaluation results)."""

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


def plot_milestones(milestones: list[dict[str, Any]], out_png: str | Path) -> list[str]:
    """One line per T = 1 metric against the words seen at each word milestone (log scale):
    accuracies on the left axis (%), WUG correlations on the right. Returns the metrics drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptbert.evaluation import curve_metrics, metric_unit

    names = curve_metrics(k for m in milestones for k in m["metrics"])  # as the tasks declare them
    if not names:
        return []
    words = [m["words"] for m in milestones]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    right = None
    for name in names:
        values = [m["metrics"].get(name, float("nan")) for m in milestones]
        if metric_unit(name) == "fraction":
            values = [100 * v for v in values]
        target = ax
        if metric_unit(name) == "rho":  # a correlation, not a percentage
            right = right or ax.twinx()
            target = right
        target.plot(words, values, marker="o", label=name, linestyle="--" if target is right else "-")
    ax.set_xscale("log")
    ax.set_xlabel("words seen")
    ax.set_ylabel("accuracy % (T = 1)")
    if right is not None:
        right.set_ylabel("Spearman's rho (WUG)")
    ax.set_title("Zero-shot scores at the word milestones")
    handles = ax.get_legend_handles_labels()
    if right is not None:
        extra = right.get_legend_handles_labels()
        handles = (handles[0] + extra[0], handles[1] + extra[1])
    ax.legend(*handles, fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return names


def plot_icl_curve(icl: dict[str, Any], out_png: str | Path) -> None:
    """The ``icl`` task's accuracy against k: one panel per task, a line per mode (dashed:
    calibrated) with its standard error as bars, and the majority-class baseline as a grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = icl["tasks"]
    shots = icl["shots"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, (task, r) in zip(axes[0], tasks.items()):
        x = list(range(len(shots)))  # evenly spaced k (0 has no place on a log axis)
        for kind, style in (("accuracy", "-"), ("calibrated", "--")):
            for mode, by_k in r["curves"].get(kind, {}).items():
                ax.errorbar(x, [100 * by_k[str(k)]["mean"] for k in shots], yerr=[100 * by_k[str(k)]["se"] for k in shots],
                            marker="o", linestyle=style, capsize=3,
                            label=f"{mode}{' calibrated' if kind == 'calibrated' else ''}")
        ax.axhline(100 * r["majority"], color="grey", linewidth=1, label="majority class")
        ax.set_xticks(x, [str(k) for k in shots])
        ax.set_xlabel("demonstrations k")
        ax.set_ylabel("accuracy %")
        ax.set_title(f"{task} ({r['num_items']} items)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def evaluation_figures(results: dict[str, Any], folder: Path) -> None:
    """The evaluation folder's figures: ``by_phenomenon.png`` when minimal pairs were scored,
    ``milestones.png`` when word-milestone models were, ``icl_curve.png`` for the ``icl`` task."""
    table = phenomenon_table(results)
    if table:
        plot_by_phenomenon(table, Path(folder) / "by_phenomenon.png")
    if results.get("milestones"):
        plot_milestones(results["milestones"], Path(folder) / "milestones.png")
    if results.get("tasks", {}).get("icl", {}).get("tasks"):
        plot_icl_curve(results["tasks"]["icl"], Path(folder) / "icl_curve.png")


__all__ = ["evaluation_figures", "phenomenon_table", "plot_by_phenomenon", "plot_icl_curve", "plot_loss_curves",
           "plot_milestones"]


def plot_ratio_sweep(series: dict[str, dict[str, list[tuple[float, float, float, float]]]],
                     out_png: str | Path) -> bool:
    """The paper's ratio figure: one panel per task, score against the causal fraction, one line per
    scoring mode (mean over seeds; the band is the seeds' range). False when there is nothing to draw."""
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, sorted(series.items())):
        for line, points in sorted(lines.items()):
            x = [p[0] for p in points]
            ax.plot(x, [p[1] for p in points], marker="o", label=line)
            if any(p[2] != p[3] for p in points):
                ax.fill_between(x, [p[2] for p in points], [p[3] for p in points], alpha=0.2)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("causal fraction of the batch")
        ax.set_ylabel("accuracy" if not panel.startswith("babylm.wug") else "Spearman's rho")
        ax.set_xlim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("GPT-BERT: score against the causal:masked ratio", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True
