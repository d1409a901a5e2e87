"""One step of a job spec run by hand, without submitit: what the plain sbatch scripts in slurm/ call.

  srun python -m core.task SPEC --step main --run-dir logs/<name>/manual [-c PROFILE] [--set KEY=VALUE ...]

Every rank of every task runs the same code path as a submitit task (core.runtime.TaskEntry): the spec is validated
and planned exactly as `launchers/submit.py` would, the step's items come from the plan (an array task takes the
items of the array task the scheduler started), and results land in the run folder. Errors are one line and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.task", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec")
    p.add_argument("--step", default="main", help="a step of the plan: main, merge, baseline, ... (default main)")
    p.add_argument("--run-dir", default=None, help="run folder shared by the steps (default logs/<name>/sbatch)")
    p.add_argument("--cluster", "-c", default=None, help="profile (default: as launchers/submit.py chooses)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from core import run_folder, scheduler
    from core.plan import make_plan
    from core.runtime import TaskEntry
    from core.config import SpecError, choose_cluster, load_cluster, load_spec

    try:
        spec, raw = load_spec(args.spec, tuple(args.overrides))
        cluster = load_cluster(choose_cluster(args.cluster, spec.cluster)[0])
        plan = make_plan(spec, cluster, source=args.spec, limits={})
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = {s.name: s for s in plan.steps}
    if args.step not in steps:
        print(f"error: --step {args.step}: the plan of {args.spec} has the steps {', '.join(steps)}", file=sys.stderr)
        return 2
    step = steps[args.step]
    run_dir = Path(args.run_dir) if args.run_dir else run_folder.logs_root(spec) / "sbatch"
    inside_logs = run_folder.LOGS.resolve() in run_dir.resolve().parents
    problem = None if inside_logs else run_folder.logs_dir_problem(str(run_dir.resolve().parent), cluster.logs_roots)
    if problem:
        print(f"error: --run-dir {run_dir}: {problem}", file=sys.stderr)
        return 2
    task_index, items = None, None
    if step.is_array:
        index = scheduler.array_index()
        if index is None or not index.isdigit() or int(index) >= step.n_tasks:
            print(f"error: step {step.name} is an array of {step.n_tasks} tasks: submit it as an array job, e.g. "
                  f"sbatch --array=0-{step.n_tasks - 1} (array index {index!r})", file=sys.stderr)
            return 2
        task_index, items = int(index), step.task_items[int(index)]
    cluster_data = cluster.model_dump()
    sched = scheduler.in_task()
    if sched is not None:  # inside a scheduler's job, whatever the profile's usual executor
        cluster_data["executor"] = sched.name
    entry = TaskEntry(spec_data=raw, cluster_data=cluster_data, workload=spec.workload, entry=step.entry,
                      step=step.name, run_dir_template=str(run_dir.resolve()))
    entry(task_index, items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
