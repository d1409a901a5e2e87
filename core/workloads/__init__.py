"""Workloads: the registry and the contract every workload module fulfils.

Add a workload (see core/workloads/README.md for the walk-through):
  core/workloads/<name>.py   its spec section (a pydantic model), its torch-free planner, run / merge, and a
                             module-level `WORKLOAD = Workload(...)` saying which of those it has
  core/models/<name>.py      its model code, if any       core/data/<name>.py   its data reader, if any
  jobs/<name>.yaml, jobs/tiny/<name>.yaml                 the full-size and the tiny spec
  one line in WORKLOADS of core/registry.py
Nothing outside core/workloads/ imports a workload module: the spec, the plan and the task entry reach a
workload through `get(name)`. Workload modules import torch only inside functions, so validating and planning a
spec stays torch-free.
"""
from __future__ import annotations

# The registry itself lives on the ground floor (core/registry.py); the names stay importable from here.
from core.registry import WORKLOADS, Shape, Workload, get, sections, step_names  # noqa: F401
