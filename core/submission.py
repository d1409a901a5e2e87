"""The one submission service behind `launchers/submit.py` (and anything else that submits): a job spec or a study
spec -> validated, planned, rendered and checked against the cluster -> submitted. Each stage is one call, so a
front end prints between them (the plan before the scripts, the scripts before the refusal) and decides nothing
itself. Expected refusals are SpecError / FileNotFoundError / ValueError (one line for a person); anything else
comes wrapped in StageError naming the stage it broke in."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core import scheduler


class StageError(RuntimeError):
    """An error nobody planned for, in a named stage ("planning", "rendering and checking the sbatch scripts")."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {cause}")
        self.stage, self.cause = stage, cause


@dataclass
class Request:
    spec_file: str
    cluster: Optional[str] = None          # --cluster: a profile name or path
    overrides: tuple[str, ...] = ()
    dry_run: bool = False
    force: bool = False
    resume: Optional[str] = None           # "" = the newest run of the spec
    resume_missing: Optional[str] = None
    fresh: bool = False
    preflight: bool = True


@dataclass
class PlannedJob:
    request: Request
    spec: Any
    raw: dict
    cluster: Any
    source: str
    plan: Any
    resume_dir: Optional[Path]
    texts: dict[str, list[str]] = field(default_factory=dict)
    checked: Any = None                    # the scheduler's Preflight, None when skipped

    @property
    def scheduler(self) -> scheduler.Scheduler:
        return scheduler.for_cluster(self.cluster)

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self.plan.problems + (self.checked.problems if self.checked else [])


def _staged(stage: str, fn, *args, **kwargs):
    from core.config import SpecError

    try:
        return fn(*args, **kwargs)
    except (SpecError, FileNotFoundError, ValueError):
        raise
    except Exception as e:
        raise StageError(stage, e) from e


def plan_job(req: Request) -> PlannedJob:
    """Validate the spec, choose and load the profile, find the run to resume, plan (a dry run plans past the
    workload's own refusals so the whole plan still prints)."""
    def plan() -> PlannedJob:
        from core.config import choose_cluster, load_cluster, load_spec
        from core.plan import make_plan

        overrides = tuple(req.overrides) + (("train.fresh=true",) if req.fresh else ())
        spec, raw = load_spec(req.spec_file, overrides)
        profile, source = choose_cluster(req.cluster, spec.cluster)
        cluster = load_cluster(profile)
        resume_dir = None
        if req.resume is not None or req.resume_missing is not None:
            from core.run_folder import find_run

            resume_dir = find_run(spec, req.resume if req.resume is not None else req.resume_missing)
        made = make_plan(spec, cluster, source=req.spec_file, force=req.force,
                         resume_dir=resume_dir if req.resume_missing is not None else None, keep_going=req.dry_run)
        made.cluster_source = source
        return PlannedJob(req, spec, raw, cluster, source, made, resume_dir)

    return _staged("planning", plan)


def check_job(job: PlannedJob) -> PlannedJob:
    """Render the job scripts and (unless skipped) run the scheduler's preflight on them."""
    def check() -> PlannedJob:
        job.texts = job.scheduler.render(job.plan)
        job.checked = job.scheduler.preflight(job.plan, job.texts) if job.request.preflight else None
        return job

    return _staged("rendering and checking the sbatch scripts", check)


def submit_job(job: PlannedJob):
    """Submit every step of the plan (core.submit); the Submission with the run folder and the jobs. A plan of
    several steps on a scheduler that holds is all or nothing: every job is submitted held and released once all
    are queued; when a later step's submission fails the held jobs are cancelled, so nothing half-submitted runs."""
    from core import submit as sub

    sched = job.scheduler
    if not sched.holds or len(job.plan.steps) < 2:
        return sub.submit(job.plan, job.raw, job.request.spec_file, job.resume_dir)
    with sched.held() as held:
        try:
            submission = sub.submit(job.plan, job.raw, job.request.spec_file, job.resume_dir)
        except BaseException as e:
            why = sched.cancel_quietly(list(held)) if held else ""
            if held:
                e.args = (f"{e.args[0] if e.args else e}; the jobs already submitted (held) "
                          + (f"were cancelled: {' '.join(held)}" if not why else
                             f"could NOT be cancelled ({why}): cancel them with python launchers/cancel.py "
                             f"{' '.join(held)}"),) + e.args[1:]
            raise
    why = sched.release_or_cancel(list(held))
    if why:
        raise RuntimeError(why)
    return submission


# ---------------------------------------------------------------- studies
@dataclass
class PlannedStudy:
    request: Request
    study: Any
    cluster: Any
    source: str
    selection: Any
    planned: dict
    problems: list[tuple[str, str, str]]   # (step, field, message)
    checked: dict = field(default_factory=dict)

    @property
    def scheduler(self) -> scheduler.Scheduler:
        return scheduler.for_cluster(self.cluster)

    def describe(self) -> str:
        from core import study as st

        return st.describe(self.study, self.planned, self.cluster, self.source, self.selection, self.checked)

    @property
    def all_problems(self) -> list[tuple[str, str]]:
        found = self.problems + [(name, f, m) for name, c in self.checked.items() for f, m in c.problems]
        return [(f"steps.{step}: {field_name}", message) for step, field_name, message in found]


def plan_study(req: Request) -> PlannedStudy:
    """Load the study spec, choose its profile, select what to (re)submit, plan every step."""
    def plan() -> PlannedStudy:
        from core import study as st
        from core.config import SpecError, load_cluster
        from core.run_folder import logs_dir_problem

        study = st.load_study(req.spec_file, tuple(req.overrides))
        study.force = req.force
        profile, source = st.choose_study_cluster(study, req.cluster)
        cluster = load_cluster(profile)
        problem = logs_dir_problem(study.logs_dir, cluster.logs_roots)
        if problem:
            raise SpecError(req.spec_file, [("logs_dir", problem)])
        sel = st.select_steps(study, req.resume_missing)
        planned, problems = st.plan_all(study, cluster, sel.resubmit, sel.kept, sel.queued, keep_going=req.dry_run)
        return PlannedStudy(req, study, cluster, source, sel, planned, problems)

    return _staged("planning the study", plan)


def check_study(planned: PlannedStudy) -> PlannedStudy:
    """The scheduler's preflight of every step to submit (unless skipped)."""
    from core import study as st

    if planned.request.preflight:
        try:
            planned.checked = st.preflight(planned.planned, planned.selection)
        except st.StepCheckError as e:
            raise StageError(f"checking step {e.step}", e.cause) from e
    return planned


def cancel_stale(planned: PlannedStudy) -> tuple[list[str], Optional[str]]:
    """Cancel the queued jobs of steps submitted again: (their ids, why not when the scheduler refused)."""
    from core import study as st

    stale = list(planned.selection.stale)
    return stale, (st.cancel_jobs(stale, planned.cluster) if stale else None)


def study_folder(planned: PlannedStudy) -> Path:
    """The study's folder: the one being resumed, or a new one (logs/<study>/<time>/)."""
    from core import study as st

    return planned.selection.study_dir or st.make_study_dir(planned.study)


def submit_study(planned: PlannedStudy, study_dir: Path, out):
    """Submit the selected steps in order (core.study); the outcome. StudySubmitError when a step's submission
    fails (what was queued before it is cancelled)."""
    from core import study as st

    sel = planned.selection
    return st.submit_study(planned.study, planned.planned, planned.cluster, sel.resubmit, study_dir, sel.previous,
                           out, prev_states=sel.states)


def study_states(planned: PlannedStudy, outcome, wait: bool, out=None) -> dict[str, dict]:
    """Each step's state: waited for on a scheduler with a queue (wait=True; with `out`, a line per step that
    starts or ends), read off the record without one."""
    from core import study as st

    if not (planned.scheduler.has_queue and wait):
        return st.step_states(outcome.record)
    states = st.wait(outcome.record, out=out)
    if out is not None:
        line = st.device_hours_line(outcome.record)
        if line:
            out.write(line + "\n")
    return states


def follow_job(job: PlannedJob, submission, out, poll_s: float = 5.0) -> None:
    """--wait on a scheduler with a queue: a line per step that starts or ends (the scheduler's states of its
    jobs, one query per round) until every job of the submission has ended."""
    from core.monitor import follow

    from core import retry
    from core.results.progress import RunProgress

    steps = {rec["name"]: list(rec.get("job_ids") or []) for rec in submission.record["steps"] if rec.get("job_ids")}
    policy, handled = retry.policy_of(job.cluster), set()
    train = job.spec.train
    progress = RunProgress(submission.run_dir, train.steps if train is not None else None)
    while True:  # ends: every retry is bounded (retry.max_retries) and loop-guarded (core.retry)
        follow(job.scheduler, steps, out, poll_s, progress=progress.lines)
        try:
            rows = job.scheduler.accounting([j for ids in steps.values() for j in ids])
        except scheduler.SchedulerUnavailable:
            return
        if failed_and_decided(job, submission, steps, rows, policy, handled, out):
            continue
        if "merge" in handled or not merge_back(job, submission, steps, rows, out):
            break
        handled.add("merge")  # brought back once: follow the new merge to its end
    from core import device_hours

    try:
        rows = job.scheduler.accounting([j for ids in steps.values() for j in ids])
    except scheduler.SchedulerUnavailable:
        return
    used = device_hours.describe(device_hours.usage(rows, str(submission.run_dir)))
    if used:
        out.write(f"device-hours: {used}\n")


SHOWN_FAILURES = 20  # failed tasks --wait prints per round (all are decided and recorded)


def failed_and_decided(job: PlannedJob, submission, steps: dict[str, list[str]], rows, policy: dict, handled: set,
                       out) -> bool:
    """--wait, once every job has ended: each failed task's class and cause (core.failures), then the profile's
    retry policy decided, acted on and recorded (core.retry). True when something was retried (follow again)."""
    import time

    from core import monitor, retry

    retried, shown = False, 0
    step_of = {j: name for name, ids in steps.items() for j in ids}
    first_index = {c["job_id"]: c["tasks"][0] for rec in submission.record["steps"] for c in rec.get("chunks") or []}
    for row in rows:
        for task in monitor.failed_tasks(row):
            tries = sum(1 for a in row.attempts if a.task_id == task)
            if (task, tries) in handled:
                continue
            handled.add((task, tries))
            failure = monitor.task_failure(row, task)
            name = step_of.get(row.job_id, "?")
            index = first_index.get(row.job_id, 0) + int(task.split("_")[1]) if "_" in task else None
            began = max((a.start for a in row.attempts if a.task_id == task), default=0.0)
            own = [d for d in retry.decisions(Path(submission.run_dir), retry.unit(name, index))
                   if d.get("job_id") == task and d.get("by") == "task" and d.get("at", 0) >= began - 1]
            if own:  # the task decided for itself (retry.in_task): shown, not decided twice
                decision = {**own[-1], "why": f"decided in the task: {own[-1]['why']}"}
            else:
                resubmit = None if row.is_array else _resubmitter(job, submission, steps, name)
                decision = retry.apply(job.scheduler, Path(submission.run_dir), retry.unit(name, index), task,
                                       failure, policy, by="wait", resubmit=resubmit)
            retried = retried or decision["action"] != "stop"
            shown += 1
            if shown > SHOWN_FAILURES:  # a big array failing at once: every decision is recorded, 20 are printed
                continue
            out.write(f"{time.strftime('%H:%M:%S')} step {name}: task {task} {row.states[task].split()[0]}: "
                      f"{failure.line()}\n         -> {decision['action']} ({decision['why']}"
                      + (f"; {decision['detail']}" if decision["detail"] else "") + ")\n")
            out.flush()
    if shown > SHOWN_FAILURES:
        out.write(f"         ... and {shown - SHOWN_FAILURES} more failed tasks: each class and decision is in "
                  f"{Path(submission.run_dir) / retry.FOLDER} (python launchers/status.py --json)\n")
    return retried


def _resubmitter(job: PlannedJob, submission, steps: dict[str, list[str]], step: str):
    """For the policy's `resubmit`: submit the spec again in the same run folder (`--resume`: every step, from the
    newest complete checkpoint); the new jobs replace the old ones in `steps`. Returns a callable -> (ok, what)."""
    def resubmit() -> tuple[bool, str]:
        ok, new = submit_again(job, submission.run_dir)
        if not ok:
            return False, new
        for rec in new.record["steps"]:
            if rec.get("job_ids"):
                steps[rec["name"]] = list(rec["job_ids"])
        return True, "resubmitted with --resume (from the newest complete checkpoint, if any) as job(s) " + ", ".join(
            j for rec in new.record["steps"] for j in rec.get("job_ids") or [])

    return resubmit


def submit_again(job: PlannedJob, run_dir: Path, only: Optional[str] = None):
    """Plan the spec again and submit it into its existing run folder, the way `--resume` and `--resume-missing`
    do (plan_job with the run folder, then submit_job: run.json keeps every submission in `submissions`). With
    `only`, that one step of the plan alone, with nothing to wait for (the merge brought back by --wait). Returns
    (True, the Submission) or (False, the planner's or the scheduler's own words)."""
    from dataclasses import replace

    try:
        again = plan_job(replace(job.request, resume=str(run_dir), resume_missing=None, fresh=False, dry_run=False,
                                 preflight=False))
        if again.problems:
            return False, "; ".join(f"{f}: {m}" for f, m in again.problems)[:300]
        if only is not None:
            again.plan.steps = [replace(st, after=[]) for st in again.plan.steps if st.name == only]
            if not again.plan.steps:
                return False, f"the plan has no step {only}"
        return True, submit_job(again)
    except Exception as e:  # the scheduler's or the planner's own words, recorded with the decision
        return False, " ".join(str(e).split())[:300]


def merge_pending_back(steps: dict[str, list[str]], rows, n_tasks: int, retried: bool) -> Optional[str]:
    """The merge job Slurm cancelled that --wait should submit again, or None: only when a task of the array was
    retried (so the merge's afterok failed on a failure that is gone), every one of the array's `n_tasks` tasks
    has now completed, and every merge job ended without starting, cancelled for its dependency."""
    from core import monitor

    if not retried or not steps.get("merge") or not steps.get("main"):
        return None
    main = [r for r in rows if r.job_id in steps["main"]]
    states = [s for r in main for s in r.states.values()]
    if len(states) < n_tasks or any(scheduler.category(s) != "done" for s in states):
        return None
    merges = [r for r in rows if r.job_id in steps["merge"]]
    if not merges:
        return None
    for row in merges:
        for task in row.states:
            if scheduler.category(row.states[task]) != "failed" or monitor.task_failure(row, task).klass != "dependency":
                return None
    return merges[0].job_id


def merge_back(job: PlannedJob, submission, steps: dict[str, list[str]], rows, out) -> bool:
    """--wait, once nothing more is retried: when the array's retried tasks have all completed but Slurm already
    cancelled the merge (its afterok could not be met when a task failed), submit the merge again into the run
    folder (`submit_again`, the --resume-missing way), record it (run.json's submissions, and a decision for unit
    `merge` in retries/), say it, and follow it. True when a merge was submitted."""
    import time

    from core import retry
    from core.failures import Failure

    run_dir = Path(submission.run_dir)
    main = next((r for r in submission.record["steps"] if r.get("name") == "main"), {})
    retried = any(d.get("action") in ("requeue", "resubmit") and str(d.get("task", "")).startswith("main[")
                  for d in retry.decisions(run_dir))
    old = merge_pending_back(steps, rows, int(main.get("n_tasks") or 0), retried)
    if old is None:
        return False
    failure = Failure("dependency", f"merge {old} was cancelled: its afterok failed before the array's retried "
                                    f"tasks completed", "scheduler")
    entry = retry.record(run_dir, "merge", failure, "resubmit", "the array's retried tasks all completed: the merge "
                         "is submitted again (as --resume-missing would)", None, by="wait",
                         detail="asked the scheduler", job_id=old)
    ok, new = submit_again(job, run_dir, only="merge")
    if not ok:
        retry.amend(entry, action="stop", detail="", why=f"submitting the merge again failed: {new}")
        out.write(f"{time.strftime('%H:%M:%S')} step merge: could not be brought back ({new}); finish with "
                  f"python launchers/submit.py {job.request.spec_file} --resume-missing {run_dir}\n")
        return False
    ids = [j for rec in new.record["steps"] for j in rec.get("job_ids") or []]
    retry.amend(entry, detail="merge submitted again as job(s) " + ", ".join(ids))
    steps["merge"] = ids
    submission.jobs["merge"] = new.jobs.get("merge", [])
    out.write(f"{time.strftime('%H:%M:%S')} step merge: brought back as job {', '.join(ids)} (the array's retried "
              f"tasks all completed; Slurm had cancelled merge {old}: its afterok could not be met)\n")
    out.flush()
    return True


def study_failures(planned: PlannedStudy, outcome, states: dict[str, dict]) -> dict[str, str]:
    """--wait of a study: each failed step's first failed task with its class and cause (core.failures), from one
    accounting call over the failed steps' jobs; empty without a queue or when the scheduler does not answer."""
    from core import monitor

    failed = {n: outcome.record["steps"][n] for n, s in states.items() if s["state"] == "failed"
              and outcome.record["steps"].get(n, {}).get("job_ids")}
    if not failed or not planned.scheduler.has_queue:
        return {}
    try:
        rows = planned.scheduler.accounting([j for st in failed.values() for j in st["job_ids"]])
    except scheduler.SchedulerUnavailable:
        return {}
    out = {}
    for name, st in failed.items():
        line = monitor.run_error([r for r in rows if r.job_id in st["job_ids"]])
        if line:
            out[name] = line
    return out
