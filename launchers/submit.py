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


def study_main(args) -> int:
    """A study spec (a top-level `study:` key): every step submitted at once, chained with afterok (core/study.py)."""
    from core import study as st
    from core.run_folder import logs_dir_problem
    from core.spec import SpecError, load_cluster

    if args.resume is not None or args.fresh:
        fail(f"{args.spec}: --resume / --fresh continue one run; a study takes --resume-missing (resubmits the "
             f"steps that failed or never ran)\nnothing was submitted")
    try:
        study = st.load_study(args.spec, tuple(args.overrides))
        study.force = args.force
        profile, source = st.choose_study_cluster(study, args.cluster)
        cluster = load_cluster(profile)
        problem = logs_dir_problem(study.logs_dir, cluster.logs_roots)
        if problem:
            raise SpecError(args.spec, [("logs_dir", problem)])
        sel = st.select_steps(study, args.resume_missing)
        planned, problems = st.plan_all(study, cluster, sel.resubmit, sel.kept, sel.queued, keep_going=args.dry_run)
    except SpecError as e:
        fail(f"{e}\nnothing was submitted")
    except (FileNotFoundError, ValueError) as e:
        fail(f"{e}\nnothing was submitted")
    except Exception as e:
        unexpected("planning the study", e)
    try:
        checked = {} if args.no_preflight else st.preflight(planned, sel)
    except st.StepCheckError as e:
        unexpected(f"checking step {e.step}", e.cause)
    print(st.describe(study, planned, cluster, source, sel, checked))
    problems += [(name, f, m) for name, c in checked.items() for f, m in c.problems]
    stop = refused_or_dry(args, [(f"steps.{step}: {field_name}", message) for step, field_name, message in problems])
    if stop is not None:
        return stop
    if sel.stale:
        why = st.cancel_jobs(sel.stale)
        print(f"cancelled the queued jobs of the steps submitted again: {' '.join(sel.stale)}"
              + (f" (scancel said: {why})" if why else ""))
    study_dir = sel.study_dir or st.make_study_dir(study)
    try:
        outcome = st.submit_study(study, planned, cluster, sel.resubmit, study_dir, sel.previous, sys.stdout,
                                  prev_states=sel.states)
    except st.StudySubmitError as e:
        fail(f"{e}\nstudy record: {study_dir / st.RECORD}", 1)
    except Exception as e:
        unexpected("submitting the study", e)
    print(f"study folder: {study_dir}")
    if cluster.executor == "slurm" and not args.wait:
        print("follow it with: python launchers/status.py   (the study is one group)")
        return 0
    states = st.wait(outcome.record) if cluster.executor == "slurm" else st.step_states(outcome.record)
    for name, s in states.items():
        print(f"  {name}: {s['state']}" + (f" ({s['detail']})" if s["detail"] else ""))
    print(f"study {study.spec.study}: {st.summary_line(outcome.record, states)}")
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
    args = parse_args(argv)
    from core.study import is_study

    if is_study(args.spec):
        return study_main(args)
    from core.plan import make_plan
    from core.secrets_guard import redact
    from core.spec import SpecError, choose_cluster, load_cluster, load_spec

    if args.fresh and args.resume is None:
        fail("--fresh only makes sense with --resume (a new run starts fresh anyway)\nnothing was submitted")
    overrides = tuple(args.overrides) + (("train.fresh=true",) if args.fresh else ())
    try:
        spec, raw = load_spec(args.spec, overrides)
        profile, source = choose_cluster(args.cluster, spec.cluster)
        cluster = load_cluster(profile)
        resume_dir = None
        if args.resume is not None or args.resume_missing is not None:
            from core.run_folder import find_run

            resume_dir = find_run(spec, args.resume if args.resume is not None else args.resume_missing)
        plan = make_plan(spec, cluster, source=args.spec, force=args.force,
                         resume_dir=resume_dir if args.resume_missing is not None else None, keep_going=args.dry_run)
        plan.cluster_source = source
    except SpecError as e:
        fail(f"{e}\nnothing was submitted")
    except (FileNotFoundError, ValueError) as e:
        fail(f"{e}\nnothing was submitted")
    except Exception as e:  # a bug or an environment problem while planning: one line, never a traceback
        unexpected("planning", e)
    shape = f"{plan.steps[0].nodes} node(s) x {plan.steps[0].tasks_per_node} task(s)"
    print(f"validated {args.spec}  ({spec.name}, {shape}, {cluster.accelerator} on {cluster.name})")
    print(plan.describe())

    from core import submit as sub
    from core.preflight import check

    try:
        texts = sub.sbatch_texts(plan)
        checked = check(plan, texts) if not args.no_preflight else None
    except Exception as e:
        unexpected("rendering and checking the sbatch scripts", e)
    problems = plan.problems + (checked.problems if checked else [])
    for note in checked.notes if checked else []:
        print(f"  preflight: {note}")
    if args.dry_run:
        if not texts:
            print("dry run: local executor, no sbatch script; nothing submitted")
        for step, scripts in texts.items():
            for i, text in enumerate(scripts):
                label = f"step {step}" + (f", array chunk {i + 1}/{len(scripts)}" if len(scripts) > 1 else "")
                print(f"\n# ---- sbatch script: {label} ----\n{text}")
    stop = refused_or_dry(args, problems)
    if stop is not None:
        return stop

    if resume_dir is not None:
        print(f"resuming in {resume_dir}")
    try:
        submission = sub.submit(plan, raw, args.spec, resume_dir)
    except Exception as e:  # submitit raises FailedJobError/RuntimeError with sbatch's own message
        fail(f"submission failed: {redact(str(e), 500)}", 1)
    for rec in submission.record["steps"]:
        if rec.get("skipped"):
            print(f"skipped {rec['name']}: {rec['skipped']}")
            continue
        ids = ",".join(rec["job_ids"])
        kind = f"array of {rec['n_tasks']}" if "chunks" in rec else "job"
        dep = f" (afterok:{':'.join(rec['dependency'])})" if rec["dependency"] else ""
        print(f"submitted {rec['name']}: {kind} {ids}{dep}")
    print(f"run folder: {submission.run_dir}")
    if cluster.executor == "local" or args.wait:
        return sub.report_results(submission)
    return 0


if __name__ == "__main__":
    sys.exit(main())
