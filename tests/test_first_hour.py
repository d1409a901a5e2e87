"""A user's first hour: which cluster a spec goes to, a dry run anywhere (even where Slurm is not installed),
preflight against the real local Slurm, the options jobs carry themselves, and the rendezvous check."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, cli, job_mark, new_jobs, run_folder

SMOKE = "jobs/tiny/smoke.yaml"


def spec_with_cluster(tmp_path: Path, cluster: str) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(f"name: order\nworkload: smoke\ncluster: {cluster}\nresources: {{time: 5}}\n")
    return str(p)


def test_cluster_order_flag_then_spec_then_environment_then_site_default(tmp_path):
    from core.config import choose_cluster

    assert choose_cluster("cuda_a100", "local_slurm", {"MEDHPC_CLUSTER": "x"}) == ("cuda_a100", "--cluster")
    assert choose_cluster(None, "local_slurm", {"MEDHPC_CLUSTER": "x"}) == ("local_slurm", "the spec's cluster: key")
    assert choose_cluster(None, None, {"MEDHPC_CLUSTER": "ascend_910b"}) == ("ascend_910b", "$MEDHPC_CLUSTER")
    assert choose_cluster(None, None, {}) == (None, "the built-in default")  # no cluster_configs/default.yaml here
    spec = spec_with_cluster(tmp_path, "ascend_910b")
    res = cli("submit", spec, "--dry-run", "--no-preflight")
    assert res.returncode == 0 and "on ascend_910b [slurm, npu] (profile from the spec's cluster: key)" in res.stdout
    res = cli("submit", SMOKE, "--dry-run", "--no-preflight", env={"MEDHPC_CLUSTER": "cuda_a100"})
    assert res.returncode == 0 and "on cuda_a100 [slurm, cuda] (profile from $MEDHPC_CLUSTER)" in res.stdout
    res = cli("submit", spec, "-c", "local", "--dry-run")
    assert res.returncode == 0 and "on local [local, cpu] (profile from --cluster)" in res.stdout
    # the lab's full-size specs name their cluster, so the mission's own command goes there
    for name, cluster in {"pangu_sensitivity": "ascend_910b", "blip_medtrinity": "cuda_a100"}.items():
        assert yaml.safe_load((REPO / "jobs" / f"{name}.yaml").read_text())["cluster"] == cluster


def test_dry_run_on_a_machine_without_slurm_prints_the_plan_scripts_and_problems(tmp_path):
    """No sbatch / srun / scontrol on PATH (a laptop): the plan and the exact scripts still print; the data that is
    not on this machine is listed as what a real submit would refuse, with exit code 2."""
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing but what we put there
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "launchers" / "submit.py"), *a], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=300)
    ok = run(SMOKE, "-c", "local_slurm", "--dry-run")
    assert ok.returncode == 0, ok.stderr
    assert "#SBATCH --partition=debug" in ok.stdout and "preflight skipped: no Slurm commands" in ok.stdout
    refused = run("jobs/pangu_sensitivity.yaml", "--dry-run")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "on ascend_910b [slurm, npu]" in refused.stdout and "#SBATCH --gres=gpu:8" not in refused.stdout
    assert "# ---- sbatch script: step main" in refused.stdout
    assert "a submission would be refused" in refused.stderr and "scan.prompts" in refused.stderr


@pytest.mark.slurm  # its dry runs on local_slurm ask the cluster for its limits (scontrol)
def test_dependent_jobs_carry_kill_on_invalid_dep_and_requeue_follows_the_workload():
    res = cli("submit", "jobs/tiny/smoke_array.yaml", "-c", "local_slurm", "--dry-run")
    main, merge = res.stdout.split("# ---- sbatch script: step merge ----")
    assert "--kill-on-invalid-dep=yes" not in main and "#SBATCH --kill-on-invalid-dep=yes" in merge
    assert "#SBATCH --no-requeue" in main  # smoke cannot resume
    res = cli("submit", "jobs/tiny/pangu_lm.yaml", "-c", "local_slurm", "--dry-run")
    assert res.returncode == 0 and "#SBATCH --requeue" in res.stdout  # training resumes from its checkpoints


PREFLIGHT = {
    "time beyond the partition's MaxTime": (("--set", "resources.time=2-00:00:00"), None, "resources.time",
                                            "MaxTime of partition debug"),
    "memory beyond the nodes": (("--set", "resources.mem_gb=100"), None, "resources.mem_gb", "RealMemory"),
    "more nodes than the partition": (("--set", "resources.nodes=3"), {"max_nodes": None}, "resources.nodes",
                                      "(scontrol show partition) has 2"),
    "unknown partition": ((), {"partition": "nosuch"}, "slurm.partition", "not known to this cluster"),
    "account that is not the user's": ((), {"account": "nosuchacct"}, "slurm.account", "sacctmgr"),
    "CPUs beyond the nodes": (("--set", "resources.cpus_per_task=64"), None, "resources.cpus_per_task", "CPUTot"),
}


@pytest.mark.parametrize("case", sorted(PREFLIGHT))
def test_preflight_refuses_what_the_cluster_cannot_run_naming_field_and_limit(slurm, tmp_path, case):
    sets, profile_change, field, limit = PREFLIGHT[case]
    profile = yaml.safe_load((REPO / "cluster_configs" / "local_slurm.yaml").read_text())
    for key, value in (profile_change or {}).items():
        section = profile["slurm"] if key in profile["slurm"] or key in ("account", "qos") else profile
        if value is None:
            section.pop(key, None)
        else:
            section[key] = value
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(profile))
    mark = job_mark()
    res = cli("submit", SMOKE, "-c", str(tmp_path / "p.yaml"), *sets)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"  {field}: " in res.stderr and limit in res.stderr and "nothing was submitted" in res.stderr
    assert "Traceback" not in res.stderr
    assert not new_jobs(mark)


def test_preflight_passes_a_good_job_and_prints_slurms_expected_start(slurm):
    res = cli("submit", SMOKE, "-c", "local_slurm", "--dry-run")
    assert res.returncode == 0 and "Slurm expects it to start at" in res.stdout, res.stdout + res.stderr


def test_multi_node_rendezvous_on_a_loopback_address_is_refused():
    from core.runtime import DistEnv, DistEnvError, check_rendezvous

    two = DistEnv(0, 2, 0, 1, 0, 2, "localhost", 29500, "7", ("localhost", "other"))
    with pytest.raises(DistEnvError, match="loopback"):
        check_rendezvous(two, {})
    check_rendezvous(two, {"loopback_rendezvous": True})  # the local cluster: every node is this host
    check_rendezvous(DistEnv(0, 2, 0, 2, 0, 1, "127.0.0.1", 29500, "7", ("n1",)), {})  # one node: nothing to reach


def readme_main_command() -> list[str]:
    """The README's first command, `bash launchers/setup.sh && .venv/bin/python launchers/submit.py <spec>`."""
    import re

    text = (REPO / "README.md").read_text()
    m = re.search(r"^bash launchers/setup\.sh && \.venv/bin/python launchers/submit\.py (\S+)$", text, re.M)
    assert m, "README.md lost its main command"
    return [m.group(1)]


def sentences(text: str) -> list[str]:
    return [s.strip() + "." for s in text.split(".") if s.strip()]


def test_readme_main_job_learns_real_sentences_and_beats_the_untrained_model(tmp_path):
    """The README's main job (local executor, tiny models, CPU) visibly learns: findings made of the synthetic
    data's own sentences, BLEU-4 and ROUGE-L far above the untrained model's (both printed), disease calls better
    than chance, and a loss curve beside the metrics plot."""
    import csv
    import json

    from core.data.ctrg import COMPANION_NEG, COMPANION_POS, CONDITIONS, OTHER, SENTENCES_NEG, SENTENCES_POS

    res = cli("submit", *readme_main_command(), "--set", f"outputs.logs_dir={tmp_path / 'logs'}", timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    table = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines() if line.startswith("  ")}
    assert "untrained" in res.stdout and len(table["BLEU-4"]) == 2 and len(table["ROUGE-L"]) == 2
    # progress while it trained (core.results.progress): the steps shown rise to the last one, and the page is named
    shown = [int(m) for m in re.findall(r"^  step (\d+)/120: loss [0-9.]+ \(\d+ s\)$", res.stdout, re.M)]
    assert shown and shown == sorted(shown) and shown[-1] == 120, res.stdout[:3000]
    # and the work around training: scoring the untrained model before the first step, the test reports after it
    lines = res.stdout.splitlines()
    ends = [lines.index(next(ln for ln in lines if re.fullmatch(rf"  {what}: 8/8 \(\d+ s\)", ln)))
            for what in ("scoring the untrained model", "writing the test reports")]
    first_step = next(i for i, ln in enumerate(lines) if re.match(r"  step \d+/120: ", ln))
    assert ends[0] < first_step < ends[1], res.stdout[:3000]
    assert f"the run's page: {run_folder(res.stdout) / 'report.html'}" in res.stdout
    results = run_folder(res.stdout) / "results"
    trained = json.loads((results / "metrics.json").read_text())
    untrained = json.loads((results / "untrained" / "metrics.json").read_text())
    assert [float(v) for v in table["BLEU-4"]] == pytest.approx([untrained["BLEU-4"], trained["BLEU-4"]], abs=1e-4)
    assert trained["BLEU-4"] > untrained["BLEU-4"] + 0.2 and trained["ROUGE-L"] > untrained["ROUGE-L"] + 0.3
    bank = {SENTENCES_POS, SENTENCES_NEG, COMPANION_POS, COMPANION_NEG, *OTHER}
    rows = list(csv.DictReader((results / "dia-pangu.csv").open()))
    before = list(csv.DictReader((results / "untrained" / "dia-pangu.csv").open()))
    made = [s for r in rows for s in sentences(r["Pred"])]
    assert len(rows) == len(before) == 8 and made
    assert sum(s in bank for s in made) >= 0.6 * len(made)      # the data's own sentences
    assert not any(s in bank for r in before for s in sentences(r["Pred"]))
    k = CONDITIONS.index("pleural effusion")
    hits = sum(json.loads(r["GT_labels"])[k] == json.loads(r["Pred_labels"])[k] for r in rows)
    assert hits >= 7  # chance is 4 of 8 (P(>= 7 of 8 | chance) = 3.5%)
    opening = sum(sentences(r["Pred"])[:2] == sentences(r["Ground Truth"])[:2] for r in rows)
    assert opening >= 7  # the effusion sentence and the one that goes with it: what the head called
    assert (results / "loss.png").stat().st_size > 1000 and (results / "metrics.png").stat().st_size > 1000


def test_full_size_dry_run_estimate_prints_no_deepspeed_accelerator_notice():
    """The estimate's DeepSpeed import on a machine without an accelerator does not tell the user 'Setting
    accelerator to CPU': the job runs on the cluster's NPUs, not here."""
    res = cli("submit", "jobs/dia_pangu.yaml", "-c", "ascend_910b", "--dry-run", "--no-preflight")
    assert res.returncode == 2 and "memory: est." in res.stdout and "data.path" in res.stderr
    assert "Setting accelerator" not in res.stdout + res.stderr and "WARNING" not in res.stdout + res.stderr
