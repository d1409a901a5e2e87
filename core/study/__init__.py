"""A study: several job specs submitted at once as one graph of Slurm jobs chained with `afterok`.

A study spec (e.g. jobs/pangu_pruning_study.yaml) names steps; each step is a job spec plus `--set`-style overrides
(`set:`) and the steps it waits for (`after:`), or an existing run folder (`run:`) that is used as it is. An
override may name an earlier step's run folder as `${step:NAME}` (e.g. `prune.sensitivity_csv=${step:scan}/
sensitivity.csv`): the run folder is logs/<name>/<first job id>, known as soon as that step is submitted, so the
later steps find their inputs through the run record, never through `latest`. A `${step:NAME}` reference is also
an `after:`.

Before anything is submitted every step's spec is loaded (core.config.load_spec, the usual validation) and planned
(core.plan.make_plan) with the earlier steps' run folders *promised* (core.run_folder.promises): a planner accepts a
path inside one of them instead of insisting it exists now. Then the steps are submitted in order, each with the
job ids of the steps it waits for; a failure half-way cancels what this submission already queued and says so.

The study folder `<logs_dir>/<study>/<id>/study.json` lists each step's run folder and job ids; each step's
run.json names the study (`study`, `study_name`, `study_step`), which is how status.py shows the study as one
group and cancel.py cancels a study by its name. `--resume-missing` reads study.json: steps whose jobs all
completed (or are still queued) keep their runs; failed, cancelled, lost (jobs neither queued nor accounted)
and never-run steps, and every step after them, are submitted again, waiting only for the steps still queued.
"""
# The names below load their submodule on first use (PEP 562): a submission of a plain job spec asks only
# `is_study` and should not build the study's planner and submitter on every launch.
_SUBMODULE = {
    **dict.fromkeys(("PlannedStep", "StepCheckError", "describe", "inference_memory", "plan_all", "plan_step",
                     "preflight"), "plan"),
    **dict.fromkeys(("STEP_NAME", "STEP_REF", "Step", "Study", "StudySpec", "StudyStep", "choose_study_cluster",
                     "is_study", "load_study"), "spec"),
    **dict.fromkeys(("FAILED_STATES", "RECORD", "REDO_STATES", "Selection", "device_hours_line", "final_table",
                     "find_study", "read_record", "select_steps", "step_states", "study_root", "summary_line",
                     "wait"), "state"),
    **dict.fromkeys(("Outcome", "StudySubmitError", "cancel_jobs", "make_study_dir", "submit_study"), "submit"),
}

__all__ = sorted(_SUBMODULE)


def __getattr__(name: str):
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULE))
