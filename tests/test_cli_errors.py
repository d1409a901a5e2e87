"""Bad input through the real launcher: a clear message naming the field, exit code != 0, nothing submitted."""
from __future__ import annotations

import pytest

from conftest import cli, job_mark, new_jobs

SMOKE = "jobs/tiny/smoke.yaml"


def bad_spec(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return str(p)


CASES = {
    "unknown key": (lambda t: (bad_spec(t, "name: a\nworkload: smoke\nresources: {nodse: 2}\n"),),
                    ["resources.nodse", "did you mean 'nodes'"]),
    "wrong type": (lambda t: (SMOKE, "--set", "resources.nodes=two"), ["resources.nodes", "integer"]),
    "negative nodes": (lambda t: (SMOKE, "--set", "resources.nodes=-1"), ["resources.nodes", "greater than 0"]),
    "missing file": (lambda t: ("jobs/nope.yaml",), ["jobs/nope.yaml", "not found"]),
    "missing profile": (lambda t: (SMOKE, "--cluster", "nowhere"), ["nowhere.yaml", "cluster profile not found"]),
    "literal secret": (lambda t: (bad_spec(t, "name: a\nworkload: smoke\nenv: {API_KEY: sk-12345678901234}\n"),),
                       ["env.API_KEY", "${env:VAR_NAME}"]),
    "malformed yaml": (lambda t: (bad_spec(t, "name: a\nworkload: [smoke\n"),), ["malformed YAML", "line"]),
    "unknown workload": (lambda t: (bad_spec(t, "name: a\nworkload: dia_pangoo\n"),), ["workload", "known workloads"]),
    "array beyond queue limit": (lambda t: ("jobs/tiny/smoke_array.yaml", "--set", "resources.array.items=5000"),
                                 ["resources.array", "items_per_task to at least 3"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_clearly_and_submits_nothing(slurm, tmp_path, case):
    make_args, needles = CASES[case]
    mark = job_mark()
    res = cli("submit", *make_args(tmp_path), "--cluster", "local_slurm") if case != "missing profile" else \
        cli("submit", *make_args(tmp_path))
    assert res.returncode != 0
    assert res.stderr.startswith("error: ") and "nothing was submitted" in res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not new_jobs(mark)


@pytest.mark.slurm  # the dry run on local_slurm asks the cluster for its limits (scontrol)
def test_spec_errors_do_not_import_torch(tmp_path):
    """The validation path stays light: a failing spec exits before torch (or deepspeed) is imported."""
    code = ("import sys, runpy; sys.path.insert(0, 'launchers'); sys.argv=['submit.py', %r, '--set', 'resources.nodes=0'];"
            "import atexit; atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'NOTORCH'));"
            "runpy.run_path('launchers/submit.py', run_name='__main__')" % "jobs/tiny/smoke.yaml")
    import subprocess
    import sys

    from conftest import REPO
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "resources.nodes" in res.stderr and res.stdout.strip() == "NOTORCH"
    dry = subprocess.run([sys.executable, "-c", code.replace("'--set', 'resources.nodes=0'", "'--dry-run'")
                          .replace("jobs/tiny/smoke.yaml'", "jobs/tiny/smoke.yaml', '-c', 'local_slurm'")],
                         capture_output=True, text=True, cwd=REPO)
    assert dry.returncode == 0 and dry.stdout.strip().endswith("NOTORCH"), dry.stdout + dry.stderr
