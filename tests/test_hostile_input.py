"""Hostile and malformed specs and profiles, one case per row: the input, then the field its refusal names (or
"accepted"). Every refused case is refused before anything is planned or submitted, its message never quotes a
secret, and nothing is written anywhere; accepted cases render sbatch scripts in which no injected text appears
outside a quoted value. In-process and fast; the real-Slurm canaries are at the end."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.plan import make_plan
from core.config import SpecError, load_cluster, load_spec
from core.submit import sbatch_texts

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-VALUE-9f8e7d"
HF = "hf_" + "A1b2C3d4" * 5
BASE = "name: h\nworkload: smoke\nresources: {time: 5}\n"
PROFILE = (REPO / "cluster_configs" / "local_slurm.yaml").read_text()


def bomb() -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
              f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]" for i in range(8)]
    return BASE + "\n".join(f"x{ln}" for ln in lines) + "\nsmoke:\n  fail_items: *i\n"  # 9^9 items from 1 KB


# (spec text or bytes, --set overrides, profile text or None, expected field | "accepted" | "YAML")
CASES = {
    "newline in logs_dir": (BASE + 'outputs: {logs_dir: "logs\\ntouch /tmp/CANARY"}\n', (), None, "outputs.logs_dir"),
    "newline via --set": (BASE, ("outputs.logs_dir=logs\ntouch CANARY",), None, "outputs.logs_dir"),
    "carriage return in name": (BASE, ("name=a\rb",), None, "name"),
    "newline in partition": (BASE, (), PROFILE.replace("partition: debug", 'partition: "debug\\n#SBATCH --x"'),
                             "slurm.partition"),
    "shell in account": (BASE, (), PROFILE + "account: 'lab;touch /tmp/CANARY'\n", "slurm.account"),
    "space in qos": (BASE, (), PROFILE + "qos: 'normal --wrap=x'\n", "slurm.qos"),
    "newline in constraint": (BASE, (), PROFILE + 'constraint: "a100\\nrm -rf ~"\n', "constraint"),
    "dollar in exclude": (BASE, (), PROFILE + "exclude: 'n$(id)'\n", "slurm.exclude"),
    "unknown gres placeholder": (BASE, (), PROFILE + "gres: 'gpu:{gpus}'\n", "slurm.gres"),
    "gres with devices": (BASE, (), PROFILE + "gres: 'gpu:{devices}'\n", "accepted"),
    "constraint operators": (BASE, (), PROFILE + "constraint: '[a100|h100]&ib'\n", "accepted"),
    "logs_dir escapes with ..": (BASE, ("outputs.logs_dir=../outside",), None, "outputs.logs_dir"),
    "logs_dir absolute elsewhere": (BASE, ("outputs.logs_dir=/etc/medhpc",), None, "outputs.logs_dir"),
    "logs_dir empty": (BASE, ("outputs.logs_dir=''",), None, "outputs.logs_dir"),
    "logs_dir inside logs": (BASE, ("outputs.logs_dir=logs/sub",), None, "accepted"),
    "logs_dir absolute in a profile root": (BASE, ("outputs.logs_dir=/tmp/medhpc-runs",), None, "accepted"),
    "camelCase token": (BASE + f"env: {{hfToken: {SECRET}}}\n", (), None, "env.hfToken"),
    "accessToken": (BASE + f"env: {{accessToken: {SECRET}}}\n", (), None, "env.accessToken"),
    "PGPASSWORD": (BASE + f"env: {{PGPASSWORD: {SECRET}}}\n", (), None, "env.PGPASSWORD"),
    "GITHUB_PAT": (BASE + f"env: {{GITHUB_PAT: {SECRET}}}\n", (), None, "env.GITHUB_PAT"),
    "secret as a list": (BASE + f"smoke: {{api_key: [{SECRET}]}}\n", (), None, "smoke.api_key"),
    "secret as a number": (BASE + "env: {DB_PASSWORD: 123456789}\n", (), None, "env.DB_PASSWORD"),
    "token shape anywhere": (BASE + f"description: 'mine {HF}'\n", (), None, "description"),
    "secret in a profile": (BASE, (), PROFILE.replace("env:\n", f"env:\n  WANDB_API_KEY: {SECRET}\n"),
                            "env.WANDB_API_KEY"),
    "env reference": (BASE + "env: {HF_TOKEN: '${env:HF_TOKEN}'}\n", (), None, "accepted"),
    "bad env name": (BASE + "env: {'A=B': x}\n", (), None, "env"),
    "alias bomb": (bomb(), (), None, "YAML"),
    "self alias": (BASE + "smoke: &s {fail_items: *s}\n", (), None, "YAML"),
    "2000-deep nesting": (BASE + "smoke: {fail_items: " + "[" * 2000 + "]" * 2000 + "}\n", (), None, "YAML"),
    "not UTF-8": (BASE.encode() + b"description: caf\xe9\n", (), None, "YAML"),
    "duplicate key": (BASE + "name: other\n", (), None, "YAML"),
    "over 1 MiB": (BASE + "description: '" + "x" * (1 << 20) + "'\n", (), None, "YAML"),
    "a billion nodes": (BASE, ("resources.nodes=1000000000",), None, "resources.nodes"),
    "more nodes than the profile": (BASE, ("resources.nodes=3",), None, "resources.nodes"),
    "ten million items": (BASE, ("resources.array.items=10000000",), None, "resources.array.items"),
    "mem inf": (BASE, ("resources.mem_gb=.inf",), None, "resources.mem_gb"),
    "mem below 1 MB": (BASE, ("resources.mem_gb=0.0001",), None, "resources.mem_gb"),
    "trainable nan": (BASE, ("model.trainable=.nan",), None, "model.trainable"),
    "time of 99999 days": (BASE, ("resources.time=99999-00:00:00",), None, "resources.time"),
    "300-character name": (BASE, ("name=" + "n" * 300,), None, "name"),
    "control character in a key": (BASE + 'smoke: {"mes\\x1bsage": hi}\n', (), None, "smoke"),
}
LOCAL_CASES = {
    "a thousand local processes": (BASE, ("resources.nodes=1000",), "resources.nodes"),
}


def attempt(tmp_path: Path, text, overrides=(), profile=None):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_bytes(text if isinstance(text, bytes) else text.encode())
    cluster = "local_slurm"
    if profile is not None:
        cluster = str(tmp_path / "profile.yaml")
        Path(cluster).write_text(profile)
    spec, _ = load_spec(spec_file, tuple(overrides))
    plan = make_plan(spec, load_cluster(cluster), source=str(spec_file), limits={"MaxArraySize": 11})
    return plan, sbatch_texts(plan)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_table(tmp_path, case):
    text, overrides, profile, expected = CASES[case]
    before = set(tmp_path.parent.iterdir())
    if expected == "accepted":
        plan, texts = attempt(tmp_path, text, overrides, profile)
        for script in (t for scripts in texts.values() for t in scripts):
            header = script.split("\n# command", 1)[0]
            assert all(ln.startswith(("#SBATCH", "#!")) or not ln.strip() or ln.startswith("#")
                       for ln in header.splitlines()[:1] + [ln for ln in header.splitlines() if "--" in ln])
            assert "CANARY" not in script
        return
    with pytest.raises(SpecError) as e:
        attempt(tmp_path, text, overrides, profile)
    message = str(e.value)
    fields = [f for f, _ in e.value.problems]
    if expected == "YAML":
        assert "malformed YAML" in message and "undefined" not in message, message
    else:
        assert any(f == expected or f.startswith(expected + ".") or f.startswith(expected + "[") for f in fields), \
            (fields, message)
    assert SECRET not in message and HF not in message
    assert "\n" not in "".join(msg for _, msg in e.value.problems)  # one line per problem: nothing injected
    assert set(tmp_path.parent.iterdir()) == before and not (REPO / "outside").exists()
    assert not Path("/tmp/CANARY").exists() and not (REPO / "CANARY").exists()


@pytest.mark.parametrize("case", sorted(LOCAL_CASES))
def test_local_executor_is_bounded_by_this_machine(tmp_path, case):
    text, overrides, expected = LOCAL_CASES[case]
    (tmp_path / "s.yaml").write_text(text)
    spec, _ = load_spec(tmp_path / "s.yaml", overrides)
    with pytest.raises(SpecError) as e:
        make_plan(spec, load_cluster("local"))
    assert expected in dict(e.value.problems) and "processes on this machine" in str(e.value)


def test_file_secret_must_be_private(tmp_path):
    secret = tmp_path / "hf_token"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o644)
    text = BASE + f"env: {{HF_TOKEN: '${{file:{secret}}}'}}\n"
    with pytest.raises(SpecError) as e:
        attempt(tmp_path, text)
    assert "env.HF_TOKEN" in dict(e.value.problems) and "chmod 600" in str(e.value) and SECRET not in str(e.value)
    secret.chmod(0o600)
    attempt(tmp_path, text)  # accepted: read inside the job only
    from core.config import resolve_refs

    assert resolve_refs(f"${{file:{secret}}}") == SECRET
    os.chmod(secret, 0o640)
    with pytest.raises(PermissionError):
        resolve_refs(f"${{file:{secret}}}")


def test_resume_refuses_a_folder_of_another_run(tmp_path):
    from core.run_folder import find_run, write_record

    spec, _ = load_spec(REPO / "jobs" / "tiny" / "smoke.yaml", (f"outputs.logs_dir={tmp_path}",))
    other = tmp_path / "elsewhere" / "1"
    other.mkdir(parents=True)
    write_record(other, {"name": "elsewhere"})
    with pytest.raises(ValueError, match="not a run of 'smoke'"):
        find_run(spec, str(other))
    mine = tmp_path / "smoke" / "2"
    mine.mkdir(parents=True)
    write_record(mine, {"name": "smoke"})
    assert find_run(spec, str(mine)) == mine.resolve()


def test_shell_in_accepted_values_never_runs_and_nothing_lands_outside_the_run_folder(slurm, tmp_path):
    """Values that are data (a message, an env value) may hold shell syntax: they travel in the job's pickle and
    environment, never through a shell, so the canary file is never created; every file the job writes is under
    its run folder."""
    import json

    from conftest import cli, final_state, record, run_folder

    canary = tmp_path / "CANARY"
    shell = f"$(touch {canary}) `touch {canary}`; touch {canary}"
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: canary\nworkload: smoke\nresources: {{time: 5}}\nsmoke: {{message: {json.dumps(shell)}}}\n"
                    f"env: {{GREETING: {json.dumps(shell)}}}\noutputs: {{logs_dir: {tmp_path / 'logs'}}}\n")
    before = set(tmp_path.iterdir())
    res = cli("submit", str(spec), "-c", "local_slurm")
    assert res.returncode == 0, res.stderr
    run_dir = run_folder(res.stdout)
    assert final_state(record(run_dir)["steps"][0]["job_ids"][0]) == "COMPLETED"
    (task,) = [json.loads(p.read_text()) for p in (run_dir / "tasks").glob("*.json")]
    assert task["result"]["message"] == shell  # the text arrived as text
    assert not canary.exists()
    assert set(tmp_path.iterdir()) - before == {tmp_path / "logs"}
    outside = [p for p in (tmp_path / "logs").rglob("*")
               if not (p == run_dir or run_dir in p.parents or p.parent == tmp_path / "logs" or p.name == "latest")]
    assert outside == [], outside
