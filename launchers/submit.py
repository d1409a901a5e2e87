#!/usr/bin/env python
"""Validate a job spec, plan it on a cluster profile and submit it with submitit.

  python launchers/submit.py jobs/tiny/smoke.yaml                                  # local executor (default)
  python launchers/submit.py jobs/tiny/smoke.yaml --cluster cluster_configs/local_slurm.yaml
  python launchers/submit.py jobs/tiny/smoke.yaml --dry-run    # plan + exact sbatch text, submits nothing
  python launchers/submit.py jobs/tiny/smoke.yaml --set resources.nodes=2 --set name=try2
  python launchers/submit.py jobs/tiny/pangu_pruning_study.yaml -c local_slurm --wait   # a study: every step
  python launchers/submit.py jobs/tiny/pangu_pruning_study.yaml -c local_slurm --resume-missing  # what failed
"""
from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import fail, unexpected
from core.gc_pause import settle, start_up


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="job spec YAML (jobs/...), or a study spec (a top-level study: key) whose steps are "
                                "submitted at once, chained with afterok")
    p.add_argument("--cluster", "-c", default=None,
                   help="cluster profile: a name in cluster_configs/ or a YAML path (default: the spec's cluster:, "
                        "then $MEDHPC_CLUSTER, then cluster_configs/default.yaml, then local)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set resources.nodes=2 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the sbatch script(s); submit nothing")
    p.add_argument("--force", action="store_true", help="submit even when the memory estimate does not fit")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="run again in an existing run folder (default: the newest run of this spec) and continue "
                        "from its newest complete checkpoint")
    p.add_argument("--resume-missing", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="array workloads (sensitivity scan): submit only the items of a run that have no result, "
                        "plus a new merge (default run: the newest of this spec)")
    p.add_argument("--fresh", action="store_true",
                   help="with --resume: move the run's checkpoints aside and start over (never implicit)")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the checks against the cluster's partitions, nodes and accounts (sbatch still checks)")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and print their results (always on locally)")
    return p.parse_args(argv)


def refused_or_dry(args, problems: list[tuple[str, str]]) -> int | None:
    """Exit code when the submission stops here: 2 with every problem a submit would be refused for (after a dry
    run's plan and scripts, a blank line first), 0 for a clean dry run; None to go on and submit."""
    if problems:
        print(f"{chr(10) if args.dry_run else ''}error: {args.spec}: a submission would be refused:", file=sys.stderr)
        for field_name, message in problems:
            print(f"  {field_name}: {message}", file=sys.stderr)
        print("nothing was submitted", file=sys.stderr)
        return 2
    if args.dry_run:
        print("dry run: nothing submitted")
        return 0
    return None


def request(args):
    from core.submission import Request

    return Request(args.spec, args.cluster, tuple(args.overrides), dry_run=args.dry_run, force=args.force,
                   resume=args.resume, resume_missing=args.resume_missing, fresh=args.fresh,
                   preflight=not args.no_preflight)


def stage(fn, *a):
    """One stage of core.submission: a refusal is one line and exit 2, anything else one line naming the stage."""
    from core.config import SpecError
    from core.submission import StageError

    try:
        return fn(*a)
    except (SpecError, FileNotFoundError, ValueError) as e:
        fail(f"{e}\nnothing was submitted")
    except StageError as e:
        unexpected(e.stage, e.cause)


def study_main(args) -> int:
    """A study spec (a top-level `study:` key): every step submitted at once, chained with afterok (core/study/)."""
    from core import study as st
    from core import submission as service

    if args.resume is not None or args.fresh:
        fail(f"{args.spec}: --resume / --fresh continue one run; a study takes --resume-missing (resubmits the "
             f"steps that failed or never ran)\nnothing was submitted")
    planned = stage(service.plan_study, request(args))
    stage(service.check_study, planned)
    print(planned.describe())
    stop = refused_or_dry(args, planned.all_problems)
    if stop is not None:
        return stop
    stale, why = service.cancel_stale(planned)
    if stale:
        print(f"cancelled the queued jobs of the steps submitted again: {' '.join(stale)}"
              + (f" (the scheduler said: {why})" if why else ""))
    study_dir = service.study_folder(planned)
    if not planned.scheduler.has_queue:
        settle()   # without a queue the steps run to their end inside the submission: the collector runs again
    try:
        outcome = service.submit_study(planned, study_dir, sys.stdout)
    except st.StudySubmitError as e:
        fail(f"{e}\nstudy record: {study_dir / st.RECORD}", 1)
    except Exception as e:
        unexpected("submitting the study", e)
    print(f"study folder: {study_dir}")
    settle()
    if planned.scheduler.has_queue and not args.wait:
        print("follow it with: python launchers/status.py   (the study is one group)")
        return 0
    states = service.study_states(planned, outcome, wait=True, out=sys.stdout)
    for name, s in states.items():
        print(f"  {name}: {s['state']}" + (f" ({s['detail']})" if s["detail"] else ""))
    for name, why in service.study_failures(planned, outcome, states).items():  # class and cause (core.failures)
        print(f"  {name} failed: {why}")
    print(f"study {planned.study.spec.study}: {st.summary_line(outcome.record, states)}")
    if all(s["state"] in ("done", "existing") for s in states.values()):
        table = st.final_table(outcome.record)
        if table is not None:
            print(f"final table: {table} (and {table.with_suffix('.csv').name} beside it)\n")
            print(table.read_text())
        return 0
    print(f"finish it with: python launchers/submit.py {args.spec} --resume-missing {study_dir}"
          + (f" {' '.join(a for o in args.overrides for a in ('--set', o))}" if args.overrides else ""))
    return 1


def main(argv=None) -> int:
    start_up()   # the imports, the spec's validation and the plan run without the cyclic collector
    try:
        return submit_main(argv)
    finally:
        settle()


def submit_main(argv=None) -> int:
    args = parse_args(argv)
    from core.study import is_study

    if is_study(args.spec):
        return study_main(args)
    from core import submission as service
    from core.secrets_guard import redact

    if args.fresh and args.resume is None:
        fail("--fresh only makes sense with --resume (a new run starts fresh anyway)\nnothing was submitted")
    job = stage(service.plan_job, request(args))
    plan, spec, cluster = job.plan, job.spec, job.cluster
    shape = f"{plan.steps[0].nodes} node(s) x {plan.steps[0].tasks_per_node} task(s)"
    print(f"validated {args.spec}  ({spec.name}, {shape}, {cluster.accelerator} on {cluster.name})")
    print(plan.describe())
    stage(service.check_job, job)
    for note in job.checked.notes if job.checked else []:
        print(f"  preflight: {note}")
    if args.dry_run:
        if not job.texts:
            print(f"dry run: {cluster.executor} executor, no sbatch script; nothing submitted")
        for step, scripts in job.texts.items():
            for i, text in enumerate(scripts):
                label = f"step {step}" + (f", array chunk {i + 1}/{len(scripts)}" if len(scripts) > 1 else "")
                print(f"\n# ---- sbatch script: {label} ----\n{text}")
    stop = refused_or_dry(args, job.problems)
    if stop is not None:
        return stop

    if job.resume_dir is not None:
        print(f"resuming in {job.resume_dir}")
    if not job.scheduler.has_queue:
        settle()   # without a queue the steps run to their end inside the submission: the collector runs again
    try:
        submission = service.submit_job(job)
    except Exception as e:  # the scheduler's own message (sbatch's, through submitit)
        fail(f"submission failed: {redact(str(e), 500)}", 1)
    settle()   # what follows may run for hours (--wait, following a local run): the collector runs again
    for rec in submission.record["steps"]:
        if rec.get("skipped"):
            print(f"skipped {rec['name']}: {rec['skipped']}")
            continue
        ids = ",".join(rec["job_ids"])
        kind = f"array of {rec['n_tasks']}" if "chunks" in rec else "job"
        dep = f" (afterok:{':'.join(rec['dependency'])})" if rec["dependency"] else ""
        print(f"submitted {rec['name']}: {kind} {ids}{dep}")
    print(f"run folder: {submission.run_dir}")
    if not job.scheduler.has_queue or args.wait:
        from core.results.summary import report_results

        if job.scheduler.has_queue:  # a line per step that starts or ends, instead of silence until the end
            service.follow_job(job, submission, sys.stdout)
        elif spec.train is not None and submission.jobs:  # the local executor trains in a child process
            from core.results.progress import follow_training

            jobs = submission.jobs.get("main") or list(submission.jobs.values())[-1]   # the step that trains
            follow_training(submission.run_dir, jobs, sys.stdout, total_steps=spec.train.steps)

        return report_results(submission)
    return 0


if __name__ == "__main__":
    sys.exit(main())
