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
from core.study.plan import (PlannedStep, StepCheckError, describe, inference_memory, plan_all, plan_step,
                             preflight)
from core.study.spec import (STEP_NAME, STEP_REF, Step, Study, StudySpec, StudyStep, choose_study_cluster, is_study,
                             load_study)
from core.study.state import (FAILED_STATES, RECORD, REDO_STATES, Selection, device_hours_line, final_table,
                              find_study, read_record, select_steps, step_states, study_root, summary_line, wait)
from core.study.submit import Outcome, StudySubmitError, cancel_jobs, make_study_dir, submit_study

__all__ = [
    "FAILED_STATES", "RECORD", "REDO_STATES", "STEP_NAME", "STEP_REF", "Outcome", "PlannedStep", "Selection",
    "Step", "StepCheckError", "Study", "StudySpec", "StudyStep", "StudySubmitError", "cancel_jobs", "device_hours_line",
    "choose_study_cluster", "describe", "final_table", "find_study", "inference_memory", "is_study", "load_study",
    "make_study_dir", "plan_all", "plan_step", "preflight", "read_record", "select_steps", "step_states",
    "study_root", "submit_study", "summary_line", "wait",
]
