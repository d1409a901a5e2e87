"""The pruning study as one submission (core/study/): the tiny study end to end through the real local Slurm
from one command, its final table against the steps submitted one by one, a failure mid-study and
--resume-missing, the full-size dry run, and bad study specs refused before anything is submitted."""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest

from conftest import cli, job_mark, new_jobs, record, run_folder

STUDY = "jobs/tiny/pangu_pruning_study.yaml"
FULL = "jobs/pangu_pruning_study.yaml"
WAIT = 2400  # generous: 2 cores shared with other tests; no assert depends on speed


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_pangu, tiny_chexbert):
    from core.data.ctrg import write_synthetic

    root = tmp_path_factory.mktemp("study")
    data = write_synthetic(root / "ctrg", n_test=4)
    return {"root": root, "logs": root / "logs", "model": tiny_pangu, **data, "chexbert": tiny_chexbert}


def common_sets(work) -> list[str]:
    """Every step on the test's own tiny model and logs folder; Dia-Pangu on the test's data (stage 2 as the study
    spec sets it, 60 steps: fewer would not learn the findings' text the table's dia_* columns score)."""
    sets = [f"model.path={work['model']}", "model.make_tiny=false", f"outputs.logs_dir={work['logs']}",
            f"dia:data.path={work['data_dir']}", f"dia:data.annotation={work['annotation']}",
            f"dia:data.labels_csv={work['labels_csv']}", "dia:data.make_synthetic=false",
            f"dia:dia.chexbert={work['chexbert']}", "dia:dia.eval_limit=4", "tracking.mlflow=true"]
    return [x for s in sets for x in ("--set", s)]


def study_dir_of(stdout: str) -> Path:
    m = re.search(r"^study folder: (.+)$", stdout, re.M)
    assert m, stdout
    return Path(m.group(1))


def study_record(study_dir: Path) -> dict:
    return json.loads((study_dir / "study.json").read_text())


@pytest.fixture(scope="module")
def tiny_study(slurm, work):
    """ONE submit.py call for the whole tiny study, waited for (shared by the tests below)."""
    res = cli("submit", STUDY, "-c", "local_slurm", "--wait", *common_sets(work), timeout=WAIT)
    assert res.returncode == 0, res.stdout + res.stderr
    study_dir = study_dir_of(res.stdout)
    return study_dir, study_record(study_dir), res.stdout


def test_tiny_study_is_one_submission_and_its_table_equals_the_steps_one_by_one(tiny_study, work):
    study_dir, rec, out = tiny_study
    steps = rec["steps"]
    assert list(steps) == ["dia", "scan", "prune", "table"] or set(steps) == {"dia", "scan", "prune", "table"}
    for name in steps:  # every step's run names the study; its jobs carry afterok on the earlier steps' jobs
        run = record(Path(steps[name]["run_dir"]))
        assert run["study"] == str(study_dir) and run["study_step"] == name and run["study_name"] == rec["study"]
    assert set(steps["prune"]["dependency"]) == set(steps["scan"]["job_ids"]) | set(steps["dia"]["job_ids"])
    assert set(steps["table"]["dependency"]) == set(steps["scan"]["job_ids"]) | set(steps["prune"]["job_ids"])
    assert steps["dia"]["dependency"] == [] and steps["scan"]["dependency"] == []
    prune_spec = record(Path(steps["prune"]["run_dir"]))["spec"]["prune"]  # through the run record, never latest
    assert prune_spec["sensitivity_csv"] == f"{steps['scan']['run_dir']}/sensitivity.csv"
    assert prune_spec["dia_run"] == steps["dia"]["run_dir"] and "latest" not in json.dumps(prune_spec)
    table_dir = Path(steps["table"]["run_dir"])
    study_csv = (table_dir / "study_table.csv").read_text()
    assert "final table:" in out and (table_dir / "study_table.md").read_text() in out
    header = study_csv.splitlines()[0].split(",")
    assert header[:5] == ["ratio", "layers", "removed", "removed_score_sum", "removed_score_max"]
    assert {"perplexity", "logprob_distance", "dia_BLEU-4", "dia_head_micro_f1"} <= set(header)
    assert len(study_csv.splitlines()) == 1 + 3  # unpruned + the tiny spec's two ratios
    # the visible effect: the stage-2 Dia-Pangu writes the findings' text on the unpruned LLM (the study spec's 60
    # steps at lr 0.006: BLEU-4 ~0.5, ROUGE-L ~0.66 on the 4 cases); without the scan's least sensitive layers it
    # writes worse at every ratio, the largest ratio at least 0.1 lower
    import csv

    rows = {float(r["ratio"]): r for r in csv.DictReader(study_csv.splitlines())}
    bleu = {k: float(r["dia_BLEU-4"]) for k, r in rows.items()}
    rouge = {k: float(r["dia_ROUGE-L"]) for k, r in rows.items()}
    assert bleu[0.0] > 0.3 and rouge[0.0] > 0.4, study_csv
    assert all(bleu[k] < bleu[0.0] and rouge[k] < rouge[0.0] for k in rows if k > 0), study_csv
    assert bleu[max(bleu)] < bleu[0.0] - 0.1 and rouge[max(rouge)] < rouge[0.0] - 0.1, study_csv

    # the same steps one by one, each its own submit.py call: scan, then prune on that scan (and the study's
    # Dia-Pangu run), then the table step on those two: the same table, to the last digit
    base = common_sets(work)[:6]
    res = cli("submit", "jobs/tiny/pangu_sensitivity.yaml", "-c", "local_slurm", "--wait", *base, timeout=WAIT)
    assert res.returncode == 0, res.stdout + res.stderr
    scan = run_folder(res.stdout)
    res = cli("submit", "jobs/tiny/pangu_prune.yaml", "-c", "local_slurm", "--wait", *base,
              "--set", f"prune.sensitivity_csv={scan}/sensitivity.csv", "--set", f"prune.dia_run={steps['dia']['run_dir']}",
              "--set", "prune.dia_eval_limit=4", timeout=WAIT)
    assert res.returncode == 0, res.stdout + res.stderr
    prune = run_folder(res.stdout)
    res = cli("submit", "jobs/tiny/pangu_study_table.yaml", "-c", "local_slurm", "--wait", *base,
              "--set", f"table.sensitivity_csv={scan}/sensitivity.csv",
              "--set", f"table.pruning_csv={prune}/pruning_eval.csv", timeout=WAIT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (run_folder(res.stdout) / "study_table.csv").read_text() == study_csv


def test_study_report_renders_in_chromium_with_the_table_of_study_table_csv_and_mlflow_has_one_parent(
        tiny_study, tmp_path):
    """report.html beside study.json, loaded from disk in headless Chromium: its table cells are study_table.csv's,
    the screenshot is a PNG; the study's MLflow store holds one parent with each step as a child and the table."""
    import csv

    from conftest import chromium, html_tables
    from core import tracking

    study_dir, rec, _ = tiny_study
    page = study_dir / "report.html"
    with (Path(rec["steps"]["table"]["run_dir"]) / "study_table.csv").open(newline="") as f:
        want = list(csv.reader(f))
    tables = html_tables(chromium(page, tmp_path))
    assert tables["study-table"] == want
    assert [r[0] for r in tables["steps"][1:]] == list(rec["steps"])
    # each step's state as the scheduler reported it when the table step drew the page (itself still running)
    states = {r[0]: dict(zip(tables["steps"][0], r)) for r in tables["steps"][1:]}
    assert all(states[n]["state"].startswith("COMPLETED") for n in ("dia", "scan", "prune")), states
    assert states["table"]["state"] == "RUNNING" and not any(s["failure class"] for s in states.values()), states
    shot = tmp_path / "study_report.png"
    chromium(page, tmp_path, screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    runs = tracking.mlflow_runs(study_dir / "mlruns")
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    assert len(parents) == 1 and parents[0]["name"] == rec["study"]
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parents[0]["id"]]
    assert {r["tags"]["medhpc.study_step"] for r in children} == set(rec["steps"]) and len(runs) == 1 + len(children)
    dia = [r for r in children if r["tags"]["medhpc.study_step"] == "dia"]
    assert [s for s, _ in dia[0]["metrics"]["train/loss"]] == list(range(1, 61))  # the stage-2 run's 60 steps
    assert any(k.endswith("/perplexity") for k in parents[0]["metrics"])


def test_status_shows_the_study_as_one_group(tiny_study):
    study_dir, rec, _ = tiny_study
    res = cli("status", "--json")
    assert res.returncode == 0, res.stderr
    groups = [g for g in json.loads(res.stdout) if g.get("study_dir") == str(study_dir)]
    assert len(groups) == 1 and groups[0]["state"] == "COMPLETED"
    assert {r["step"] for r in groups[0]["runs"]} == {"dia", "scan", "prune", "table"}
    table = cli("status", "--no-log")
    assert f"study {rec['study']}" in table.stdout and "COMPLETED" in table.stdout


def test_failed_task_mid_study_cancels_the_rest_and_resume_missing_finishes_it(tiny_study, work, tmp_path):
    """An existing Dia-Pangu run instead of training one; a prune task fails: the prune merge and the table are
    cancelled by Slurm, the output and status name the failed step; --resume-missing keeps the scan (same job ids)
    and submits prune and table again; the table then equals the first study's."""
    _, first, _ = tiny_study
    spec = tmp_path / "study.yaml"
    text = Path(STUDY).read_text()
    text = re.sub(r"  dia:.*?\n  scan:", f"  dia:\n    run: {first['steps']['dia']['run_dir']}\n  scan:", text,
                  flags=re.S)
    spec.write_text(text.replace("study: pangu_pruning_study_tiny", "study: study_fail_tiny"))
    pairs = common_sets(work)
    sets = [x for i in range(0, len(pairs), 2) if not pairs[i + 1].startswith("dia:") for x in pairs[i:i + 2]]
    res = cli("submit", str(spec), "-c", "local_slurm", "--wait", *sets, env={"MEDHPC_FAULT": "fail@ratio:0.5"},
              timeout=WAIT)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED at step prune" in res.stdout and "--resume-missing" in res.stdout
    study_dir = study_dir_of(res.stdout)
    rec = study_record(study_dir)
    assert rec["steps"]["dia"]["existing"] is True
    from core.study import step_states

    states = step_states(rec)
    assert states["scan"]["state"] == "done" and states["prune"]["state"] == "failed"
    assert states["table"]["state"] == "cancelled"  # by Slurm: afterok can never be satisfied
    status = json.loads(cli("status", "--json").stdout)
    group = next(g for g in status if g.get("study_dir") == str(study_dir))
    assert group["failed_steps"] == ["prune"]

    res = cli("submit", str(spec), "-c", "local_slurm", "--wait", "--resume-missing", *sets, timeout=WAIT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resubmitting prune, table" in res.stdout
    again = study_record(study_dir)
    assert again["steps"]["scan"]["job_ids"] == rec["steps"]["scan"]["job_ids"]  # kept, not rerun
    assert again["steps"]["scan"]["run_dir"] == rec["steps"]["scan"]["run_dir"]
    assert again["steps"]["prune"]["job_ids"] != rec["steps"]["prune"]["job_ids"]
    assert again["steps"]["prune"]["dependency"] == []  # the scan has finished: nothing left to wait for
    assert set(again["steps"]["table"]["dependency"]) == set(again["steps"]["prune"]["job_ids"])
    first_table = (Path(first["steps"]["table"]["run_dir"]) / "study_table.csv").read_text()
    assert (Path(again["steps"]["table"]["run_dir"]) / "study_table.csv").read_text() == first_table


def test_full_size_dry_run_shows_every_job_its_dependencies_and_memory(slurm):
    """No model folder or data on this machine: the estimates come from model.preset; the refusals a real submit
    would stop on (the lab's data files) are listed after the whole graph, exit 2, nothing submitted."""
    name = f"t{uuid.uuid4().hex[:8]}"
    res = cli("submit", FULL, "-c", "ascend_910b", "--dry-run", "--no-preflight")
    assert res.returncode == 2, res.stdout + res.stderr
    out = res.stdout
    for line in ("step dia: jobs/dia_pangu.yaml; waits for no other step",
                 "step scan: jobs/pangu_sensitivity.yaml; waits for no other step",
                 "step prune: jobs/pangu_prune.yaml; afterok on every job of: scan, dia",
                 "step table: jobs/pangu_study_table.yaml; afterok on every job of: scan, prune"):
        assert line in out
    assert "step main: 1 job (2 nodes x 8 tasks" in out                        # Dia-Pangu training
    assert "step baseline: 1 job" in out and "array of 34 tasks for 34 items" in out  # the scan, all 34 layers
    assert "array of 4 tasks for 4 items" in out                                # unpruned + 3 ratios
    assert out.count("step merge: 1 job") == 2
    assert "memory: est." in out and "GiB/device of 64 GiB" in out              # DeepSpeed estimate (dia)
    assert out.count("parameters in bf16 = 15.0 GiB per task") == 2             # scan and prune weights
    assert "written by study step scan, submitted before this one" in out
    assert "graph: scan -> prune; dia -> prune; scan -> table; prune -> table" in out
    err = res.stderr
    assert "steps.dia: data:" in err and "steps.scan: scan.prompts:" in err and "nothing was submitted" in err
    # the same refusals as a real submission of the same study (which stops at the first step that fails)
    real = cli("submit", FULL, "-c", "ascend_910b", "--no-preflight", "--set", f"name={name}")
    assert real.returncode == 2 and "steps.dia (jobs/dia_pangu.yaml): data:" in real.stderr
    assert "Traceback" not in real.stderr and not new_jobs(0, name)


BAD = {
    "unknown_after": ("steps:\n  a: {spec: jobs/tiny/smoke.yaml}\n  b: {spec: jobs/tiny/smoke.yaml, after: [c]}\n",
                      "steps.b.after[0]: unknown step 'c'"),
    "cycle": ("steps:\n  a: {spec: jobs/tiny/smoke.yaml, after: [b]}\n  b: {spec: jobs/tiny/smoke.yaml, after: [a]}\n",
              "in a cycle: a -> b -> a"),
    "missing_spec": ("steps:\n  a: {spec: jobs/tiny/nope.yaml}\n", "steps.a.spec: job spec jobs/tiny/nope.yaml not found"),
    "bad_override": ("steps:\n  a: {spec: jobs/tiny/smoke.yaml, set: [smoke.mesage=hi]}\n",
                     "did you mean 'smoke.message'?"),
    "unknown_ref": ("steps:\n  a: {spec: jobs/tiny/smoke.yaml, set: ['smoke.message=${step:zz}/x']}\n",
                    "steps.a.set[0]: ${step:zz} names no step"),
    "unknown_key": ("steps:\n  a: {spec: jobs/tiny/smoke.yaml, aftr: [b]}\n", "steps.a.aftr: unknown key"),
    "both": ("steps:\n  a: {spec: jobs/tiny/smoke.yaml, run: logs}\n", "steps.a: give either spec:"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_study_spec_fails_before_anything_is_submitted(slurm, tmp_path, case):
    body, needle = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(f"study: bad_{case}\n{body}")
    name = f"t{uuid.uuid4().hex[:8]}"
    res = cli("submit", str(path), "-c", "local_slurm", "--set", f"name={name}")
    assert res.returncode == 2, res.stdout + res.stderr
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"error: {path}") and needle in first, res.stderr
    assert "nothing was submitted" in res.stderr and "Traceback" not in res.stderr
    assert not new_jobs(0, name)


def test_set_for_an_unknown_step_is_refused(slurm):
    res = cli("submit", STUDY, "-c", "local_slurm", "--set", "nosuch:train.steps=3", "--dry-run")
    assert res.returncode == 2 and "unknown step 'nosuch'" in res.stderr and "Traceback" not in res.stderr


def test_auto_layers_per_task_uses_the_profiles_task_start_cost(tiny_pangu):
    """The shared change: the plan hands the profile to the planner; auto uses its task_start_s and says so."""
    from core.plan import make_plan
    from core.config import load_cluster, load_spec

    model = tiny_pangu
    spec, _ = load_spec("jobs/tiny/pangu_sensitivity.yaml", (f"model.path={model}", "model.make_tiny=false",
                                                             "scan.layers_per_task=auto"))
    notes = {}
    for name in ("local_slurm", "ascend_910b"):
        cluster = load_cluster(name)
        plan = make_plan(spec, cluster, limits={"MaxArraySize": 11})
        notes[name] = next(n for n in plan.notes if n.startswith("layers_per_task auto:"))
        assert f"task_start_s {cluster.task_start_s:g} from profile {name}'s task_start_s" in notes[name]
    spec2, _ = load_spec("jobs/tiny/pangu_sensitivity.yaml", (f"model.path={model}", "model.make_tiny=false",
                                                              "scan.layers_per_task=auto", "scan.task_start_s=0.0001"))
    plan = make_plan(spec2, load_cluster("ascend_910b"), limits={"MaxArraySize": 11})
    assert any("task_start_s 0.0001 from scan.task_start_s" in n for n in plan.notes)


def _smoke_study(tmp_path, body: str, name: str = "sel"):
    """A study of smoke steps with its logs under tmp_path; (Study, its root folder for study.json files)."""
    from core.study import load_study

    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"study: {name}\nsteps:\n{body}")
    study = load_study(spec, (f"outputs.logs_dir={tmp_path / 'logs'}",))
    return study, tmp_path / "logs" / name


def _write_study_record(root: Path, executor: str, steps: dict) -> Path:
    d = root / "20260101-000000"
    d.mkdir(parents=True)
    (d / "study.json").write_text(json.dumps({"study": root.name, "executor": executor, "steps": steps}))
    return d


def test_resume_missing_selection_and_plan_text_come_from_core(tmp_path):
    """core.study.select_steps decides what --resume-missing submits (failed step + its dependants; the rest is
    kept) and core.study.describe writes the plan text submit.py prints."""
    from core.config import load_cluster
    from core.study import describe, plan_all, select_steps

    study, root = _smoke_study(tmp_path, "  a: {spec: jobs/tiny/smoke.yaml}\n"
                                         "  b: {spec: jobs/tiny/smoke.yaml, after: [a]}\n"
                                         "  c: {spec: jobs/tiny/smoke.yaml, set: ['smoke.message=${step:b}']}\n"
                                         "  d: {spec: jobs/tiny/smoke.yaml}\n")
    runs = {n: str(tmp_path / f"run_{n}") for n in "abcd"}
    d = _write_study_record(root, "local", {
        "a": {"run_dir": runs["a"], "job_ids": ["local"], "state": "done"},
        "b": {"run_dir": runs["b"], "job_ids": ["local"], "state": "failed"},
        "c": {"state": "not run", "job_ids": []},
        "d": {"run_dir": runs["d"], "job_ids": ["local"], "state": "done"}})
    sel = select_steps(study, "")
    assert sel.study_dir == d.resolve() or sel.study_dir == d
    assert sel.resubmit == ["b", "c"] and sel.kept == {"a": Path(runs["a"]), "d": Path(runs["d"])}
    assert sel.queued == set() and sel.stale == []
    fresh = select_steps(study, None)
    assert fresh.resubmit == ["a", "b", "c", "d"] and fresh.kept == {} and fresh.previous is None
    cluster = load_cluster("local")
    planned, problems = plan_all(study, cluster, sel.resubmit, sel.kept, sel.queued)
    assert problems == []
    text = describe(study, planned, cluster, "--cluster", sel)
    assert "; resubmitting b, c, keeping a, d" in text.splitlines()[0]
    assert f"step a: {runs['a']} (kept: finished)" in text
    assert "step b: jobs/tiny/smoke.yaml; after the end of: a (kept, finished)" in text
    assert text.splitlines()[-1] == "graph: a -> b; b -> c (2 jobs, run one step after another by the local executor)"
    (d / "study.json").write_text(json.dumps({"study": "sel", "executor": "local", "steps": {
        n: {"run_dir": runs[n], "job_ids": ["local"], "state": "done"} for n in "abcd"}}))
    with pytest.raises(ValueError, match="nothing to resubmit"):
        select_steps(study, str(d))


def test_a_step_whose_jobs_slurm_never_knew_is_lost_and_resubmitted_with_its_dependants(slurm, tmp_path):
    """study.json names job ids for step b that neither squeue nor sacct knows: b is 'lost' (not 'active', which
    --resume-missing would keep forever); a dry --resume-missing resubmits b and c (after b) and keeps a, whose
    held job is still queued."""
    import subprocess

    from core.study import step_states

    name = f"t{uuid.uuid4().hex[:8]}"
    held = subprocess.run(["sbatch", "--parsable", "-H", "-p", "debug", "-J", name, "-o", "/dev/null",
                           "--wrap", "true"], capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        study, root = _smoke_study(tmp_path, "  a: {spec: jobs/tiny/smoke.yaml}\n"
                                             "  b: {spec: jobs/tiny/smoke.yaml, after: [a]}\n"
                                             "  c: {spec: jobs/tiny/smoke.yaml, after: [b]}\n", name="lost")
        never = str(job_mark() + 100000)  # above every id Slurm has handed out
        d = _write_study_record(root, "slurm", {
            "a": {"run_dir": str(tmp_path / "run_a"), "job_ids": [held], "state": "submitted"},
            "b": {"run_dir": str(tmp_path / "run_b"), "job_ids": [never], "state": "submitted"},
            "c": {"run_dir": str(tmp_path / "run_c"), "job_ids": [], "state": "not run"}})
        states = step_states(study_record(d))
        assert states["a"]["state"] == "active"
        assert states["b"]["state"] == "lost" and never in states["b"]["detail"]
        assert "squeue" in states["b"]["detail"] and "sacct" in states["b"]["detail"]
        res = cli("submit", study.source, "-c", "local_slurm", "--dry-run", "--no-preflight", "--resume-missing",
                  str(d), "--set", f"outputs.logs_dir={tmp_path / 'logs'}")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "; resubmitting b, c, keeping a" in res.stdout
        assert f"step a: {tmp_path / 'run_a'} (kept: still queued)" in res.stdout
        assert "step b: jobs/tiny/smoke.yaml; afterok on every job of: a (queued)" in res.stdout
    finally:
        subprocess.run(["scancel", held], capture_output=True)


def _write_tiny_models(root: str) -> dict:
    """In a fresh process: the tiny writers of a study's make_tiny steps, then a load of what they return."""
    import hashlib

    from core.models.chexbert import load_checkpoint, write_tiny_chexbert
    from core.models.pangu import load_pangu, load_tokenizer, write_tiny_pangu

    folder = write_tiny_pangu(Path(root) / "pangu")
    pth = write_tiny_chexbert(Path(root) / "chexbert")
    model, tok = load_pangu(folder), load_tokenizer(folder)
    state = load_checkpoint(pth)
    return {"files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())},
            "layers": model.config.num_hidden_layers, "ids": tok.encode("pleural effusion"),
            "chexbert_keys": len(state), "vocab": (pth.parent / "vocab.txt").read_text()}


def test_two_processes_writing_the_same_tiny_models_both_get_complete_identical_folders(tmp_path):
    """The tiny study starts Dia-Pangu and the scan at once, both with make_tiny on one model folder: two
    processes write the same folders at the same time; both end with the same complete, loadable folder and no
    temporary folder is left."""
    import multiprocessing as mp

    from core.models.pangu import TINY_FILES

    with mp.get_context("spawn").Pool(2) as pool:
        a, b = pool.map(_write_tiny_models, [str(tmp_path)] * 2)
    assert a == b
    assert set(TINY_FILES) <= set(a["files"]) and a["layers"] > 0 and a["ids"] and a["chexbert_keys"] > 0
    assert "effusion" in a["vocab"].split()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chexbert", "pangu"]
    assert sorted(p.name for p in (tmp_path / "chexbert").iterdir()) == ["chexbert.pth", "vocab.txt"]


def test_build_folder_keeps_the_first_complete_folder_and_moves_an_incomplete_one_aside(tmp_path):
    """core.run_folder.build_folder: a caller that finishes second discards its own folder and uses the winner's;
    a leftover incomplete folder is moved aside, not mixed with the new files."""
    from core.run_folder import build_folder

    target = tmp_path / "m"
    complete = lambda f: (f / "done").is_file()  # noqa: E731

    def loser(tmp):  # while this caller builds, another one finishes and renames its folder into place
        (tmp / "done").write_text("second")
        build_folder(target, lambda t: (t / "done").write_text("first"), complete)

    assert build_folder(target, loser, complete) == target
    assert (target / "done").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left
    other = tmp_path / "n"
    other.mkdir()
    (other / "half").write_text("interrupted writer")
    build_folder(other, lambda t: (t / "done").write_text("new"), complete)
    assert sorted(p.name for p in other.iterdir()) == ["done"]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("n.incomplete-")]
    assert len(aside) == 1 and (aside[0] / "half").read_text() == "interrupted writer"


def test_study_on_the_local_executor_runs_each_step_after_the_one_it_waits_for(tmp_path):
    """One submit.py call on the default local executor: the second smoke step gets the first's run folder
    through ${step:first} (its task sees it in smoke.message), study.json says both are done, exit 0."""
    spec = tmp_path / "local_study.yaml"
    spec.write_text("study: local_two\nsteps:\n  first: {spec: jobs/tiny/smoke.yaml}\n"
                    "  second: {spec: jobs/tiny/smoke.yaml, set: ['smoke.message=after ${step:first}']}\n")
    res = cli("submit", str(spec), "--set", f"outputs.logs_dir={tmp_path / 'logs'}", env={"MEDHPC_CLUSTER": ""})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "on local [local" in res.stdout and "study local_two: COMPLETED" in res.stdout
    rec = study_record(study_dir_of(res.stdout))
    assert rec["executor"] == "local" and [rec["steps"][n]["state"] for n in ("first", "second")] == ["done", "done"]
    first, second = (Path(rec["steps"][n]["run_dir"]) for n in ("first", "second"))
    assert first != second and record(first)["study_step"] == "first" and record(second)["study_step"] == "second"
    task = json.loads(next((second / "tasks").glob("main*.json")).read_text())
    assert task["result"]["message"] == f"after {first}"
    assert record(second)["spec"]["smoke"]["message"] == f"after {first}"
    assert list((first / "tasks").glob("main*.json"))  # the first step had run to its end before
    # each step ran to its end before its run.json was written: the page was drawn again after it, with the plan
    import html

    for run in (first, second):
        page = (run / "report.html").read_text()
        assert html.escape(record(run)["plan"]) in page and "no run record yet" not in page


def test_cancel_by_study_name_cancels_every_steps_jobs_and_nothing_else(slurm, tmp_path):
    """`cancel.py <study name>` on a queued study (two long smoke steps, the second afterok on the first):
    every job of both steps ends CANCELLED; another run's job, queued at the same time, is untouched."""
    import subprocess

    from conftest import queue_ids, wait_terminal

    study_name, other = f"cs{uuid.uuid4().hex[:8]}", f"t{uuid.uuid4().hex[:8]}"
    logs = ("--set", f"outputs.logs_dir={tmp_path / 'logs'}", "--set", "smoke.sleep_s=900",
            "--set", "resources.time=00:20:00")
    res = cli("submit", "jobs/tiny/smoke.yaml", "-c", "local_slurm", "--no-preflight", "--set", f"name={other}", *logs)
    assert res.returncode == 0, res.stdout + res.stderr
    other_ids = record(run_folder(res.stdout))["steps"][0]["job_ids"]
    try:
        spec = tmp_path / "cancel_study.yaml"
        spec.write_text(f"study: {study_name}\nsteps:\n  first: {{spec: jobs/tiny/smoke.yaml}}\n"
                        f"  second: {{spec: jobs/tiny/smoke.yaml, after: [first]}}\n")
        res = cli("submit", str(spec), "-c", "local_slurm", "--no-preflight", "--set", f"name={study_name}r", *logs)
        assert res.returncode == 0, res.stdout + res.stderr
        steps = study_record(study_dir_of(res.stdout))["steps"]
        ids = [j for n in ("first", "second") for j in steps[n]["job_ids"]]
        assert len(ids) == 2
        res = cli("cancel", study_name)
        assert res.returncode == 0, res.stdout + res.stderr
        assert set(res.stdout.split()[1:]) == set(ids)  # "cancelled <ids>"
        assert wait_terminal(ids) == {j: "CANCELLED" for j in ids}
        assert other_ids[0] in queue_ids()  # still queued (squeue: sacct may list a fresh job a moment later)
    finally:
        subprocess.run(["scancel", *other_ids], capture_output=True)


def test_the_table_step_asks_for_no_accelerator_on_an_npu_profile():
    """study_table declares it needs no device: on ascend_910b its sbatch script has no --gres (and one task),
    while a device workload (smoke) on the same profile still asks for its NPUs."""
    from core import submit as sub
    from core.plan import make_plan
    from core.config import load_cluster, load_spec

    cluster = load_cluster("ascend_910b")
    table, _ = load_spec("jobs/pangu_study_table.yaml", ("resources.tasks_per_node=null",))
    plan = make_plan(table, cluster, keep_going=True, limits={})
    scripts = [t for texts in sub.sbatch_texts(plan).values() for t in texts]
    assert scripts and not any("--gres" in t for t in scripts)
    assert [s.tasks_per_node for s in plan.steps] == [1]
    assert any("needs no npu device" in n for n in plan.notes)
    smoke, _ = load_spec("jobs/tiny/smoke.yaml")
    smoke_scripts = sub.sbatch_texts(make_plan(smoke, cluster, limits={}))
    assert all("--gres=npu:1" in t for texts in smoke_scripts.values() for t in texts)


def test_a_submitter_killed_between_two_steps_leaves_nothing_runnable(slurm, tmp_path):
    """All or nothing: the study's jobs are submitted held. SIGKILL after the first of two steps: its job stays held
    (JobHeldUser, never runs), the record says it was never released; the next --resume-missing cancels it and
    submits both steps again, released together."""
    import subprocess

    from conftest import sacct_states, wait_terminal

    name = f"k{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "kill.yaml"
    spec.write_text(f"study: {name}\nsteps:\n  first: {{spec: jobs/tiny/smoke.yaml}}\n"
                    f"  second: {{spec: jobs/tiny/smoke.yaml, after: [first]}}\n")
    args = (str(spec), "-c", "local_slurm", "--no-preflight", "--set", f"outputs.logs_dir={tmp_path / 'logs'}",
            "--set", f"name={name}")
    res = cli("submit", *args, env={"MEDHPC_FAULT": "kill@study_submitted:first"})
    assert res.returncode == -9, res.stdout + res.stderr
    study_dir = next((tmp_path / "logs" / name).glob("*/study.json")).parent
    rec = study_record(study_dir)
    first = rec["steps"]["first"]["job_ids"]
    try:
        assert rec["held"] and not rec.get("released") and rec["steps"]["second"]["job_ids"] == []
        time.sleep(2)  # long enough for the scheduler to start a runnable job on an idle node
        live = subprocess.run(["squeue", "-h", "-j", first[0], "-o", "%T|%r"], capture_output=True, text=True)
        assert live.stdout.strip() == "PENDING|JobHeldUser"
        res = cli("submit", *args, "--resume-missing", "--wait", timeout=WAIT)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"cancelled the queued jobs of the steps submitted again: {first[0]}" in res.stdout
        assert "released the 2 held jobs of this submission" in res.stdout
        assert re.search(r"^\d\d:\d\d:\d\d step second: (started|done)", res.stdout, re.M)  # --wait's progress
        assert sacct_states(first) == {first[0]: "CANCELLED"}
        again = study_record(study_dir)
        assert again["released"] and again["steps"]["first"]["job_ids"] != first
        new = [j for n in ("first", "second") for j in again["steps"][n]["job_ids"]]
        assert set(wait_terminal(new).values()) == {"COMPLETED"}
    finally:
        subprocess.run(["scancel", *first], capture_output=True)
