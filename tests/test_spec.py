"""Spec and profile validation: every bad input names the file, the field and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.config import SpecError, load_cluster, load_spec, parse_minutes, resolve_refs

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "jobs" / "tiny" / "smoke.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def problems(exc: SpecError) -> dict[str, str]:
    return dict(exc.problems)


def test_smoke_spec_loads_with_defaults():
    spec, raw = load_spec(SMOKE)
    assert spec.name == "smoke" and spec.workload == "smoke"
    assert spec.resources.nodes == 1 and spec.resources.minutes == 5
    assert spec.outputs.logs_dir == "logs" and spec.deepspeed is None
    assert raw["smoke"]["message"] == spec.smoke.message


def test_unknown_key_suggests_closest(tmp_path):
    p = write(tmp_path, "name: a\nworkload: smoke\nresources:\n  nodse: 2\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = problems(e.value)["resources.nodse"]
    assert "did you mean 'nodes'" in msg and "Valid keys here" in msg
    assert str(p) in str(e.value)


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, "name: a\nworkload: smoke\ndeepspeeed: {stage: 3}\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert "did you mean 'deepspeed'" in problems(e.value)["deepspeeed"]


def test_wrong_type_and_negative_nodes(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: a\nworkload: smoke\nresources: {nodes: two}\n"))
    assert "integer" in problems(e.value)["resources.nodes"] and "'two'" in problems(e.value)["resources.nodes"]
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: a\nworkload: smoke\nresources: {nodes: -2}\n"))
    assert "greater than 0" in problems(e.value)["resources.nodes"]


def test_missing_file_and_missing_profile(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "nope.yaml")
    assert "not found" in str(e.value) and "nope.yaml" in str(e.value)
    with pytest.raises(SpecError) as e:
        load_cluster("no_such_cluster")
    assert "no_such_cluster.yaml" in str(e.value) and "local_slurm" in str(e.value)


def test_malformed_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "name: a\nworkload: smoke\nresources:\n  nodes: 1\n   time: 5\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert "malformed YAML at line 5" in str(e.value)


def test_unknown_workload_suggests(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: a\nworkload: smok\n"))
    assert "did you mean 'smoke'" in problems(e.value)["workload"]


def test_literal_secret_refused_env_reference_allowed(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: a\nworkload: smoke\nenv:\n  WANDB_API_KEY: abcdef123456\n"))
    assert "env.WANDB_API_KEY" in problems(e.value) and "${env:" in str(e.value)
    with pytest.raises(SpecError):
        load_spec(write(tmp_path, "name: a\nworkload: smoke\ndata: {}\nenv: {HF_TOKEN: hf_xyz}\n"))
    spec, raw = load_spec(write(tmp_path, "name: a\nworkload: smoke\nenv:\n  HF_TOKEN: ${env:HF_TOKEN}\n"))
    assert spec.env["HF_TOKEN"] == "${env:HF_TOKEN}"  # unresolved until inside the job
    assert resolve_refs(spec.env["HF_TOKEN"], {"HF_TOKEN": "s3cr3t"}) == "s3cr3t"
    with pytest.raises(KeyError, match="HF_TOKEN"):
        resolve_refs("${env:HF_TOKEN}", {})


def test_overrides_are_typed_by_the_schema():
    spec, raw = load_spec(SMOKE, ("resources.nodes=2", "name=try2", "resources.time=01:30:00"))
    assert spec.resources.nodes == 2 and isinstance(spec.resources.nodes, int)
    assert spec.name == "try2" and spec.resources.minutes == 90
    assert raw["resources"]["nodes"] == 2
    with pytest.raises(SpecError) as e:
        load_spec(SMOKE, ("resources.node=2",))
    assert "did you mean 'resources.nodes'" in str(e.value) and e.value.source == "--set"
    with pytest.raises(SpecError) as e:
        load_spec(SMOKE, ("resources.nodes=abc",))
    assert "resources.nodes" in problems(e.value)


def test_array_spec_validation(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: a\nworkload: smoke\nresources: {array: {items: []}}\n"))
    assert "empty" in str(e.value)
    spec, _ = load_spec(write(tmp_path, "name: a\nworkload: smoke\nresources: {array: {items: [a, b], merge: true}}\n"))
    assert spec.resources.array.item_list() == ["a", "b"]


@pytest.mark.parametrize("text,minutes", [(90, 90), ("90", 90), ("01:30:00", 90), ("1-00:00:00", 1440),
                                          ("30:00", 30), ("00:00:30", 1), ("2-01:00", 2940)])
def test_parse_minutes(text, minutes):
    assert parse_minutes(text) == minutes


def test_bad_time_rejected(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: a\nworkload: smoke\nresources: {time: soon}\n"))
    assert "HH:MM:SS" in problems(e.value)["resources.time"]


def test_all_shipped_profiles_and_specs_validate():
    for p in (REPO / "cluster_configs").glob("*.yaml"):
        c = load_cluster(str(p))
        assert c.name == p.stem
    from core.study import is_study, load_study

    studies = 0
    for p in (REPO / "jobs").rglob("*.yaml"):
        if is_study(p):  # a study spec: its schema, steps, references and spec files (its dry-run tests plan them)
            load_study(p)
            studies += 1
        else:
            load_spec(p)
    assert studies == 2


def test_workload_sections_and_shared_sections_are_checked_through_the_registry(tmp_path):
    """A workload's own section is declared by its module; another workload's section, a train:/peft: section on a
    workload that does not train, and unknown named models are refused naming the field."""
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: a\nworkload: smoke\nscan: {prompts: p.txt}\n"))
    assert "belongs to workload 'sensitivity'" in problems(e.value)["scan"]
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: a\nworkload: smoke\ntrain: {steps: 3}\n"))
    assert "does not" in str(e.value) and "train" in str(e.value)
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: a\nworkload: lm_finetune\nmodels: {teacher: {path: x}}\n"))
    assert "unknown: ['teacher']" in str(e.value)
    spec, _ = load_spec(write(tmp_path, "name: a\nworkload: lm_finetune\npeft: {r: 4}\n"))
    assert spec.train.steps == 100 and spec.peft.r == 4 and spec.peft.target_modules[0] == "q_proj"
    with pytest.raises(SpecError) as e:  # the workload's data schema: CTRG fields only where the workload reads CTRG
        load_spec(write(tmp_path, "name: a\nworkload: lm_finetune\ndata: {annotation: a.json}\n"))
    assert "data.annotation" in problems(e.value)
    spec, _ = load_spec(REPO / "jobs" / "tiny" / "dia_pangu.yaml", ("workload=dia_pangu", "data.annotation=x.json"))
    assert spec.data.annotation == "x.json" and spec.section is spec.dia


def test_only_the_registry_reaches_workloads_and_the_engine_knows_no_model_or_scheduler():
    import ast

    for path in (REPO / "core").rglob("*.py"):
        if path.parent.name == "workloads":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("core.workloads.") for n in names), f"{path} imports a workload: {names}"
    engine = (REPO / "core" / "engine.py").read_text()
    assert "core.models" not in engine and "scontrol" not in engine and "SLURM_" not in engine


def test_set_reaches_into_named_models():
    spec, _ = load_spec(REPO / "jobs" / "tiny" / "gigapath_distill.yaml", ("models.teacher.path=/x/teacher",))
    assert spec.models["teacher"].path == "/x/teacher"
    with pytest.raises(SpecError) as e:
        load_spec(REPO / "jobs" / "tiny" / "gigapath_distill.yaml", ("models.teacher.pth=/x",))
    assert "did you mean 'path'" in str(e.value)
