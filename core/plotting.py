"""Plots in jobs: matplotlib on its file-only backend (compute nodes have no display)."""
from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
