"""Dia-Pangu: model shapes, the image block, metrics, dataset errors, and training + evaluation through the local
Slurm on 2 ranks under ZeRO-3 (frozen parts unchanged, trainable-only checkpoints, requeue, one CSV row per case)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import (cli, final_state, job_mark, new_jobs, rank0_result, record, requeue_once_checkpointed, log_tails,
                      run_folder, submit_run)

SPEC = "jobs/tiny/dia_pangu.yaml"


# ---------------------------------------------------------------- shapes on the meta device
def test_full_size_vit3d_perceiver_and_fc_parameter_counts():
    import torch

    from core.models.perceiver import PerceiverResampler
    from core.models.vit3d import ViT3D

    with torch.device("meta"):
        vit, per = ViT3D(), PerceiverResampler()
    patch = 3 * 32 * 32 * 4                                   # 12288 values per 32x32x4 patch
    embed = 2 * patch + patch * 768 + 768 + 2 * 768           # LN, Linear(12288, 768), LN
    pos = (16 + 16 + 128) * 256                               # RadFM's tables for a 512^3 design volume
    attn = 2 * 768 + 768 * 3 * 512 + 512 * 768 + 768          # PreNorm LN, qkv (no bias), out
    ff = 2 * 768 + 768 * 2048 + 2048 + 2048 * 768 + 768       # PreNorm LN, 768->2048->768
    assert sum(p.numel() for p in vit.parameters()) == embed + pos + 12 * (attn + ff) == 66_208_000  # no final LN
    assert vit.cfg.tokens == 1024 and vit.cfg.grid == (8, 8, 16) and vit.cfg.table_rows == (16, 16, 128)
    p_attn = 4 * 768 + 768 * 512 + 768 * 1024 + 512 * 768     # 2 LN, q, kv, out (no biases)
    p_ff = 2 * 768 + 2 * 768 * 3072                           # LN, x4 feed-forward without biases
    total = 32 * 768 + 6 * (p_attn + p_ff) + 2 * 768          # latents, layers, final LN (no media position)
    assert sum(p.numel() for p in per.parameters()) == total == 37_802_496


def test_position_table_is_read_with_radfm_strides():
    import torch

    from core.models.vit3d import ViT3D

    with torch.device("meta"):
        vit = ViT3D()
    rows = vit.pos_embedding.rows_for
    assert rows(8, 16, "cpu").tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert rows(16, 128, "cpu").tolist() == list(range(7, 128, 8))


# ---------------------------------------------------------------- the image block
@pytest.fixture(scope="module")
def tiny_model(tiny_pangu):
    import torch

    from core.models.dia_pangu import DiaPangu
    from core.models.pangu import load_pangu, load_tokenizer
    from core.models.perceiver import TINY_PERCEIVER
    from core.models.vit3d import TINY_VIT

    tok = load_tokenizer(tiny_pangu)
    torch.manual_seed(0)
    model = DiaPangu(load_pangu(tiny_pangu, dtype=torch.float32), tok, TINY_VIT, TINY_PERCEIVER, train_head=True)
    return model.eval(), tok  # eval: no dropout in the ViT, so two passes over one volume agree


def test_image_token_embeddings_are_the_projected_latents_and_labels_are_ignored(tiny_model):
    import torch

    from core.data.ctrg import Case
    from core.config import load_spec
    from core.workloads.dia_reports import Prompts

    model, tok = tiny_model
    spec, _ = load_spec(SPEC)
    case = Case("x", "There is a right pleural effusion.", [0] * 9 + [1] + [0] * 4, Path("unused"))
    ids, labels = Prompts(tok, model, spec).training(case)
    volume = torch.rand(1, 3, 32, 32, 8)
    _, latents = model.encode(volume)
    emb = model.embed(ids, latents)
    pos = [int(i) for i in (ids[0] >= model.image_first).nonzero() if ids[0, i] < model.image_first + 32]
    assert len(pos) == 32 and pos == list(range(2, 34))  # after BOS and <image>
    assert torch.equal(emb[0, pos], latents[0])
    assert ids[0, 1] == model.image_open and ids[0, 34] == model.image_close
    assert torch.equal(emb[0, 1], model.markers.weight[0]) and torch.equal(emb[0, 34], model.markers.weight[1])
    text = tok.decode(ids[0, 35:][labels[0, 35:] == -100])
    assert 'The "pleural effusion" is positive.' in text and 'The "cardiomegaly" is negative.' in text
    assert text.strip().endswith("any abnormalities is essential.")  # Dia-LLaMA's instruction closes the prompt
    assert text.index('"no finding"') < text.index("Based on the above visual information")
    report = labels[0][labels[0] != -100]
    assert report[-1] == tok.eos_token_id and (labels[0, :35] == -100).all()
    assert tok.decode(report[:-1]).strip() == case.finding


def test_disease_call_uses_the_training_feature_path(tiny_model):
    import torch

    model, _ = tiny_model
    volume = torch.rand(2, 3, 32, 32, 8)
    calls, _ = model.predict_diseases(volume)
    visual = model.vit(volume)
    logits = model.disease(visual)
    assert torch.equal(calls, logits.argmax(-1)) and calls.shape == (2, 14)


def test_init_from_tiny_dia_llama_checkpoint_loads_every_tensor_and_refuses_leftovers(tiny_model, tmp_path):
    import torch
    from safetensors.torch import save_file

    from core.models.dia_pangu import DiaCheckpointError, load_dia_llama, to_dia_llama, vision_state

    model, _ = tiny_model
    state = {k: torch.randn_like(v) for k, v in to_dia_llama(model).items()}
    state["embedding_layer.weight"] = torch.zeros(16, 64)
    state["lang_model.base_model.model.lm_head.weight"] = torch.zeros(16, 64)
    (tmp_path / "folder").mkdir()
    save_file(state, str(tmp_path / "folder" / "model.safetensors"))
    before = {k: v.clone() for k, v in vision_state(model).items()}
    try:
        report = load_dia_llama(model, tmp_path / "folder")  # a folder holding model.safetensors
        after = to_dia_llama(model)
        assert all(torch.equal(after[k], state[k]) for k in after)
        assert report["counts"] == {"loaded": len(after), "unused": 2}
        assert {u["key"] for u in report["unused"]} == {"embedding_layer.weight", "lang_model.*"}
        bad = dict(state, **{"embedding_layer.extra": torch.zeros(1)})
        save_file(bad, str(tmp_path / "bad.safetensors"))
        with pytest.raises(DiaCheckpointError, match=r"1 key\(s\) not known: embedding_layer.extra"):
            load_dia_llama(model, tmp_path / "bad.safetensors")
    finally:
        with torch.no_grad():
            for k, v in vision_state(model).items():
                v.copy_(before[k])


# ---------------------------------------------------------------- metrics
def test_report_metrics_identical_and_pinned():
    from core.metrics import report_metrics

    refs = {"a": "there is a small right pleural effusion with atelectasis .",
            "b": "the heart size is normal and the lungs are clear ."}
    same = report_metrics(refs, refs)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in same.values()), same
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in report_metrics(refs, refs, tokenize="raw").values())
    pinned = report_metrics(refs, {"a": "there is a pleural effusion .", "b": "the heart is enlarged ."})  # PTB
    expected = {"BLEU-1": 0.29261598909755715, "BLEU-2": 0.23461473794521265, "BLEU-3": 0.15360206361241102,
                "BLEU-4": 2.511193149717911e-05, "METEOR": 0.18732143608718646, "ROUGE-L": 0.5385566960395081}
    for k, v in expected.items():
        assert pinned[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_clinical_precision_recall_f1_by_hand():
    from core.metrics import clinical_prf

    truth = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    pred = [[1, 1, 0], [0, 1, 0], [0, 1, 1]]
    # micro: TP = 3 (r0d0, r1d1, r2d1), FP = 2 (r0d1, r2d2), FN = 2 (r0d2, r2d0)
    out = clinical_prf(truth, pred, ["a", "b", "c"])
    assert out["micro_precision"] == pytest.approx(3 / 5) and out["micro_recall"] == pytest.approx(3 / 5)
    assert out["micro_f1"] == pytest.approx(3 / 5)
    # per disease: a P=1 R=1/2 F=2/3; b P=2/3 R=1 F=4/5; c P=0 R=0 F=0 -> macro F1 = (2/3 + 4/5) / 3
    assert out["per_disease_f1"] == pytest.approx({"a": 2 / 3, "b": 4 / 5, "c": 0.0})
    assert out["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 3)


# ---------------------------------------------------------------- dataset errors, before anything is submitted
@pytest.fixture
def dataset(tmp_path):
    from core.data.ctrg import write_synthetic

    return write_synthetic(tmp_path / "ctrg", n_train=4, n_val=1, n_test=2)


def _submit_with(paths, tmp_path):
    return cli("submit", SPEC, "-c", "local_slurm", "--set", f"data.path={paths['data_dir']}",
               "--set", f"data.annotation={paths['annotation']}", "--set", f"data.labels_csv={paths['labels_csv']}",
               "--set", "data.make_synthetic=false", "--set", f"outputs.logs_dir={tmp_path}")


def test_missing_volume_is_refused_naming_the_file(slurm, dataset, tmp_path):
    (dataset["data_dir"] / "ct0001.nii.gz").unlink()
    mark = job_mark()
    res = _submit_with(dataset, tmp_path)
    assert res.returncode != 0 and "id ct0001 (train) has no volume" in res.stderr and "ct0001.nii.gz" in res.stderr
    assert not new_jobs(mark)


def test_annotation_id_without_volume_and_missing_folder(slurm, dataset, tmp_path):
    ann = json.loads(dataset["annotation"].read_text())
    ann["test"].append({"id": "ghost", "finding": "x"})
    dataset["annotation"].write_text(json.dumps(ann))
    res = _submit_with(dataset, tmp_path)
    assert res.returncode != 0 and "id ghost (test) has no volume" in res.stderr
    res = _submit_with({**dataset, "data_dir": tmp_path / "nowhere"}, tmp_path)
    assert res.returncode != 0 and "nowhere: volume folder not found" in res.stderr


def test_labels_csv_without_a_disease_column(slurm, dataset, tmp_path):
    rows = list(csv.DictReader(dataset["labels_csv"].open()))
    with dataset["labels_csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in rows[0] if c != "edema"])
        w.writeheader()
        w.writerows([{k: v for k, v in r.items() if k != "edema"} for r in rows])
    res = _submit_with(dataset, tmp_path)
    assert res.returncode != 0 and "labels.csv: no column for disease(s) ['edema']" in res.stderr


def test_volume_of_the_wrong_dimensionality(slurm, dataset, tmp_path):
    import nibabel as nib
    import numpy as np

    bad = dataset["data_dir"] / "ct0002.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), np.eye(4)), str(bad))
    res = _submit_with(dataset, tmp_path)
    assert res.returncode != 0 and "ct0002.nii.gz: a CT volume must have 3 dimensions" in res.stderr


# ---------------------------------------------------------------- through Slurm, 2 ranks, ZeRO-3
@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_pangu, tiny_chexbert):
    from core.data.ctrg import write_synthetic

    root = tmp_path_factory.mktemp("dia")
    return {"model": tiny_pangu, **write_synthetic(root / "ctrg", n_test=12), "root": root, "chexbert": tiny_chexbert}


def dia_args(workdir, name, *extra):
    """submit.py's arguments for the tiny Dia-Pangu on the test's model and data, 2 nodes of the local Slurm."""
    return (SPEC, "-c", "local_slurm", "--set", f"name={name}", "--set", f"model.path={workdir['model']}",
            "--set", "model.make_tiny=false", "--set", f"data.path={workdir['data_dir']}",
            "--set", f"data.annotation={workdir['annotation']}", "--set", f"data.labels_csv={workdir['labels_csv']}",
            "--set", "data.make_synthetic=false", "--set", f"outputs.logs_dir={workdir['root'] / 'logs'}",
            "--set", f"dia.chexbert={workdir['chexbert']}", "--set", "resources.nodes=2", *extra)


@pytest.fixture(scope="module")
def trained(slurm, workdir):
    run_dir, job = submit_run(*dia_args(workdir, "dia", "--set", "train.steps=60", "--set", "train.checkpoint_every=30"))
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    return run_dir


def test_two_rank_zero3_training_loss_decreases_and_disease_call_beats_chance(trained):
    rows = list(csv.DictReader((trained / "metrics.csv").open()))
    loss = [float(r["loss"]) for r in rows]
    assert len(loss) == 60 and sum(loss[-10:]) / 10 < sum(loss[:10]) / 10
    contrastive = [float(r["contrastive_loss"]) for r in rows]
    assert max(contrastive[-10:]) < min(contrastive[:3])
    out = list(csv.DictReader((trained / "results" / "dia-pangu.csv").open()))
    from core.data.ctrg import CONDITIONS

    k = CONDITIONS.index("pleural effusion")
    hits = sum(json.loads(r["GT_labels"])[k] == json.loads(r["Pred_labels"])[k] for r in out)
    assert len(out) == 12 and hits >= 10  # chance is 6 of 12 (P(>= 10 of 12 | chance) < 2%)
    metrics = json.loads((trained / "results" / "metrics.json").read_text())
    assert set(metrics) >= {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "head_micro_precision", "head_micro_recall",
                            "head_micro_f1", "ce_precision_micro", "ce_recall_micro", "ce_f1_micro", "ce_f1_macro"}
    assert metrics["nlg_tokenization"] == "raw" and metrics["nlg_raw"]["BLEU-4"] == metrics["BLEU-4"]
    assert metrics["ce_num_examples"] == 12 and all(len(json.loads(r["Pred_chexbert"])) == 14 for r in out)
    assert rank0_result(trained)["activation_checkpointing"] is True
    assert (trained / "results" / "metrics.png").stat().st_size > 1000
    hosts = {json.loads(p.read_text())["host"] for p in (trained / "tasks").glob("main.rank*.json")}
    assert hosts == {"n1", "n2"}


def test_frozen_parts_do_not_change_and_checkpoints_hold_only_trainable_tensors(trained, tmp_path):
    res = rank0_result(trained)
    assert res["frozen_checksum_before"] == res["frozen_checksum_after"] != 0
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(trained / "checkpoints"), tag="step00000060")
    assert state and not any(k.startswith(("llm.", "vit.")) for k in state)
    assert {k.split(".")[0] for k in state} == {"perceiver", "fc", "disease", "markers"}
    assert not any(k.startswith("disease.group_cls_head") for k in state)  # loaded from Dia-LLaMA, never trained


def test_requeue_in_the_middle_resumes_and_results_have_one_row_per_case(slurm, workdir):
    run_dir, job = submit_run(*dia_args(workdir, "dia_requeue", "--set", "train.steps=60",
                                        "--set", "train.checkpoint_every=10"))
    requeue_once_checkpointed(run_dir, job, timeout=300)
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    res = rank0_result(run_dir)
    assert res["start_step"] > 0 and res["steps"] == 60 and res["restart_count"] >= 1
    ids = [r["ID"] for r in csv.DictReader((run_dir / "results" / "dia-pangu.csv").open())]
    assert len(ids) == len(set(ids)) == 12
    steps = [int(r["step"]) for r in csv.DictReader((run_dir / "metrics.csv").open())]
    assert steps == list(range(1, 61))


def test_pruned_llm_evaluated_with_the_trained_dia_pangu(slurm, trained, workdir):
    """Post-pruning evaluation of the lab's task: the trained run's perceiver and disease head on top of each pruned
    LLM; ratio 0 reproduces the trained run's disease calls exactly (frozen ViT and trained tensors restored)."""
    import pandas as pd

    res = cli("submit", "jobs/tiny/pangu_prune.yaml", "-c", "local_slurm", "--set", f"model.path={workdir['model']}",
              "--set", "model.make_tiny=false", "--set", "prune.layers=[1]", "--set", f"prune.dia_run={trained}",
              "--set", "prune.dia_eval_limit=4", "--set", f"outputs.logs_dir={workdir['root'] / 'logs'}")
    assert res.returncode == 0, res.stderr
    run_dir = run_folder(res.stdout)
    merge = [s for s in record(run_dir)["steps"] if s["name"] == "merge"][0]["job_ids"][0]
    assert final_state(merge) == "COMPLETED"
    table = pd.read_csv(run_dir / "pruning_eval.csv")
    assert list(table["layers"]) == [3, 4] or list(table["layers"]) == [4, 3]
    for col in ("dia_BLEU-4", "dia_METEOR", "dia_ROUGE-L", "dia_head_micro_f1"):
        assert table[col].notna().all()
    unpruned = list(csv.DictReader((run_dir / "dia_eval" / "ratio_0.00" / "dia-pangu.csv").open()))
    trained_rows = {r["ID"]: r for r in csv.DictReader((trained / "results" / "dia-pangu.csv").open())}
    assert len(unpruned) == 4
    assert all(r["Pred_labels"] == trained_rows[r["ID"]]["Pred_labels"] for r in unpruned)
    pruned = list(csv.DictReader((run_dir / "dia_eval" / "ratio_layers" / "dia-pangu.csv").open()))
    assert len(pruned) == 4
