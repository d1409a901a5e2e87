"""ViTP lung classification: the lab's method (InternVL, `<cls>` question, ViTP's use_classifier loss) on a tiny
twin in OpenGVLab's original layout (strict loading, the loss by hand, InternVL's tiling, InternVL2.5-1B counted on
the meta device), dataset formats (folders + CSV, ViTP meta + jsonl with the lab's split files, DICOM series),
patient split and slice sampling, the timm baseline switch, bad input refused before submission, and training +
patient-level evaluation through the real local Slurm on 2 ranks (ZeRO-3 over gloo, requeue)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli, final_state, losses, rank0_result, requeue_once_checkpointed, run_folder, submit_run, log_tails

SPEC = "jobs/tiny/vitp_lung.yaml"
FULL = "jobs/vitp_lung.yaml"
STEPS = 200
PER_CLASS = (12, 12, 12, 17)      # 9 test patients (2, 2, 2, 3): 5 + 4 on two ranks, so one rank pads


# ---------------------------------------------------------------- shared data
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """53 synthetic patients in both formats (every 6th a DICOM series) and one corrupt PNG slice."""
    from core.data.lung_ct import write_synthetic

    root = tmp_path_factory.mktemp("lung")
    paths = write_synthetic(root / "ds", patients_per_class=PER_CLASS, dicom_every=6)
    victim = sorted((paths["slices"] / "P0001").glob("*.png"))[3]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return {**paths, "logs": root / "logs", "victim": victim, "internvl": root / "internvl"}


@pytest.fixture(scope="module")
def tiny_internvl(tmp_path_factory):
    """The tiny InternVL twin, in OpenGVLab's original layout (what model.make_tiny writes)."""
    from core.models.internvl import write_tiny

    return write_tiny(tmp_path_factory.mktemp("internvl") / "tiny")


def data_args(paths, fmt="folders"):
    return ("--set", "data.make_synthetic=false", "--set", f"data.format={fmt}",
            "--set", f"data.path={paths['slices']}", "--set", f"data.labels_csv={paths['labels_csv']}",
            "--set", f"data.meta={paths['meta']}", "--set", "data.meta_splits=null")


def vitp_args(paths, name, *extra, fmt="folders"):
    """submit.py's arguments for the tiny ViTP run (InternVL, <cls>) on the test's patients: 2 nodes of the local
    Slurm, ZeRO-3."""
    return (SPEC, "-c", "local_slurm", "--set", f"name={name}", *data_args(paths, fmt),
            "--set", f"model.path={paths['internvl']}",
            "--set", f"outputs.logs_dir={paths['logs']}", "--set", "resources.nodes=2", "--set", "deepspeed.stage=3",
            "--set", f"train.steps={STEPS}", "--set", "train.checkpoint_every=25", *extra)


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.fixture(scope="module")
def trained(slurm, dataset):
    """One 2-rank ZeRO-3 run (n1 + n2) on the folders format: the reference every other run is compared with."""
    run_dir, job = submit_run(*vitp_args(dataset, "vitp_ref"))
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    return run_dir


# ---------------------------------------------------------------- the model on the meta device
BASELINE = ("vitp.method=timm_classifier", "model.path=null", "model.preset=null", "model.make_tiny=false",
            "data.image_size=224", "model.seq_len=197")


def test_full_size_spec_counts_internvl2_5_1b_on_the_meta_device_and_the_dry_run_shows_it():
    import torch

    from core.config import load_spec
    from core.models import internvl as iv
    from core.workloads import get

    spec, _ = load_spec(FULL, ())
    size = get("vitp_lung").model_size(spec)
    model = iv.build(iv.native_config(iv.INTERNVL2_5_1B), meta=True)
    part = {k: sum(p.numel() for n, p in model.named_parameters() if n.startswith(k))
            for k in ("model.vision_tower", "model.multi_modal_projector", "model.language_model", "lm_head")}
    # InternViT-300M: patch conv + class token + 1025 positions + 24 blocks of 12,598,272
    assert part["model.vision_tower"] == 3 * 14 * 14 * 1024 + 1024 + 1024 + 1025 * 1024 + 24 * 12_598_272
    assert part["model.multi_modal_projector"] == 2 * 4096 + 4096 * 896 + 896 + 896 * 896 + 896   # mlp1
    # Qwen2.5-0.5B's 494,032,768 at vocab 151936, here at InternVL's 151674, and an untied lm_head
    assert part["model.language_model"] == 494_032_768 - (151936 - 151674) * 896
    assert part["lm_head"] == 151674 * 896
    assert size.total == sum(part.values()) == iv.INTERNVL2_5_1B_PARAMS == 938_193_024
    assert (size.layers, size.hidden, size.heads, size.vocab) == (48, 1024, 16, 151674)
    assert isinstance(model.model.language_model.layers[0].self_attn.k_proj, torch.nn.Linear)
    assert model.model.language_model.layers[0].self_attn.k_proj.weight.shape == (128, 896)   # 2 KV heads of 64
    # away from the data: the count and a memory estimate, then the missing folder, exit 2, nothing submitted
    res = cli("submit", FULL, "--dry-run")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "trainable: 938,193,024 of 938,193,024 parameters" in res.stdout
    assert "memory: est. " in res.stdout and "activation checkpointing" in res.stdout
    assert "model.path: /data/models/InternVL2_5-1B: InternVL model folder not found" in res.stderr
    # every missing input listed: the lab's meta json (its own split files, data.meta_splits)
    assert "data.meta: /data/lung_ct/ViTP_configs/ft_data_lung.json: not on this machine" in res.stderr
    assert "Traceback" not in res.stderr


def test_baseline_switch_counts_the_vit_b16_classifier_on_the_meta_device(dataset):
    import timm
    import torch

    from core.config import load_spec
    from core.workloads import get

    spec, _ = load_spec(FULL, BASELINE)
    size = get("vitp_lung").model_size(spec)
    with torch.device("meta"):
        ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=4)
    timm_count = sum(p.numel() for p in ref.parameters())
    # ViT-B/16's well-known 86,567,656 with the 1000-class head swapped for a 4-class one
    assert size.total == timm_count == 86_567_656 - (768 * 1000 + 1000) + (768 * 4 + 4) == 85_801_732
    assert (size.layers, size.hidden, size.heads, size.vocab) == (12, 768, 12, 4)
    sets = [a for kv in BASELINE for a in ("--set", kv)]
    res = cli("submit", FULL, "-c", "cuda_a100", "--dry-run", "--no-preflight", *sets, *data_args(dataset))
    assert res.returncode == 0, res.stderr
    est = float(res.stdout.split("memory: est. ")[1].split(" GiB/device")[0])
    assert 0 < est < 80 and "of 80 GiB" in res.stdout and "split by patient: train 35 / val 9 / test 9" in res.stdout
    res = cli("submit", FULL, "-c", "cuda_a100", "--dry-run", "--no-preflight", *sets, "--set", "model.seq_len=2048",
              *data_args(dataset))
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "model.seq_len" in res.stderr
    assert "set model.seq_len: 197" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------- InternVL: loading, prompt, loss, tiling
def test_internvl_original_layout_loads_strictly_and_a_missing_or_misshaped_tensor_is_refused(tiny_internvl,
                                                                                             tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from core.models import internvl as iv

    state = load_file(str(tiny_internvl / "model.safetensors"))
    # the original names: fused qkv, ls1/ls2, mlp1.0/1/3, language_model.model.* / language_model.lm_head
    assert "vision_model.encoder.layers.1.attn.qkv.weight" in state and "mlp1.3.bias" in state
    assert "vision_model.embeddings.class_embedding" in state and "vision_model.encoder.layers.0.ls2" in state
    assert "language_model.lm_head.weight" in state and not any(k.startswith("model.") for k in state)
    model, tok, cfg, report = iv.from_folder(tiny_internvl)
    assert report["unused"] == [] and report["loaded"] == len(model.state_dict())
    own = model.state_dict()
    qkv = state["vision_model.encoder.layers.1.attn.qkv.weight"]
    att = "model.vision_tower.encoder.layer.1.attention"
    assert torch.equal(torch.cat([own[f"{att}.{p}_proj.weight"] for p in "qkv"]), qkv)
    assert torch.equal(own["model.multi_modal_projector.linear_2.bias"], state["mlp1.3.bias"])
    assert torch.equal(own["lm_head.weight"], state["language_model.lm_head.weight"])

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(tiny_internvl, folder)
        st = dict(state)
        change(st)
        save_file(st, str(folder / "model.safetensors"))
        return folder

    extra = variant("extra", lambda st: st.update({"vision_model.extra.weight": torch.zeros(2)}))
    assert iv.from_folder(extra)[3]["unused"] == ["vision_model.extra.weight"]
    gone = variant("gone", lambda st: st.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(iv.InternVLCheckpointError, match=r"lacks 1 tensor\(s\) of the model \(first: "
                       r"language_model\.model\.layers\.1\.mlp\.up_proj\.weight") as e:
        iv.from_folder(gone)
    assert str(gone / "model.safetensors") in str(e.value) and e.value.field == "model.path"
    bent = variant("bent", lambda st: st.update({"mlp1.1.weight": torch.zeros(64, 128)}))
    with pytest.raises(iv.InternVLCheckpointError, match=r"mlp1\.1\.weight has shape \[64, 128\] but the model "
                       r"\(model\.multi_modal_projector\.linear_1\.weight\) needs \[64, 256\]") as e:
        iv.from_folder(bent)
    assert str(bent / "model.safetensors") in str(e.value)


def test_cls_loss_equals_a_hand_computation_on_one_batch(tiny_internvl):
    import numpy as np
    import torch

    from core.config import load_spec
    from core.models import internvl as iv
    from core.workloads.vitp_lung import InternVLInputs

    spec, _ = load_spec(SPEC, (f"model.path={tiny_internvl}",))
    model, tok, cfg, _ = iv.from_folder(tiny_internvl)
    inputs = InternVLInputs(spec, tok, cfg)
    assert inputs.question == "<image>\n<cls>: 0|1|2|3." and inputs.choices == ["0", "1", "2", "3"]
    # the prompt as ViTP's preprocess_internvl2_5 writes it: system, user with the image tokens, the answer
    ids, labels, pos = inputs.prompt(1, 2)
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[:3] == ["<|im_start|>", "system", "\n"] and toks.count("<|im_start|>") == 3
    user = toks.index("user") - 1
    assert toks[user - 2:user] == ["<|im_end|>", "\n"]
    assert toks[user:] == ["<|im_start|>", "user", "\n", "<img>", *["<IMG_CONTEXT>"] * 16, "</img>", "\n", "<", "cls",
                           ">", ":", " ", "0", "|", "1", "|", "2", "|", "3", ".", "<|im_end|>", "\n",
                           "<|im_start|>", "assistant", "\n", "2", "<|im_end|>", "\n"]
    assert toks[pos + 1] == "2" and toks[pos] == "\n"
    assert [t for t, l in zip(toks, labels) if l != -100] == ["2", "<|im_end|>"]   # the answer turn, no newline
    rng = np.random.default_rng(0)
    items = [inputs.iv.dynamic_tiles(rng.random((64, 64)), 32, 1, True, spec.data.mean, spec.data.std)
             for _ in range(3)]
    targets = [2, 0, 3]
    batch = inputs.batch(items, targets, "cpu", torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"]).logits.double()
        lm, cls, choice_logits = iv.cls_losses(logits, batch["labels"], batch["cls_positions"], inputs.choice_ids,
                                               batch["targets"], 0.01)
    # by hand: -log p of every labelled token given the tokens before it, averaged over the batch's tokens
    nll, n = 0.0, 0
    for b in range(3):
        lp = torch.log_softmax(logits[b], -1)
        for t in range(1, logits.shape[1]):
            if batch["labels"][b, t] != -100:
                nll, n = nll - float(lp[t - 1, batch["labels"][b, t]]), n + 1
    assert n == 6 and float(lm) == pytest.approx(nll / n, rel=1e-6)   # cls_losses works in fp32
    # ViTP: CrossEntropyLoss(label_smoothing=0.01) over the choices' logits at the position before the answer
    hand = 0.0
    for b, y in enumerate(targets):
        row = logits[b, batch["cls_positions"][b], inputs.choice_ids]
        lp = torch.log_softmax(row, -1)
        assert batch["input_ids"][b, batch["cls_positions"][b] + 1] == inputs.choice_ids[y]
        hand += -(0.99 * float(lp[y]) + 0.01 * float(lp.mean()))
    assert float(cls) == pytest.approx(hand / 3, rel=1e-6)
    assert choice_logits.shape == (3, 4)


def test_lora_and_activation_checkpointing_reach_both_towers(tiny_internvl):
    """peft: LoRA (all-linear) on the tiny InternVL with checkpointed InternViT and Qwen2 layers: one <cls> step
    gives gradients to adapters of both towers and of the projector, none to the frozen base."""
    import numpy as np
    import torch

    from core.config import load_spec
    from core.models import internvl as iv
    from core.models.peft import apply_peft
    from core.workloads.vitp_lung import InternVLInputs

    spec, _ = load_spec(SPEC, (f"model.path={tiny_internvl}", "peft.r=4", "peft.target_modules=all-linear",
                               "peft.dropout=0"))
    model, tok, cfg, _ = iv.from_folder(tiny_internvl)
    inputs = InternVLInputs(spec, tok, cfg)
    model = apply_peft(model, spec.peft, ("lm_head",))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert all(m.gradient_checkpointing for m in (model.base_model.model.model.vision_tower.encoder,
                                                  model.base_model.model.model.language_model))
    rng = np.random.default_rng(1)
    items = [iv.dynamic_tiles(rng.random((64, 64)), 32, 1, True, spec.data.mean, spec.data.std) for _ in range(2)]
    b = inputs.batch(items, [1, 3], "cpu", torch.float32)
    out = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"])
    lm, cls, _ = iv.cls_losses(out.logits, b["labels"], b["cls_positions"], inputs.choice_ids, b["targets"])
    (lm + cls).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    for part in ("vision_tower.encoder.layer.0.attention.q_proj", "multi_modal_projector.linear_1",
                 "language_model.layers.1.mlp.down_proj"):
        # lora_B: A's gradient is zero on the first step (B starts at 0)
        assert any(part in n and "lora_B" in n and float(g.abs().sum()) > 0 for n, g in grads.items()), part


def test_internvl_dynamic_tiling_as_dynamic_preprocess():
    import numpy as np

    from core.models.internvl import closest_grid, dynamic_tiles

    assert closest_grid(512, 512, 448, 1, 6) == (1, 1)            # a CT slice: one tile
    assert closest_grid(1000, 1000, 448, 1, 6) == (2, 2)          # > half of 2 x 2 tiles' pixels: the larger grid
    assert closest_grid(896, 448, 448, 1, 6) == (2, 1) and closest_grid(448, 1400, 448, 1, 6) == (1, 3)
    m, s = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = np.linspace(0, 1, 64 * 128, dtype=np.float32).reshape(64, 128)
    x = dynamic_tiles(img, 32, 6, True, m, s)
    assert x.shape == (3, 3, 32, 32)                               # 2 x 1 tiles + the thumbnail
    assert dynamic_tiles(img, 32, 1, True, m, s).shape == (1, 3, 32, 32)   # max_dynamic_patch 1: one tile
    one = dynamic_tiles(np.full((32, 32), 0.5, np.float32), 32, 1, True, m, s)
    assert np.allclose(one[0, :, 0, 0].numpy(), [(0.5 - a) / b for a, b in zip(m, s)], atol=1e-6)


def test_local_weights_load_into_a_fresh_4_class_head(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTForImageClassification

    from core.models.classifier import build
    from core.config import FieldError, load_spec

    kw = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    torch.manual_seed(1)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kw)  # an "ImageNet" head
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save(src.state_dict(), hf / "pytorch_model.bin")
    (hf / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 10}))
    base = ("vitp.method=timm_classifier", "model.make_tiny=false", "model.seq_len=17")
    for path in (tmp_path / "w.safetensors", hf):
        spec, _ = load_spec(SPEC, (f"model.path={path}", *base))
        net = build(spec).backbone
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in net.state_dict().items() if not k.startswith("head"))
        assert net.head.weight.shape == (4, 32)
    spec, _ = load_spec(SPEC, (f"model.path={tmp_path / 'w.safetensors'}", "vitp.arch_kwargs.depth=3", *base))
    with pytest.raises(FieldError, match="lacks 12 tensor"):
        build(spec)
    # a transformers image classifier from a local folder, its head replaced
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=10)
    hf_vit = ViTForImageClassification(cfg)
    hf_vit.save_pretrained(tmp_path / "vit")
    spec, _ = load_spec(SPEC, ("vitp.backbone=transformers", f"model.path={tmp_path / 'vit'}", *base))
    model = build(spec)
    emb = model.backbone.vit.embeddings.patch_embeddings.projection.weight
    assert torch.equal(emb, hf_vit.vit.embeddings.patch_embeddings.projection.weight)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert model.backbone.config.id2label == {0: "normal", 1: "bacterial", 2: "viral", 3: "pneumocystis"}


# ---------------------------------------------------------------- data: formats, split, sampling
def test_both_formats_read_the_same_patients_and_dicom_series_are_ordered_and_windowed(dataset):
    import numpy as np
    import pydicom

    from core.data.lung_ct import load_slice, scan_folders, scan_vitp

    a = scan_folders(dataset["slices"], dataset["labels_csv"], 4)
    b = scan_vitp(dataset["meta"], 4)
    assert [(p.id, p.label, p.slices) for p in a.patients] == [(p.id, p.label, p.slices) for p in b.patients]
    assert len(a.patients) == sum(PER_CLASS)
    assert [sum(p.label == c for p in a.patients) for c in range(4)] == list(PER_CLASS)
    assert a.unreadable == b.unreadable and [f for f, _ in a.unreadable] == [str(dataset["victim"])]
    assert str(dataset["victim"]) not in next(p for p in a.patients if p.id == "P0001").slices
    dicom = next(p for p in a.patients if p.id == "P0005")          # every 6th patient: a DICOM series
    assert all(s.endswith(".dcm") for s in dicom.slices)
    instances = [int(pydicom.dcmread(s).InstanceNumber) for s in dicom.slices]
    assert instances == list(range(1, len(dicom.slices) + 1))       # file names are shuffled, the order is not
    assert sorted(dicom.slices) != dicom.slices
    ds = pydicom.dcmread(dicom.slices[10])
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(load_slice(dicom.slices[10]), np.clip((hu + 1350) / 1500, 0, 1))   # lung window -600 / 1500
    assert np.allclose(load_slice(dicom.slices[10], (-500.0, 1000.0)), np.clip((hu + 1000) / 1000, 0, 1))


def _lab_files(root: Path, given: dict) -> Path:
    """The lab's layout: one annotation jsonl per split and a meta json naming them (the rows of vitp_train.jsonl)."""
    rows = [json.loads(line) for line in (root / "vitp_train.jsonl").read_text().splitlines()]
    meta = {}
    for split, ids in given.items():
        mine = [r for r in rows if r["image"].split("/")[0] in ids]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
        meta[f"lung_{split}"] = {"root": "slices", "annotation": f"{split}.jsonl", "repeat_time": 1,
                                 "length": len(mine), "max_dynamic_patch": 1}
    (root / "lab_meta.json").write_text(json.dumps(meta))
    return root / "lab_meta.json"


def test_the_lab_split_files_are_used_as_given_and_guide_style_rows_are_refused(tmp_path):
    from core.config import FieldError, load_spec
    from core.data.lung_ct import write_synthetic
    from core.workloads.vitp_lung import read_dataset

    paths = write_synthetic(tmp_path / "ds", patients_per_class=3)
    # not what the seeded stratified split would give: test has no class-3 patient, val only class 0
    given = {"train": ["P0001", "P0002", "P0004", "P0005", "P0007", "P0008", "P0009", "P0010", "P0011"],
             "val": ["P0000"], "test": ["P0003", "P0006"]}
    meta = _lab_files(paths["root"], given)
    sets = ("data.format=vitp", f"data.meta={meta}", "data.make_synthetic=false", "data.meta_splits.lung_train=train",
            "data.meta_splits.lung_val=val", "data.meta_splits.lung_test=test")
    spec, _ = load_spec(SPEC, sets)
    found, splits = read_dataset(spec)
    assert {s: [p.id for p in ps] for s, ps in splits.items()} == given
    # a patient listed in two of the lab's files is refused, naming both places
    extra = json.loads((paths["root"] / "val.jsonl").read_text().splitlines()[0])
    extra["image"] = extra["image"].replace("P0000", "P0003")
    extra["conversations"][1]["value"] = "1"
    with (paths["root"] / "val.jsonl").open("a") as f:
        f.write(json.dumps(extra) + "\n")
    with pytest.raises(FieldError, match=r"data.meta_splits: .*test.jsonl line 1: patient P0003 is in the test split "
                                         r"here but in val at .*val.jsonl line 36"):
        read_dataset(spec)
    # the guide's example layout: train/0001.png, no patient_id: refused, never one patient called 'train'
    guide = tmp_path / "guide"
    (guide / "images" / "train").mkdir(parents=True)
    lines = []
    for i, src in enumerate(sorted((paths["slices"] / "P0000").glob("*.png"))[:3]):
        shutil.copy(src, guide / "images" / "train" / f"{i + 1:04d}.png")
        lines.append(json.dumps({"image": f"train/{i + 1:04d}.png", "conversations": [
            {"from": "human", "value": "<image>\n<cls>: 0|1|2|3."}, {"from": "gpt", "value": "0"}]}))
    (guide / "train.jsonl").write_text("\n".join(lines) + "\n")
    (guide / "meta.json").write_text(json.dumps({"med_cls": {"root": "images", "annotation": "train.jsonl"}}))
    res = cli("submit", SPEC, "--dry-run", "--no-preflight", "--set", "data.format=vitp", "--set",
              f"data.meta={guide / 'meta.json'}", "--set", "data.make_synthetic=false")
    assert res.returncode == 2 and f"error: {SPEC}: a submission would be refused:\n  data.meta: " in res.stderr
    assert f"data.meta: {guide / 'train.jsonl'} line 1: cannot tell the patient of 'train/0001.png'" in res.stderr
    assert "give each row a 'patient_id' field" in res.stderr and "data.patient_pattern" in res.stderr
    assert "Traceback" not in res.stderr
    spec, _ = load_spec(SPEC, ("data.format=vitp", f"data.meta={guide / 'meta.json'}", "data.make_synthetic=false",
                               r"data.patient_pattern=(?P<patient>\d\d\d)\d\.png$"))
    from core.data.lung_ct import scan

    assert [p.id for p in scan(spec.data, 4).patients] == ["000"]


def test_patient_split_is_stratified_seeded_and_disjoint():
    from core.data.lung_ct import Patient, split_patients

    patients = [Patient(f"P{i:03d}", c, ["x"]) for c, n in enumerate((40, 40, 40, 20))
                for i in range(c * 100, c * 100 + n)]
    s = split_patients(patients, (0.7, 0.15, 0.15), seed=3)
    ids = {k: {p.id for p in v} for k, v in s.items()}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert ids["train"] | ids["val"] | ids["test"] == {p.id for p in patients}
    for split, per_class in (("train", (28, 28, 28, 14)), ("val", (6, 6, 6, 3)), ("test", (6, 6, 6, 3))):
        assert tuple(sum(p.label == c for p in s[split]) for c in range(4)) == per_class
    again = split_patients(list(reversed(patients)), (0.7, 0.15, 0.15), seed=3)
    assert {k: [p.id for p in v] for k, v in again.items()} == {k: [p.id for p in v] for k, v in s.items()}
    assert [p.id for p in split_patients(patients, (0.7, 0.15, 0.15), seed=4)["test"]] != [p.id for p in s["test"]]


def test_k_slices_one_per_stratum_random_in_training_fixed_in_evaluation():
    from core.data.lung_ct import eval_slices, train_slice

    for n in (30, 33, 35):
        ev = eval_slices(n, 16)
        assert ev == eval_slices(n, 16) and len(set(ev)) == 16 and ev == sorted(ev)
        assert ev[0] <= 1 and ev[-1] >= n - 2                     # the whole series is covered
        for j in range(16):
            lo, hi = j * n // 16, (j + 1) * n // 16
            draws = {train_slice(n, 16, j, seed=0, epoch=e, patient=5) for e in range(40)}
            assert all(lo <= d < hi for d in draws) and lo <= ev[j] < hi
            assert len(draws) == hi - lo                             # every slice of the stratum gets its turn
            assert train_slice(n, 16, j, 0, 7, 5) == train_slice(n, 16, j, 0, 7, 5)
    assert eval_slices(8, 16) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]   # short series: repeats


def test_auc_averages_the_classes_present_and_matches_sklearn_when_all_are():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from core.workloads.vitp_lung import classification_metrics

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=40)
    y = rng.integers(0, 4, 40)
    m = classification_metrics(y, probs, ["a", "b", "c", "d"])
    assert m["macro_auc_ovr"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    y3 = np.where(y == 3, 0, y)                                     # class d absent
    m3 = classification_metrics(y3, probs, ["a", "b", "c", "d"])
    assert m3["auc_classes"] == ["a", "b", "c"]
    assert m3["macro_auc_ovr"] == pytest.approx(np.mean([roc_auc_score(y3 == c, probs[:, c]) for c in range(3)]))
    assert m3["per_class_recall"]["d"] == 0.0 and sum(map(sum, m3["confusion_matrix"])) == 40


# ---------------------------------------------------------------- bad input: refused before submission
def _small(tmp_path):
    from core.data.lung_ct import write_synthetic

    return {**write_synthetic(tmp_path / "ds", patients_per_class=3), "logs": tmp_path / "logs"}


def _no_slices(p):
    for f in (p["slices"] / "P0002").iterdir():
        f.unlink()
    return "data.path", "folders", ["patient P0002 (labels.csv line 4) has no PNG / JPEG / DICOM slices in"]


def _no_folder(p):
    shutil.rmtree(p["slices"] / "P0004")
    return "data.path", "folders", ["patient P0004 (labels.csv line 6) has no folder"]


def _label_out_of_range(p):
    text = p["labels_csv"].read_text().splitlines()
    text[3] = "P0002,7"
    p["labels_csv"].write_text("\n".join(text) + "\n")
    return "data.labels_csv", "folders", [f"{p['labels_csv']} line 4: label 7 of patient P0002 is out of range",
                                          "classes are 0..3"]


def _answer_outside_choices(p):
    lines = p["jsonl"].read_text().splitlines()
    row = json.loads(lines[4])
    row["conversations"][1]["value"] = "5"
    lines[4] = json.dumps(row)
    p["jsonl"].write_text("\n".join(lines) + "\n")
    return "data.meta", "vitp", [f"{p['jsonl']} line 5: answer '5' is not among the choices 0|1|2|3"]


def _patient_without_readable_slice(p):
    files = sorted((p["slices"] / "P0003").iterdir())
    for f in files:
        f.write_bytes(b"not an image")
    return "data.path", "folders", [f"patient P0003 (labels.csv line 5): none of its {len(files)} slice(s) can be read",
                                    f"{files[0]}: not an image PIL can read"]


def _too_many_unreadable(p):
    files = sorted(p["slices"].rglob("*.png"))[::20]
    for f in files:
        f.write_bytes(b"\x89PNG\r\n\x1a\n")
    return "data.path", "folders", [f"{len(files)} of", "slices cannot be read, more than data.max_unreadable"]


BAD = {"patient without slices": _no_slices, "patient folder missing": _no_folder,
       "label out of range": _label_out_of_range, "jsonl answer outside the choices": _answer_outside_choices,
       "patient with no readable slice": _patient_without_readable_slice, "too many unreadable": _too_many_unreadable}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_dataset_is_refused_before_submission_naming_file_and_field(slurm, tmp_path, uname, case):
    paths = _small(tmp_path)
    field, fmt, needles = BAD[case](paths)
    res = cli("submit", SPEC, "-c", "local_slurm", "--set", f"name={uname}", *data_args(paths, fmt),
              "--set", f"outputs.logs_dir={paths['logs']}")
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith(f"error: {SPEC}: {field}: "), res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr
    assert "nothing was submitted" in res.stderr and "Traceback" not in res.stderr
    assert not (paths["logs"] / uname).exists()
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--name", uname, "-S", "now-1hours", "-o", "JobID"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


@pytest.mark.slurm  # the dry run on local_slurm asks the cluster for its partition (scontrol)
def test_a_few_unreadable_slices_are_named_and_skipped_and_the_planner_needs_no_torch(dataset, tmp_path):
    res = cli("submit", SPEC, "-c", "local_slurm", "--dry-run", *data_args(dataset))
    assert res.returncode == 0, res.stderr
    assert "1 unreadable slice(s) skipped (of " in res.stdout and str(dataset["victim"]) in res.stdout
    assert "53 patients (12 normal, 12 bacterial, 12 viral, 17 pneumocystis)" in res.stdout
    # a refused dataset stops in the planner, before torch (or deepspeed) is imported
    bad = {**_small(tmp_path)}
    _label_out_of_range(bad)
    code = ("import sys, runpy, atexit; sys.path.insert(0, 'launchers'); sys.argv = ['submit.py', %r] + %r;"
            "atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'NOTORCH'));"
            "runpy.run_path('launchers/submit.py', run_name='__main__')" % (SPEC, list(data_args(bad))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "data.labels_csv" in out.stderr and out.stdout.strip() == "NOTORCH"


# ---------------------------------------------------------------- through Slurm: 2 ranks, ZeRO-3
def test_two_rank_training_loss_falls_and_patient_accuracy_beats_chance(trained):
    steps = losses(trained)
    assert [s for s, _ in steps] == list(range(1, STEPS + 1))
    first, last = (sum(l for _, l in steps[:20]) / 20), (sum(l for _, l in steps[-20:]) / 20)
    assert last < first - 0.4, (first, last)
    metrics = json.loads((trained / "results" / "metrics.json").read_text())
    assert metrics["patients"] == 9 and metrics["chance_accuracy"] == pytest.approx(3 / 9)
    assert metrics["patient"]["accuracy"] >= 6 / 9        # chance: 1/4 guessing, 3/9 always the largest class
    from core.results.progress import read_note           # rank 0's last note: its share of the test patients
    assert read_note(trained) == ("scoring the test patients", 5, 5)   # 9 patients padded over 2 ranks
    res = rank0_result(trained)
    assert res["method"] == "internvl_cls" and res["trainable"] == 174_080         # the tiny InternVL, in full
    load = json.loads((trained / "model_load.json").read_text())                   # strict, from the original layout
    assert load["loaded"] == 73 and load["unused"] == [] and load["file"].endswith("model.safetensors")
    cls = [float(r["cls_loss"]) for r in read_csv(trained / "metrics.csv")]
    assert sum(cls[-20:]) / 20 < sum(cls[:20]) / 20 - 0.2                           # the <cls> term learns too
    # the val split chose the checkpoint evaluated on test, and results/ says which
    val = read_csv(trained / "results" / "val_by_step.csv")
    assert [int(r["step"]) for r in val] == list(range(25, STEPS + 1, 25))
    best = max(val, key=lambda r: (float(r["patient_accuracy"]), float(r["mean_logp"]), -int(r["step"])))
    assert metrics["checkpoint_step"] == int(best["step"]) == res["evaluated_step"]
    assert metrics["chosen_on"] == "val" and metrics["last_step"] == STEPS and metrics["split"] == "test"
    tasks = [json.loads(p.read_text()) for p in (trained / "tasks").glob("main.rank*.json")]
    assert sorted((t["rank"], t["host"]) for t in tasks) == [(0, "n1"), (1, "n2")]
    assert rank0_result(trained)["unreadable_skipped"] == 1 and metrics["unreadable_slices_skipped"] == 1


def test_patient_split_in_the_run_folder_and_every_test_patient_scored_once(trained, dataset):
    split = read_csv(trained / "data" / "split.csv")
    ids = [r["patient_id"] for r in split]
    assert len(ids) == len(set(ids)) == sum(PER_CLASS)             # no patient in two splits
    by = {s: {r["patient_id"] for r in split if r["split"] == s} for s in ("train", "val", "test")}
    assert not (by["train"] & by["test"]) and not (by["train"] & by["val"]) and not (by["val"] & by["test"])
    assert sorted(int(r["label"]) for r in split if r["split"] == "test") == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    patients = read_csv(trained / "results" / "patients.csv")
    scored = [r["patient_id"] for r in patients]
    assert sorted(scored) == sorted(by["test"]) and len(scored) == len(set(scored)) == 9
    slices = read_csv(trained / "results" / "slices.csv")
    for pid in scored:
        mine = [r for r in slices if r["patient_id"] == pid]
        assert len(mine) == 16 and len({r["slice"] for r in mine}) == 16
    index = json.loads((trained / "data" / "dataset.json").read_text())
    assert [f for f, _ in index["scan"]["unreadable"]] == [str(dataset["victim"])]


def test_metrics_equal_scikit_learn_computed_from_the_result_csvs(trained):
    import numpy as np
    from PIL import Image
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score

    metrics = json.loads((trained / "results" / "metrics.json").read_text())
    classes = metrics["classes"]
    for level, name in (("patient", "patients.csv"), ("slice", "slices.csv")):
        rows = read_csv(trained / "results" / name)
        y = np.array([int(r["label"]) for r in rows])
        probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
        pred = probs.argmax(1)
        assert list(pred) == [int(r["predicted"]) for r in rows]
        m = metrics[level]
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
        assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=range(4), zero_division=0))
        assert list(m["per_class_recall"].values()) == pytest.approx(
            list(recall_score(y, pred, average=None, labels=range(4), zero_division=0)))
        assert m["macro_auc_ovr"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
        assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(4)).tolist()
        table = read_csv(trained / "results" / f"confusion_{level}.csv")
        assert [[int(r[c]) for c in classes] for r in table] == m["confusion_matrix"]
        with Image.open(trained / "results" / f"confusion_{level}.png") as im:
            assert im.format == "PNG" and im.size[0] > 200
    patients = read_csv(trained / "results" / "patients.csv")
    slices = read_csv(trained / "results" / "slices.csv")
    for p in patients:                      # patient probabilities = mean of its 16 slices' probabilities
        mine = np.array([[float(r[f"prob_{c}"]) for c in classes]
                         for r in slices if r["patient_id"] == p["patient_id"]])
        assert np.allclose(mine.mean(0), [float(p[f"prob_{c}"]) for c in classes], atol=1e-12)


def test_scontrol_requeue_resumes_exactly_on_the_vitp_format(trained, dataset):
    """The same run from the ViTP jsonl (same patients and slices, so the same split and batches), requeued by
    `scontrol requeue` once a checkpoint exists: every step once, the reference's losses and predictions."""
    run_dir, job = submit_run(*vitp_args(dataset, "vitp_requeue", fmt="vitp"))
    requeue_once_checkpointed(run_dir, job)
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
    res = rank0_result(run_dir)
    assert 0 < res["start_step"] < STEPS and res["steps"] == STEPS and res["restart_count"] >= 1
    got, ref = losses(run_dir), losses(trained)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))        # every step once
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, ref)) <= 1e-6
    assert read_csv(run_dir / "results" / "val_by_step.csv") == read_csv(trained / "results" / "val_by_step.csv")
    mine, theirs = read_csv(run_dir / "results" / "patients.csv"), read_csv(trained / "results" / "patients.csv")
    assert [r["patient_id"] for r in mine] == [r["patient_id"] for r in theirs]
    for a, b in zip(mine, theirs):
        assert a["predicted"] == b["predicted"]
        assert all(abs(float(a[k]) - float(b[k])) <= 1e-6 for k in a if k.startswith("prob_"))


def test_tiny_spec_runs_the_timm_baseline_switch_on_the_local_executor(tmp_path):
    """The baseline command from the spec's header (1 rank, ZeRO-2, synthetic data written on first use): the timm
    classifier instead of the lab's InternVL method (which the Slurm runs above train)."""
    ds = tmp_path / "tiny_data"
    res = cli("submit", SPEC, "--set", f"outputs.logs_dir={tmp_path / 'logs'}", "--set", f"data.path={ds / 'slices'}",
              "--set", f"data.labels_csv={ds / 'labels.csv'}", "--set", f"data.meta={ds / 'vitp_meta.json'}",
              "--set", "vitp.method=timm_classifier", "--set", "model.seq_len=17", "--set", "model.make_tiny=false",
              "--set", "model.path=null", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluation.patients_csv:" in res.stdout and "evaluation.metrics:" in res.stdout
    run_dir = run_folder(res.stdout)
    metrics = json.loads((run_dir / "results" / "metrics.json").read_text())
    assert metrics["patients"] == 8 and metrics["patient"]["accuracy"] >= 6 / 8
    assert rank0_result(run_dir)["trainable"] == 32_356 and not (run_dir / "model_load.json").exists()   # the ViT
    assert metrics["checkpoint_step"] == metrics["last_step"] == 200 and metrics["chosen_on"] == "last step"
    assert (ds / "labels.csv").is_file() and (ds / "vitp_train.jsonl").is_file()
