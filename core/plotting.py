"""Plots in jobs: matplotlib on its file-only backend (compute nodes have no display)."""
from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_figure(rows: list[dict], ylabel: str = "loss", size: tuple = (6, 3.5)):
    """The loss curve of metrics.csv's rows (every `loss` / `*_loss` column against the optimizer step): a figure
    for the caller to save and close (the run's loss.png, the report page)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=size)
    steps = [int(r["step"]) for r in rows]
    for key in [k for k in rows[0] if k == "loss" or k.endswith("_loss")]:
        ax.plot(steps, [float(r[key]) for r in rows], label=key, lw=1.5 if key == "loss" else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
