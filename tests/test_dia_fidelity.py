"""Dia-Pangu against Dia-LLaMA (zhi-xuan-chen/Dia-LLaMA) and the lab's real reference files: the released
checkpoint's vision side loads whole and bit-equal (tests/data/dia-llama/embedding_layer_keys.tsv), the real
CTRG labels file is read as it is, preprocessing follows CTRG_dataset.py step for step (SimpleITK axis order),
report metrics equal pycocoevalcap on raw strings, the CheXbert labeler loads chexbert.pth's key names, the plan
counts the model and derives the steps of train.epochs, and a frozen head from the checkpoint stays frozen in a run."""
from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path

import pytest

from conftest import REPO, TEST_DATA, cli, rank0_result, run_folder

KEYS_TSV = TEST_DATA / "dia-llama" / "embedding_layer_keys.tsv"
LABELS_CSV = TEST_DATA / "ctrg" / "CTRG_finding_labels.csv"
SPEC = "jobs/tiny/dia_pangu.yaml"


def released_keys() -> dict[str, tuple]:
    out = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        out[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    return out


def vision_model(vit_cfg=None, per_cfg=None, hidden=4096, train_head=False):
    """Dia-Pangu's vision side on the CPU over an LLM on the meta device (only its width matters here)."""
    import torch
    from transformers import LlamaForCausalLM

    from core.models.dia_pangu import DiaPangu
    from core.models.pangu import llama_config, tiny_config
    from core.models.perceiver import PerceiverConfig
    from core.models.vit3d import ViT3DConfig

    with torch.device("meta"):
        llm = LlamaForCausalLM(llama_config(tiny_config(64, layers=1, hidden=hidden, heads=max(1, hidden // 128),
                                                        kv_heads=max(1, hidden // 512), intermediate=64)))
    return DiaPangu(llm, None, vit_cfg or ViT3DConfig(), per_cfg or PerceiverConfig(), train_head=train_head)


# ---------------------------------------------------------------- the released checkpoint, full size
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A pytorch_model.bin with exactly the released names and shapes (random values; the unused LLaMA vocabulary
    as a stride-0 view, so it costs no disk), a few lang_model keys, and the same file with one key removed."""
    import torch

    root = tmp_path_factory.mktemp("dia_llama")
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in released_keys().items():
        state[key] = torch.zeros(1).expand(*shape) if key == "embedding_layer.weight" else torch.randn(shape, generator=g)
    state["lang_model.base_model.model.model.embed_tokens.weight"] = torch.zeros(1).expand(32000, 4096)
    state["lang_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(8, 4096)
    torch.save(state, root / "pytorch_model.bin")
    dropped = "embedding_layer.vision_encoder.transformer.layers.7.1.fn.net.3.bias"
    torch.save({k: v for k, v in state.items() if k != dropped}, root / "one_key_removed.bin")
    return {"root": root, "state": state, "dropped": dropped}


def test_released_checkpoint_names_and_shapes_are_ours():
    from core.models.dia_pangu import dia_llama_name, vision_state

    import torch

    with torch.device("meta"):
        model = vision_model()
    ours = {dia_llama_name(n): tuple(p.shape) for n, p in vision_state(model).items()}
    released = released_keys()
    assert set(released) - set(ours) == {"embedding_layer.weight"}  # LLaMA's vocabulary: deliberately unused
    assert set(ours) <= set(released)
    assert {k: (v, released[k]) for k, v in ours.items() if v != released[k]} == {"embedding_layer.temp": ((1,), ())}


def test_released_checkpoint_loads_every_vision_tensor_bit_equal(released, tmp_path):
    import torch

    from core.models.dia_pangu import dia_llama_name, vision_state
    from core.workloads.dia_pangu import INIT_REPORT, init_from_checkpoint

    model = vision_model()
    report = init_from_checkpoint(model, str(released["root"] / "pytorch_model.bin"), tmp_path)
    state, ours = released["state"], vision_state(model)
    assert report["counts"] == {"loaded": len(released_keys()) - 1, "unused": 3}
    for name, p in ours.items():
        src = state[dia_llama_name(name)]
        assert p.dtype == src.dtype and torch.equal(p.detach().reshape(src.shape), src), name
    assert torch.equal(model.markers.weight, state["embedding_layer.figure_token_weight"])
    assert torch.equal(model.fc.weight, state["embedding_layer.fc.weight"])
    written = json.loads((tmp_path / INIT_REPORT).read_text())
    assert {u["key"]: u["count"] for u in written["unused"]} == {"embedding_layer.weight": 1, "lang_model.*": 2}
    assert {e["into"] for e in written["loaded"]} == set(ours)


def test_checkpoint_with_one_key_removed_is_refused_and_nothing_is_loaded(released):
    import torch

    from core.models.dia_pangu import DiaCheckpointError, load_dia_llama

    model = vision_model()
    before = model.perceiver.latents.detach().clone()
    with pytest.raises(DiaCheckpointError) as e:
        load_dia_llama(model, released["root"] / "one_key_removed.bin")
    assert f"1 key(s) missing: {released['dropped']}" in str(e.value)
    assert torch.equal(model.perceiver.latents, before)


def test_misshaped_key_is_refused_naming_both_shapes(tmp_path):
    import torch

    from core.models.dia_pangu import DiaCheckpointError, load_dia_llama, to_dia_llama
    from core.models.perceiver import TINY_PERCEIVER
    from core.models.vit3d import TINY_VIT

    model = vision_model(TINY_VIT, TINY_PERCEIVER, hidden=512)
    state = to_dia_llama(model)
    state["embedding_layer.vision_encoder.pos_embedding.dep_embed.weight"] = torch.zeros(4, 16)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(DiaCheckpointError, match=r"1 key\(s\) of the wrong shape: embedding_layer.vision_encoder."
                                                 r"pos_embedding.dep_embed.weight \[4, 16\] \(ours: vit.pos_embedding."
                                                 r"dep_embed.weight \[8, 16\]\)"):
        load_dia_llama(model, tmp_path / "bad.pth")


# ---------------------------------------------------------------- the real CTRG labels file
def test_real_ctrg_labels_file_is_read_as_it_is(tmp_path):
    import nibabel as nib
    import numpy as np

    from core.data.ctrg import CONDITIONS, check_dataset, read_labels

    rows = list(csv.DictReader(LABELS_CSV.open()))
    labels = read_labels(LABELS_CSV)
    assert len(labels) == len(rows) == 1804
    sample = rows[::97]
    for row in sample:  # Dia-LLaMA: positive where the CheXbert code is 1; 0 blank, 2 negative, 3 uncertain are not
        assert labels[row["id"]] == [1 if row[d.replace(" ", "_")] == "1" else 0 for d in CONDITIONS], row["id"]
    assert any(v == "2" for r in sample for v in r.values()) and any(sum(labels[r["id"]]) for r in sample)
    # the loader itself, with annotation ids as Dia-LLaMA's annotation.json gives them (integers)
    (tmp_path / "vol").mkdir()
    ids = [int(r["id"]) for r in sample[:4]]
    for i in ids:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), str(tmp_path / "vol" / f"{i}.nii.gz"))
    ann = {"train": [{"id": i, "finding": "x"} for i in ids[:3]], "test": [{"id": ids[3], "finding": "y"}]}
    (tmp_path / "annotation.json").write_text(json.dumps(ann))
    cases = check_dataset(tmp_path / "vol", tmp_path / "annotation.json", LABELS_CSV)
    by_id = {r["id"]: r for r in rows}
    for case in cases["train"] + cases["test"]:
        assert case.labels == [int(by_id[case.id][d.replace(" ", "_")] == "1") for d in CONDITIONS]


def test_labels_with_spaces_and_blank_cells_are_read_too(tmp_path):
    from core.data.ctrg import CONDITIONS, read_labels

    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Study_ID"] + [d.title() for d in CONDITIONS])  # CheXbert's own output style
        w.writerow(["0044"] + ["1.0", "", "-1.0", "2"] + ["0"] * 10)
    assert read_labels(path) == {"44": [1, 0, 0, 0] + [0] * 10}


# ---------------------------------------------------------------- preprocessing, step for step
def sitk_array(path: Path):
    """GetArrayFromImage's array of a NIfTI file, (k, j, i): SimpleITK when installed, else the raw voxel buffer
    (i fastest on disk) read straight from the file, which is what SimpleITK returns."""
    import numpy as np

    try:
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except ImportError:
        pass
    raw = gzip.decompress(path.read_bytes())
    dim = np.frombuffer(raw[40:56], "<i2")
    code = int(np.frombuffer(raw[70:72], "<i2")[0])
    offset = int(np.frombuffer(raw[108:112], "<f4")[0])
    dtype = {4: "<i2", 16: "<f4", 512: "<u2", 8: "<i4"}[code]
    n = int(dim[1]) * int(dim[2]) * int(dim[3])
    return np.frombuffer(raw[offset:offset + n * np.dtype(dtype).itemsize], dtype).reshape(dim[3], dim[2], dim[1])


def cv2_resize(image, size: int):
    """cv2.resize(image, (size, size), INTER_LINEAR) of axes 0 and 1 (cv2 when installed, else its formula:
    half-pixel centres, clamped at the borders; integer images rounded back to their type)."""
    import numpy as np

    try:
        import cv2

        return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    except ImportError:
        pass

    def axis(a, n, ax):
        m = a.shape[ax]
        fx = (np.arange(n) + 0.5) * (m / n) - 0.5
        sx = np.floor(fx).astype(int)
        fx = fx - sx
        fx[sx < 0], sx[sx < 0] = 0, 0
        hi = sx >= m - 1
        fx[hi], sx[hi] = 0, m - 1
        lo_v, hi_v = np.take(a, sx, axis=ax), np.take(a, np.minimum(sx + 1, m - 1), axis=ax)
        shape = [1] * a.ndim
        shape[ax] = n
        return lo_v * (1 - fx.reshape(shape)) + hi_v * fx.reshape(shape)

    out = axis(axis(image.astype(np.float64), size, 0), size, 1)
    return np.rint(out).astype(image.dtype) if np.issubdtype(image.dtype, np.integer) else out.astype(image.dtype)


def dia_llama_volume(path: Path, image_size: int, frames: int, resize: int, transpose_rule: bool = True):
    """CTRG_dataset.py's resize_image + normalisation, then the collate's nearest resize, literally."""
    import numpy as np
    import torch
    from scipy import ndimage

    image = sitk_array(path)
    if transpose_rule and image.shape[0] < image.shape[2]:
        image = image.transpose(1, 2, 0)
    image = cv2_resize(image, resize)
    image = np.concatenate([image[np.newaxis]] * 3, axis=0)
    image = ndimage.zoom(image, (3 / image.shape[0], resize / image.shape[1], resize / image.shape[2],
                                 frames / image.shape[3]), order=0)
    image = (image - image.min()) / (image.max() - image.min())
    vol = torch.from_numpy(np.asarray(image)).float()
    return torch.nn.functional.interpolate(vol.unsqueeze(0), size=(image_size, image_size, frames))[0]


@pytest.mark.parametrize("shape, dtype, sizes", [
    ((24, 16, 10), "float32", (32, 8, 64)),   # k < i: SimpleITK's (k, j, i) is transposed to (j, i, k)
    ((24, 16, 10), "float32", (16, 8, 48)),
    ((8, 12, 20), "int16", (32, 8, 64)),      # k >= i: left as (k, j, i)
    ((40, 30, 90), "int16", (16, 8, 48)),
])
def test_preprocessing_follows_ctrg_dataset_step_for_step(tmp_path, shape, dtype, sizes):
    import nibabel as nib
    import numpy as np

    from core.data.ctrg import load_volume

    rng = np.random.default_rng(0)
    i = np.arange(shape[0])[:, None, None]
    vol = (rng.normal(0, 40, size=shape) + 60 * i).astype(dtype)  # a ramp along nibabel's first axis (i)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    size, frames, resize = sizes
    ours = load_volume(path, size, frames, resize)
    ref = dia_llama_volume(path, size, frames, resize)
    assert ours.shape == ref.shape == (3, size, size, frames) and ours.dtype == ref.dtype
    step = 1.01 / (float(vol.max()) - float(vol.min())) if dtype == "int16" else 1e-5  # cv2 rounds integers
    assert float((ours - ref).abs().max()) <= step
    assert 0.0 <= float(ours.min()) and float(ours.max()) <= 1.0  # min / max taken before the nearest resize
    ramp = ours[0].mean(dim=(0, 2)) if shape[2] < shape[0] else ours[0].mean(dim=(0, 1))
    assert bool((ramp[1:] >= ramp[:-1] - 0.05).all()) and float(ramp[-1] - ramp[0]) > 0.3  # i is the column axis
    if shape[2] < shape[0]:  # nibabel's own (i, j, k) order would put the ramp on the rows instead
        naive = dia_llama_volume(path, size, frames, resize, transpose_rule=False)
        assert float((ours - naive).abs().max()) > 0.3


# ---------------------------------------------------------------- report metrics as Dia-LLaMA computes them
PAIRS = [  # (reference, generated): CTRG-style findings
    ("Thorax is symmetrical, lung window shows clear lung markings, good transparency of lung field. A solid nodule "
     "shadow can be seen in the posterior segment of the right upper lobe (IM84), about 6mm x 4mm. Bilateral "
     "pulmonary hili are not large. No pleural effusion or pleural thickening.",
     "Thorax is symmetrical, lung markings are clear, and the transparency of lung field is good. A small nodule "
     "shadow is seen in the right upper lobe, about 4mm x 3mm. Bilateral pulmonary hili are not large. No pleural "
     "effusion."),
    ("The heart shadow is enlarged, and a little fluid density shadow can be seen in the right thoracic cavity. "
     "Patchy high-density shadows are seen in the lower lobe of the right lung.",
     "The heart shadow is enlarged. Patchy high density shadows can be seen in the lower lobes of both lungs, "
     "and there is a small amount of effusion in the right thoracic cavity."),
    ("Bilateral lung markings increase, multiple flocculent and strip-like high-density shadows in both lungs; "
     "the mediastinum is in the middle, with several small lymph nodes.",
     "Multiple strip-like high-density shadows in both lungs; no enlarged lymph node is found in the mediastinum."),
    ("No abnormality is found in rib and chest wall soft tissue. The trachea and bronchi are unobstructed.",
     "The trachea and bronchi are unobstructed, no abnormality in the chest wall."),
    ("Emphysema in both upper lobes. Calcified nodule in the left lower lobe, 3mm.",
     "Emphysema of both lungs; a calcified nodule is seen in the left lower lobe."),
]


def test_report_metrics_equal_pycocoevalcap_on_raw_strings():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    from core.metrics import report_metrics

    refs = {str(100 + n): r for n, (r, _) in enumerate(PAIRS)}
    preds = {str(100 + n): p for n, (_, p) in enumerate(PAIRS)}
    gts, res = {k: [v] for k, v in refs.items()}, {k: [v] for k, v in preds.items()}  # utils/nlg_eval.py's dicts
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    expected = {**{f"BLEU-{n + 1}": bleu[n] for n in range(4)}, "METEOR": meteor.compute_score(gts, res)[0],
                "ROUGE-L": Rouge().compute_score(gts, res)[0]}
    del meteor
    ours = report_metrics(refs, preds, tokenize="raw")
    assert set(ours) == set(expected)
    for k, v in expected.items():
        assert ours[k] == pytest.approx(v, abs=1e-9, rel=0), k
    ptb = report_metrics(refs, preds, tokenize="ptb")
    assert abs(ptb["BLEU-1"] - ours["BLEU-1"]) > 0.01  # PTB tokenisation is a different number


# ---------------------------------------------------------------- CheXbert
def test_tiny_chexbert_has_the_release_key_names_and_labels_like_bert_plus_heads(tiny_chexbert, tmp_path):
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from core.models.chexbert import CheXbertError, CheXbertLabeler, key_names

    raw = torch.load(tiny_chexbert, weights_only=True)["model_state_dict"]
    assert list(raw) == key_names(2)  # chexbert.pth's names, `module.` prefix included
    texts = ["No pleural effusion.\nThe heart size is normal.", "  There is a small right pleural effusion. ",
             "Mild cardiomegaly with edema."]
    labeler = CheXbertLabeler(tiny_chexbert)
    codes = labeler.label(texts)
    assert len(codes) == 3 and all(len(c) == 14 for c in codes)
    assert all(0 <= v <= 3 for c in codes for v in c[:13]) and all(c[13] in (0, 1) for c in codes)
    # the same numbers from transformers' BertModel and the 14 heads applied by hand
    bert_state = {k[len("module.bert."):]: v for k, v in raw.items() if k.startswith("module.bert.")}
    cfg = BertConfig(vocab_size=raw["module.bert.embeddings.word_embeddings.weight"].shape[0], hidden_size=64,
                     num_hidden_layers=2, num_attention_heads=1, intermediate_size=128, max_position_embeddings=128)
    bert = BertModel(cfg).eval()
    bert.load_state_dict(bert_state, strict=False)
    tok = BertTokenizer.from_pretrained(str(tiny_chexbert.parent), local_files_only=True)
    enc = tok([" ".join(t.strip().split("\n")).strip() for t in texts], padding="longest", return_tensors="pt")
    with torch.no_grad():
        cls = bert(**enc)[0][:, 0]
    by_hand = [[int((cls[n] @ raw[f"module.linear_heads.{h}.weight"].T + raw[f"module.linear_heads.{h}.bias"]).argmax())
                for h in range(14)] for n in range(3)]
    assert codes == by_hand
    broken = dict(raw)
    del broken["module.linear_heads.13.bias"]
    torch.save({"model_state_dict": broken}, tmp_path / "chexbert.pth")
    (tmp_path / "vocab.txt").write_text((tiny_chexbert.parent / "vocab.txt").read_text())
    with pytest.raises(CheXbertError, match="linear_heads.13.bias"):
        CheXbertLabeler(tmp_path / "chexbert.pth")


def test_chexbert_scores_are_dia_llamas_formulas():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from core.metrics import chexbert_scores

    names = ["a", "b", "c"]
    gts = [[1, 2, 0], [1, 1, 3], [0, 1, 1], [2, 0, 1]]
    res = [[1, 1, 0], [0, 1, 1], [1, 1, 0], [2, 3, 1]]
    out = chexbert_scores(gts, res, names)
    # positives (code 1): per class tp / fp / fn: a 1/1/1, b 2/1/0, c 1/1/1
    tp, fp, fn = np.array([1, 2, 1.]), np.array([1, 1, 1.]), np.array([1, 0, 1.])
    assert out["ce_precision_macro"] == pytest.approx(float(np.mean(tp / (tp + fp + 1e-6))), abs=1e-12)
    assert out["ce_recall_macro"] == pytest.approx(float(np.mean(tp / (tp + fn + 1e-6))), abs=1e-12)
    assert out["ce_f1_micro"] == pytest.approx(4 / (4 + 0.5 * 5 + 1e-6), abs=1e-12)
    assert out["ce_precision_micro"] == pytest.approx(4 / (7 + 1e-6), abs=1e-12)
    g, r = np.array(gts) == 1, np.array(res) == 1
    assert out["ce_auc_macro"] == pytest.approx(np.mean([roc_auc_score(g[:, i], r[:, i]) for i in range(3)]))
    assert out["ce_auc_micro"] == pytest.approx(roc_auc_score(g.ravel(), r.ravel()))
    assert out["ce_num_examples"] == 4.0 and out["ce_auc_undefined"] == []


# ---------------------------------------------------------------- the plan: the whole model counted, epochs -> steps
def test_lab_spec_counts_the_whole_model_and_computes_the_trainable_share():
    from core.model_sizes import PRESETS
    from core.models.pangu import meta_size
    from core.config import load_spec
    from core.workloads import get

    spec, _ = load_spec(REPO / "jobs" / "dia_pangu.yaml")
    size = get("dia_pangu").model_size(spec)
    vision = 66_208_000 + 37_802_496 + 768 * 4096 + 4096 + 2 * 4096  # ViT, perceiver, fc, image markers
    head = 14 * 1024 + 768 * 768 + 768 + 2 * 14 * 768 + 1 + 14 * (768 * 2 + 2)
    assert size.total == meta_size(PRESETS["openpangu-7b"]).total + vision + head
    assert size.trainable == 37_802_496 + 768 * 4096 + 4096 + 2 * 4096 == 40_960_512  # head frozen
    spec, _ = load_spec(REPO / "jobs" / "dia_pangu.yaml", ("dia.train_head=true",))
    assert get("dia_pangu").model_size(spec).trainable == 40_960_512 + head - 14 * (768 * 2 + 2) == 41_586_945


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_pangu, tiny_chexbert):
    from core.data.ctrg import write_synthetic

    root = tmp_path_factory.mktemp("dia_fid")
    return {"model": tiny_pangu, **write_synthetic(root / "ctrg", n_test=4), "root": root, "chexbert": tiny_chexbert}


def local_args(w, *extra):
    return ["--set", f"model.path={w['model']}", "--set", "model.make_tiny=false", "--set", f"data.path={w['data_dir']}",
            "--set", f"data.annotation={w['annotation']}", "--set", f"data.labels_csv={w['labels_csv']}",
            "--set", "data.make_synthetic=false", "--set", f"outputs.logs_dir={w['root'] / 'logs'}",
            "--set", f"dia.chexbert={w['chexbert']}", *extra]


def test_dry_run_prints_the_steps_of_train_epochs(workdir):
    res = cli("submit", SPEC, "--dry-run", *local_args(workdir, "--set", "train.epochs=50"))
    assert res.returncode == 0, res.stderr
    per_step = 1 * 2  # local executor: 1 rank x micro-batch 1 x grad-accum 2
    assert (f"train.epochs 50 x 24 samples / ({per_step} samples per step: 1 ranks x micro-batch x grad-accum) = "
            f"{math.ceil(50 * 24 / per_step)} optimizer steps") in res.stdout
    assert "trainable: 40,785 of" in res.stdout  # perceiver + fc + markers + head (tiny), from the model itself


@pytest.fixture(scope="module")
def tiny_dia_llama(workdir):
    """A tiny-size checkpoint in Dia-LLaMA's layout (random values): `embedding_layer.*` + an unused LLaMA."""
    import torch

    from core.models.dia_pangu import to_dia_llama
    from core.models.perceiver import TINY_PERCEIVER
    from core.models.vit3d import TINY_VIT

    torch.manual_seed(5)
    state = to_dia_llama(vision_model(TINY_VIT, TINY_PERCEIVER, hidden=64))
    state["embedding_layer.weight"] = torch.randn(32, 64)
    state["lang_model.base_model.model.lm_head.weight"] = torch.randn(32, 64)
    path = workdir["root"] / "dia_llama.bin"
    torch.save(state, path)
    broken = workdir["root"] / "dia_llama_no_proj.bin"
    torch.save({k: v for k, v in state.items() if k != "embedding_layer.proj.bias"}, broken)
    return {"path": path, "broken": broken, "state": state}


def test_run_with_the_frozen_head_from_a_dia_llama_checkpoint(workdir, tiny_dia_llama):
    """The lab's switches on the tiny model (local executor): the head loaded and frozen, init_from.json in the run
    folder, steps from train.epochs, activation checkpointing on, both tokenisations and greedy decoding."""
    import torch
    from safetensors.torch import load_file

    res = cli("submit", SPEC, *local_args(workdir, "--set", f"dia.init_from={tiny_dia_llama['path']}",
                                          "--set", "dia.train_head=false", "--set", "train.epochs=0.25",
                                          "--set", "dia.nlg_tokenization=both", "--set", "dia.decoding=greedy",
                                          "--set", "dia.eval_limit=2", "--set", "train.checkpoint_every=0"),
              timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    run = run_folder(res.stdout)
    result = rank0_result(run)
    assert result["steps"] == result["total_steps"] == math.ceil(0.25 * 24 / 2) == 3
    assert result["activation_checkpointing"] is True and result["init_from"]["unused"] == 2
    report = json.loads((run / "init_from.json").read_text())
    assert {u["key"] for u in report["unused"]} == {"embedding_layer.weight", "lang_model.*"}
    assert report["counts"]["loaded"] == len(tiny_dia_llama["state"]) - 2
    frozen = load_file(str(run / "vision_frozen.safetensors"))
    state = tiny_dia_llama["state"]
    for name in ("prototype", "proj.weight", "pos_sample_memory", "neg_sample_memory"):
        assert torch.equal(frozen[f"disease.{name}"], state[f"embedding_layer.{name}"]), name  # frozen = checkpoint
    assert float(frozen["disease.temp"]) == float(state["embedding_layer.temp"])
    assert torch.equal(frozen["vit.pos_embedding.dep_embed.weight"],
                       state["embedding_layer.vision_encoder.pos_embedding.dep_embed.weight"])
    metrics = json.loads((run / "results" / "metrics.json").read_text())
    assert metrics["nlg_tokenization"] == "raw" and set(metrics["nlg_ptb"]) == set(metrics["nlg_raw"])
    assert metrics["cases"] == 2 and "ce_f1_micro" in metrics and "head_micro_f1" in metrics


def test_run_refuses_a_checkpoint_missing_a_key_before_training(workdir, tiny_dia_llama):
    res = cli("submit", SPEC, *local_args(workdir, "--set", f"dia.init_from={tiny_dia_llama['broken']}",
                                          "--set", "dia.train_head=false", "--set", "train.steps=2"), timeout=600)
    run = run_folder(res.stdout)
    logs = "".join(p.read_text(errors="replace") for p in run.rglob("*log*") if p.is_file())
    assert res.returncode != 0 and "1 key(s) missing: embedding_layer.proj.bias" in res.stdout + res.stderr + logs
    assert not (run / "metrics.csv").exists() and not (run / "init_from.json").exists()
