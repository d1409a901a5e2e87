"""Plans: array chunking under MaxArraySize, merge dependencies, limits, DeepSpeed memory estimates."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.model_sizes import PRESETS
from core.models.pangu import meta_size
from core.plan import chunk_ranges, make_plan
from core.config import SpecError, load_cluster, load_spec

REPO = Path(__file__).resolve().parent.parent
ARRAY = REPO / "jobs" / "tiny" / "smoke_array.yaml"


@pytest.mark.parametrize("n,size", [(1, 11), (11, 11), (12, 11), (25, 11), (2500, 1001)])
def test_chunks_cover_every_task_once(n, size):
    chunks = chunk_ranges(n, size)
    covered = [i for a, b in chunks for i in range(a, b)]
    assert covered == list(range(n))
    assert all(0 < b - a <= size for a, b in chunks)
    assert len(chunks) == -(-n // size)


def test_array_plan_chunks_and_merge():
    spec, _ = load_spec(ARRAY)
    plan = make_plan(spec, load_cluster("local_slurm"), limits={"MaxArraySize": 11})
    main, merge = plan.steps
    assert main.n_tasks == 25 and main.chunks == [(0, 11), (11, 22), (22, 25)]
    assert merge.after == ["main"] and merge.entry == "merge" and not merge.is_array
    assert main.parallelism == 1  # throttle 4 shared by 3 arrays
    assert "3 Slurm arrays" in plan.describe()


def test_items_per_task_groups_items():
    spec, _ = load_spec(ARRAY, ("resources.array.items=7", "resources.array.items_per_task=3",
                                "resources.array.parallelism=2"))
    plan = make_plan(spec, load_cluster("local_slurm"), limits={"MaxArraySize": 11})
    assert plan.steps[0].task_items == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan.steps[0].chunks == [(0, 3)] and plan.steps[0].parallelism == 2


def test_array_over_job_limit_cannot_be_chunked():
    spec, _ = load_spec(ARRAY, ("resources.array.items=3000",))
    with pytest.raises(SpecError) as e:
        make_plan(spec, load_cluster("local_slurm"), source="x.yaml", limits={"MaxArraySize": 11})
    msg = dict(e.value.problems)["resources.array"]
    assert "limit of 2000" in msg and "items_per_task to at least 2" in msg
    spec, _ = load_spec(ARRAY, ("resources.array.items=3000", "resources.array.items_per_task=2"))
    assert make_plan(spec, load_cluster("local_slurm"), limits={"MaxArraySize": 11}).steps[0].n_tasks == 1500


def test_local_executor_runs_nodes_as_processes():
    spec, _ = load_spec(REPO / "jobs" / "tiny" / "smoke.yaml", ("resources.nodes=2",))
    plan = make_plan(spec, load_cluster("local"))
    assert plan.steps[0].nodes == 1 and plan.steps[0].tasks_per_node == 2
    assert "2 processes" in plan.describe()


def test_tasks_per_node_default_and_limit_on_accelerator_profiles():
    spec, _ = load_spec(REPO / "jobs" / "tiny" / "smoke.yaml", ("resources.tasks_per_node=null",))
    plan = make_plan(spec, load_cluster("ascend_910b"))
    assert plan.steps[0].tasks_per_node == 8
    spec, _ = load_spec(REPO / "jobs" / "tiny" / "smoke.yaml", ("resources.tasks_per_node=9",))
    with pytest.raises(SpecError, match="at most 8"):
        make_plan(spec, load_cluster("cuda_a100"))


def test_openpangu_parameter_count_matches_transformers_on_meta():
    """The estimate's size of the preset (its builder, on the meta device) is openPangu-7B's real count,
    8,030,887,936, and its largest module is the embedding (vocab x hidden, DeepSpeed's definition)."""
    size = meta_size(PRESETS["openpangu-7b"])
    assert size.total == 8_030_887_936
    assert size.largest_module == 153376 * 4096
    assert (size.layers, size.hidden, size.heads, size.vocab) == (34, 4096, 32, 153376)


def _ds_spec(*sets):
    return load_spec(REPO / "jobs" / "tiny" / "smoke.yaml", ("model.preset=openpangu-7b", "model.seq_len=1024",
                                                             "resources.nodes=2", "resources.tasks_per_node=null",
                                                             *sets))


def test_memory_estimate_frozen_pangu_zero3_fits_910b():
    spec, _ = _ds_spec("model.trainable=60000000", "deepspeed.stage=3")
    plan = make_plan(spec, load_cluster("ascend_910b"))
    m = plan.memory
    assert m is not None and m.fits
    # frozen bf16 weights sharded over 16 NPUs plus the one module gathered at a time (the 153k x 4096 embedding),
    # weights only: 2 bytes each, not DeepSpeed's 4 (weights + gradients) for a module that trains
    from core.models.pangu import decoder_size

    size = decoder_size(spec)
    frozen = size.total - 60_000_000
    assert size.largest_module == 153_376 * 4096 == 628_228_096
    assert m.frozen == frozen * 2 / 16 + size.largest_module * 2 and 0.9e9 < frozen * 2 / 16 < 1.0e9
    assert "GiB/device of 64 GiB" in plan.describe()


def test_memory_estimate_refuses_full_finetune_without_zero_and_force_overrides():
    spec, _ = _ds_spec("deepspeed.stage=0")
    with pytest.raises(SpecError) as e:
        make_plan(spec, load_cluster("ascend_910b"), source="job.yaml")
    assert "does not fit" in str(e.value) and "--force" in str(e.value)
    plan = make_plan(spec, load_cluster("ascend_910b"), force=True)
    assert plan.memory.total > 64 * 1024 ** 3 and any("--force" in n for n in plan.notes)
    # ZeRO-3 over 16 devices brings the same full fine-tune's model states down 16x (DeepSpeed's 18 B/param / N,
    # plus the gathered largest layer and DeepSpeed's 5e8-element reduce bucket in bf16)
    z3, _ = _ds_spec("deepspeed.stage=3")
    m3 = make_plan(z3, load_cluster("ascend_910b"), force=True).memory
    assert m3.model_states == pytest.approx(4 * 628_228_096 + 18 * 8_030_887_936 / 16 + 2 * 500_000_000, rel=1e-6)
    # fp32 keeps 4-byte parameter replicas: 2 more bytes per parameter than DeepSpeed's 16-bit estimate
    f32, _ = _ds_spec("deepspeed.stage=3", "deepspeed.precision=fp32")
    m32 = make_plan(f32, load_cluster("ascend_910b"), force=True).memory
    assert m32.model_states - m3.model_states == pytest.approx(2 * 8_030_887_936 / 16 + 2 * 500_000_000, rel=1e-6)


# ---------------------------------------------------------------- limits from the cluster that answers, ports, ZeRO
def test_scontrol_limits_count_only_on_the_cluster_the_profile_names(slurm):
    """The local cluster (ClusterName ci) answers scontrol here: its MaxArraySize (11) splits local_slurm's arrays,
    but not those of ascend_910b / cuda_a100, which name no cluster, nor of a profile naming another cluster."""
    from core import scheduler

    sched = scheduler.for_cluster(load_cluster("local_slurm"))
    assert sched.limits(load_cluster("local_slurm"))["MaxArraySize"] == 11
    assert sched.limits(load_cluster("ascend_910b")) == {}
    local = load_cluster("local_slurm")
    other = local.model_copy(update={"slurm": local.slurm.model_copy(update={"cluster_name": "elsewhere"})})
    assert sched.limits(other) == {}
    spec, _ = load_spec(ARRAY)
    assert len(make_plan(spec, load_cluster("local_slurm")).steps[0].chunks) == 3
    assert make_plan(spec, load_cluster("cuda_a100")).steps[0].chunks == [(0, 25)]


@pytest.mark.parametrize("port,ok", [(60000, True), (61440, True), (61441, False), (70000, False), (80, False)])
def test_hccl_base_port_leaves_room_for_all_sixteen_job_windows(tmp_path, port, ok):
    """A job's HCCL ports are base + (job id % 16) x 256 + 256 for 16 devices: base + 4095 must be a port."""
    text = (REPO / "cluster_configs" / "ascend_910b.yaml").read_text().replace("hccl_if_base_port: 60000",
                                                                               f"hccl_if_base_port: {port}")
    assert f"hccl_if_base_port: {port}" in text
    (tmp_path / "p.yaml").write_text(text)
    if ok:
        assert load_cluster(str(tmp_path / "p.yaml")).hccl_if_base_port == port
    else:
        with pytest.raises(SpecError) as e:
            load_cluster(str(tmp_path / "p.yaml"))
        assert "hccl_if_base_port" in str(e.value)


def test_the_plan_says_which_zero_stage_and_precision_the_job_runs():
    spec, _ = load_spec(REPO / "jobs" / "dia_pangu.yaml")
    text = make_plan(spec, load_cluster("ascend_910b"), limits={}, keep_going=True).describe()  # data not here
    ds = spec.deepspeed
    assert f"  deepspeed: ZeRO-{ds.stage}, {ds.precision}, micro-batch {ds.micro_batch} x grad-accum {ds.grad_accum}" \
        in text


def test_slurm_keys_live_in_the_profiles_slurm_section_and_flat_ones_are_read_into_it(tmp_path):
    """A profile written before the slurm: section (partition, account, gres at the top) still loads, into the
    section, and renders the same #SBATCH lines; a key in both places is refused naming it."""
    import yaml

    from core.submit import sbatch_texts

    nested = yaml.safe_load((REPO / "cluster_configs" / "cuda_a100.yaml").read_text())
    flat = {k: v for k, v in nested.items() if k != "slurm"} | nested["slurm"]
    (tmp_path / "flat.yaml").write_text(yaml.safe_dump(flat))
    old, new = load_cluster(str(tmp_path / "flat.yaml")), load_cluster("cuda_a100")
    assert old.slurm.partition == "gpu" and old.slurm.gres == "gpu:{devices}" and old == new
    spec, _ = load_spec(ARRAY)
    assert sbatch_texts(make_plan(spec, old, limits={})) == sbatch_texts(make_plan(spec, new, limits={}))
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({**nested, "partition": "other"}))
    with pytest.raises(SpecError) as e:
        load_cluster(str(tmp_path / "both.yaml"))
    assert "partition given both at the top of the profile and under slurm:" in str(e.value)


def test_the_plan_promises_activation_checkpointing_only_where_the_job_switches_it_on():
    """BLIP applies no deepspeed.activation_checkpointing (only peft.gradient_checkpointing, through apply_peft):
    its plan line and estimate say so instead of promising it; Dia-Pangu applies it and the plan says it."""
    blip = REPO / "jobs" / "tiny" / "blip_medtrinity.yaml"
    spec, _ = load_spec(blip, ("deepspeed.activation_checkpointing=true",))
    text = make_plan(spec, load_cluster("cuda_a100"), limits={}, keep_going=True).describe()
    assert "activation checkpointing\n" not in text + "\n" and "does not apply it" in text
    assert spec.peft is not None  # the tiny BLIP spec trains LoRA adapters
    spec, _ = load_spec(blip, ("deepspeed.activation_checkpointing=true", "peft.gradient_checkpointing=true"))
    assert ", activation checkpointing" in make_plan(spec, load_cluster("cuda_a100"), limits={},
                                                     keep_going=True).describe()
    dia, _ = load_spec(REPO / "jobs" / "dia_pangu.yaml", ("deepspeed.activation_checkpointing=true",))
    assert ", activation checkpointing" in make_plan(dia, load_cluster("ascend_910b"), limits={},
                                                     keep_going=True).describe()


def test_the_plan_says_how_checkpoints_are_written_and_refuses_a_host_copy_that_cannot_fit(tmp_path, tiny_pangu):
    tiny = REPO / "jobs" / "tiny" / "pangu_lm.yaml"
    here = (f"model.path={tiny_pangu}", "model.make_tiny=false")   # (a fresh clone has no logs/tiny_models yet)
    notes = make_plan(load_spec(tiny, (*here, "train.checkpoint_every=10"))[0], load_cluster("local_slurm")).notes
    assert any(n.startswith("checkpoints: every 10 steps in the background") for n in notes)
    notes = make_plan(load_spec(tiny, (*here, "train.async_checkpoint=false"))[0], load_cluster("local_slurm")).notes
    assert any("written before training goes on" in n for n in notes)
    # openPangu-7B fully trained under ZeRO-3 on 2 x 8 NPUs: each node copies 8/16 of 12 B/param of optimizer
    # state plus (at most) 4 B/param of weights = 80.3 GB, which with DeepSpeed's host memory exceeds 64 GB nodes
    full = ("model.preset=openpangu-7b", "model.path=null", "deepspeed.stage=3", "deepspeed.precision=bf16",
            "resources.nodes=2", "resources.tasks_per_node=null")
    profile = yaml.safe_load((REPO / "cluster_configs" / "ascend_910b.yaml").read_text())
    small = tmp_path / "small_nodes.yaml"
    small.write_text(yaml.safe_dump({**profile, "name": "small_nodes", "mem_gb_per_node": 64}))
    with pytest.raises(SpecError) as e:
        make_plan(load_spec(tiny, full)[0], load_cluster(str(small)), source="job.yaml")
    msg = dict(e.value.problems)["train.async_checkpoint"]
    assert "74.8 GiB per node" in msg and "train.async_checkpoint: false" in msg
    plan = make_plan(load_spec(tiny, (*full, "train.async_checkpoint=false"))[0], load_cluster(str(small)))
    assert any("written before training goes on" in n for n in plan.notes)
