"""A command's start-up runs without Python's cyclic collector (issue 27, item 2: importing pydantic and submitit
and validating a spec build a few hundred thousand long-lived objects the collector would walk again and again),
and whatever may run long afterwards in the same process runs with it."""
import ast
import subprocess
import sys

from conftest import REPO

PROBE = """
import gc, sys
sys.path.insert(0, 'launchers')
import submit
from core import submission
seen = []

def submit_job(job):   # stands in for the submission itself: records whether the collector runs meanwhile
    seen.append(gc.isenabled())
    raise SystemExit(0)

submission.submit_job = submit_job
for profile in ('local', 'local_slurm'):
    try:
        submit.main(['jobs/tiny/smoke.yaml', '-c', profile, '--no-preflight', '--set', 'outputs.logs_dir=%s'])
    except SystemExit:
        pass
    seen.append(gc.isenabled())
print(seen)
"""


def test_submit_starts_up_without_the_collector_and_runs_a_local_job_with_it(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE % tmp_path], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    during_local, after_local, during_sbatch, after_sbatch = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    # the local executor runs the steps inside the submission: collected as usual; an sbatch submission is still
    # start-up (submitit's import, pickling the task); afterwards the collector is back either way
    assert (during_local, after_local, during_sbatch, after_sbatch) == (True, True, False, True)
