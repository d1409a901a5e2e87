"""Provenance read cheaply on every submission (issue 27, item 2) must equal what the slow, obvious way says:
package versions from the installers' folder names against importlib.metadata, the checkout's commit and dirty
flag from one `git status --porcelain=v2 --branch` against `git rev-parse` / `git status`; and a plain job's
submission path leaves the study machinery unimported."""
import subprocess
import sys

import pytest
from importlib import metadata

from core.run_folder import REPO
from core.tracking import PACKAGES, git_commit, package_versions, start_git_status


def test_package_versions_equal_importlib_metadata():
    expected = {}
    for name in PACKAGES:
        try:
            expected[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    assert package_versions() == expected and "torch" in expected


def test_git_commit_equals_git_itself_and_sees_a_dirty_tree(tmp_path):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    assert git_commit(start_git_status()) == {"commit": head, "dirty": dirty}
    # a scratch repository: clean after its first commit, dirty once a tracked file changes
    repo = tmp_path / "r"
    run = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, check=True)  # noqa: E731
    repo.mkdir()
    run("init", "-q")
    (repo / "f.txt").write_text("a\n")
    run("add", "f.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    assert git_commit(start_git_status(repo)) == {"commit": run("rev-parse", "HEAD").stdout.strip(), "dirty": False}
    (repo / "f.txt").write_text("b\n")
    assert git_commit(start_git_status(repo))["dirty"] is True
    assert git_commit(start_git_status(tmp_path)) == {"commit": None, "dirty": None}  # not a git checkout


def test_a_plain_job_submission_does_not_import_the_study_machinery():
    code = ("import sys; sys.argv = ['submit.py', 'jobs/tiny/smoke.yaml', '--dry-run']; sys.path.insert(0, 'launchers')\n"
            "import submit\n"
            "try:\n    submit.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('core.study')), file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "dry run" in res.stdout
    assert res.stderr.strip().splitlines()[-1] == "['core.study', 'core.study.spec']"


@pytest.mark.slurm
def test_a_submission_that_fails_leaves_no_git_process_behind(tmp_path, monkeypatch):
    """The git status started before the jobs are submitted is ended when a submission fails: the real sbatch of the
    local cluster refuses a partition it does not have (the preflight that would catch it is not run here)."""
    from core import submit, tracking
    from core.config import load_cluster, load_spec
    from core.plan import make_plan

    spec, raw = load_spec(REPO / "jobs/tiny/smoke.yaml", (f"outputs.logs_dir={tmp_path}",))
    cluster = load_cluster("local_slurm")
    cluster = cluster.model_copy(update={"slurm": cluster.slurm.model_copy(update={"partition": "no_such_part"})})
    plan = make_plan(spec, cluster, limits={"MaxArraySize": 11})
    started = []
    monkeypatch.setattr(submit, "start_git_status", lambda: started.append(tracking.start_git_status()) or started[-1])
    with pytest.raises(Exception, match="(?i)invalid partition"):
        submit.submit(plan, raw, "jobs/tiny/smoke.yaml")
    assert len(started) == 1 and started[0].returncode is not None   # ended and reaped
