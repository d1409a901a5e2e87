"""GigaPath distillation: tile folders and WSI tiling, the LongNet slide encoder against GigaPath's names and maths,
the full-size teacher / student on the meta device, bad input refused before submission, and through the real
local Slurm: the teacher-features array (one task per slide chunk, resubmissions skip finished slides), training on
2 ranks (ZeRO-2 over gloo) that lowers the loss and raises the held-out cosine, an exact resume after a requeue, and
the exported student loaded by timm strictly."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (cli, final_state, losses, rank0_result, record, run_folder, sacct_states, submit, task_records,
                      wait_terminal)

SPEC = "jobs/tiny/gigapath_distill.yaml"
FULL = "jobs/gigapath_distill.yaml"
STEPS = 120
SLIDES = 12
HOLD = 25                       # the requeue test holds the job at this step (checkpoints every 10)


# ---------------------------------------------------------------- shared data
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 synthetic slides (slide_000 a pyramidal TIFF), labels, and the tiny teacher folder."""
    from core.data.slides import write_synthetic
    from core.models.gigapath import write_tiny_teacher

    root = tmp_path_factory.mktemp("gigapath")
    paths = write_synthetic(root / "ds", slides=SLIDES, wsi=1, tile_px=64, seed=0)
    return {**paths, "teacher": write_tiny_teacher(root / "teacher"), "logs": root / "logs", "tmp": root}


def data_args(data, teacher=None):
    return ("--set", f"data.path={data['slides']}", "--set", f"data.labels_csv={data['labels_csv']}",
            "--set", "data.make_synthetic=false", "--set", f"models={{teacher: {{path: {teacher or data['teacher']}}}}}")


def gpd_args(data, name, *extra):
    """submit.py's arguments for the tiny distillation on the test's slides and teacher, 2 nodes of the local Slurm."""
    return (SPEC, "-c", "local_slurm", "--set", f"name={name}", *data_args(data),
            "--set", f"outputs.logs_dir={data['logs']}", "--set", "resources.nodes=2",
            "--set", "train.checkpoint_every=10", *extra)


def steps_of(run_dir: Path) -> dict:
    return {s["name"]: s for s in record(run_dir)["steps"]}


def spec_for(data, *sets):
    from core.config import load_spec

    spec, _ = load_spec(SPEC, tuple(s for s in (a for a in data_args(data)) if s != "--set") + sets)
    return spec


# ---------------------------------------------------------------- data: names, tiling, synthetic slides
def test_tile_names_parse_and_bad_names_and_empty_folders_are_named(tmp_path):
    from core.data.slides import DatasetError, list_tiles, parse_tile_name

    assert parse_tile_name("01581x_25327y.png") == (1581, 25327)          # as GigaPath's tiling names them
    assert parse_tile_name("256x_512y.jpg") == (256, 512)
    assert parse_tile_name("1581_25327.png") is None and parse_tile_name("x01581_y25327y.png") is None
    slide = tmp_path / "s1"
    slide.mkdir()
    for name in ("00512x_00256y.png", "00256x_00256y.png", "dataset.csv"):
        (slide / name).write_bytes(b"")
    assert [t[0] for t in list_tiles(slide)] == ["00256x_00256y.png", "00512x_00256y.png"]   # by (x, y)
    (slide / "tile_7.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"1 tile name\(s\) do not parse as .*: tile_7.png"):
        list_tiles(slide)
    empty = tmp_path / "s2"
    empty.mkdir()
    (empty / "dataset.csv").write_text("x\n")
    with pytest.raises(DatasetError, match=f"slide folder {empty} has no tiles"):
        list_tiles(empty)


def test_synthetic_slides_come_from_the_ihc_sample_and_wsi_tiling_writes_gigapath_folders(data, tmp_path):
    import numpy as np
    import tifffile
    from PIL import Image
    from skimage import data as skdata

    from core.data.slides import list_tiles, scan, tile_wsi

    found = scan(data["slides"], data["labels_csv"])
    assert [s.id for s in found.slides] == [f"slide_{i:03d}" for i in range(SLIDES)]
    assert [s.kind for s in found.slides] == ["wsi"] + ["tiles"] * (SLIDES - 1)
    assert found.classes == ["negative", "positive"] and found.unlabeled == []
    tiles = list_tiles(data["slides"] / "slide_001")
    for axis in (1, 2):
        vals = sorted({t[axis] for t in tiles})
        assert all((b - a) % 256 == 0 for a, b in zip(vals, vals[1:])) and vals[0] % 256 != 0   # 256-px grid, offset
    with Image.open(data["slides"] / "slide_001" / tiles[0][0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    ihc = skdata.immunohistochemistry()
    assert ihc.shape == (512, 512, 3)                                     # the real sample the slides are cut from
    # the whole-slide image: a 3-level pyramid; tiling level 2 at 64 px keeps the tissue, drops the white margin
    tiff = data["slides"] / "slide_000.tiff"
    with tifffile.TiffFile(tiff) as tif:
        levels = [np.asarray(lvl.asarray()) for lvl in tif.series[0].levels]
    assert [lv.shape[1] for lv in levels] == [levels[2].shape[1] * 4, levels[2].shape[1] * 2, levels[2].shape[1]]
    info = tile_wsi(tiff, tmp_path / "slide_000", level=2, tile_px=64, occupancy=0.1)
    got = list_tiles(tmp_path / "slide_000")
    assert info["tiles"] == len(got) > 10 and info["downsample"] == 4.0
    assert (tmp_path / "slide_000" / "dataset.csv").read_text().count("\n") == len(got) + 1
    h, w = levels[2].shape[:2]
    assert len(got) < math.ceil(h / 64) * math.ceil(w / 64)            # background tiles left out
    for name, x, y in got[:5]:                                            # level-0 coordinates of the top-left corner
        with Image.open(tmp_path / "slide_000" / name) as im:
            tile = np.asarray(im)
        expect = levels[2][y // 4:y // 4 + 64, x // 4:x // 4 + 64]
        assert np.array_equal(tile[:expect.shape[0], :expect.shape[1]], expect)
        assert (tile.astype(float).mean(-1) < info["threshold"]).mean() > 0.1


# ---------------------------------------------------------------- models: the slide encoder, tile encoders
def _mae_table(dim: int, grid: int):
    """MAE's get_2d_sincos_pos_embed(dim, grid, cls_token=True) (gigapath/pos_embed.py), written out in numpy."""
    import numpy as np

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), 0)
    g = g.reshape(2, 1, grid, grid)
    emb = np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def _naive_dilated(q, k, v, lengths, ratios):
    """LongNet's dilated attention head by head, token by token: head group g (of r) in each segment attends to
    tokens g, g + r, ... (zero padding included as keys, as GigaPath pads); branches mixed by softmax(lse)."""
    import torch

    b, T, h, d = q.shape
    outs, lses = [], []
    for sl, r in zip(lengths, ratios):
        sl = min(sl, T)
        Tp = -(-T // sl) * sl
        qp, kp, vp = (torch.cat([t, t.new_zeros(b, Tp - T, h, d)], 1).double() for t in (q, k, v))
        o = torch.zeros(b, T, h, d, dtype=torch.float64)
        lse = torch.full((b, T, h), -1e8, dtype=torch.float64)
        hh = -(-h // r)
        for s0 in range(0, Tp, sl):
            for head in range(h):
                idx = list(range(s0 + head // hh, s0 + -(-sl // r) * r, r))
                take = lambda t: torch.stack([t[:, i, head] if i < s0 + sl else t.new_zeros(b, d) for i in idx], 1)
                Q, K, V = take(qp), take(kp), take(vp)
                s = Q @ K.transpose(1, 2) * d ** -0.5
                out, ls = torch.softmax(s, -1) @ V, torch.logsumexp(s, -1)
                for j, i in enumerate(idx):
                    if i < T and i < s0 + sl:
                        o[:, i, head], lse[:, i, head] = out[:, j], ls[:, j]
        outs.append(o)
        lses.append(lse)
    w = torch.softmax(torch.stack(lses), 0)
    return sum(o * w_[..., None] for o, w_ in zip(outs, w))


def test_dilated_attention_and_position_embedding_compute_what_gigapath_computes():
    import numpy as np
    import torch

    from core.models.gigapath import dilated_attention, grid_pos_embed

    torch.manual_seed(0)
    for T, h, lengths, ratios in ((37, 4, [16, 64], [1, 2]), (50, 6, [8, 16, 32], [1, 2, 4]), (10, 3, [1024], [1]),
                                  (45, 4, [9, 20], [1, 4])):
        q, k, v = (torch.randn(2, T, h, 8) for _ in range(3))
        got = dilated_attention(q, k, v, lengths, ratios)
        assert float((got.double() - _naive_dilated(q, k, v, lengths, ratios)).abs().max()) < 1e-5
    table = _mae_table(16, 7)
    pos = torch.tensor([0, 1, 2, 8, 23, 49])                  # 0: the class token, p: grid cell p - 1 (row-major x)
    assert np.allclose(grid_pos_embed(16, pos, 7).numpy(), table[pos.numpy()], atol=1e-12)


def test_slide_encoder_has_gigapath_parameter_names_and_loads_a_released_style_checkpoint(tmp_path):
    import torch

    from core.models.gigapath import LongNetViT, fit_state, read_state_dict

    cfg = {"in_chans": 24, "embed_dim": 16, "depth": 2, "num_heads": 4, "ffn_dim": 32, "dilated_ratio": [1, 2],
           "segment_length": [8, 16]}
    enc = LongNetViT(cfg).eval()
    parts = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "self_attn.inner_attn_ln",
             "self_attn_layer_norm", "ffn.fc1", "ffn.fc2", "ffn.ffn_layernorm", "final_layer_norm")
    expected = {"cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "encoder.layer_norm.weight",
                "encoder.layer_norm.bias", "norm.weight", "norm.bias"} | \
        {f"encoder.layers.{i}.{m}.{p}" for i in range(2) for m in parts for p in ("weight", "bias")}
    assert set(enc.state_dict()) == expected
    torch.save({"model": enc.state_dict()}, tmp_path / "slide_encoder.pth")     # GigaPath's file layout
    state = read_state_dict(tmp_path / "slide_encoder.pth")
    other = LongNetViT(cfg).eval()
    other.load_state_dict(fit_state(other, state, "f", "models.teacher.path", "slide encoder"), strict=True)
    x, coords = torch.randn(1, 20, 24), torch.randint(0, 30, (1, 20, 2)) * 256 + 100
    with torch.no_grad():
        a, b = enc(x, coords, all_layer_embed=True), other(x, coords, all_layer_embed=True)
    assert len(a) == 3 and all(torch.equal(u, v) for u, v in zip(a, b)) and a[-1].shape == (1, 16)
    with pytest.raises(ValueError, match="outside the slide encoder's grid"):
        enc(x, coords + 1000 * 256)
    # gigapath_slide_enc12l768d: 1536 -> 768, 12 layers of 16 heads, FFN 3072
    with torch.device("meta"):
        full = LongNetViT({"arch": "gigapath_slide_enc12l768d"})
    D, F = 768, 3072
    layer = 4 * (D * D + D) + 2 * D + 2 * D + (D * F + F) + (F * D + D) + 2 * F + 2 * D
    assert sum(p.numel() for p in full.parameters()) == 1536 * D + D + D + 12 * layer + 4 * D == 86_330_880
    assert full.config["segment_length"] == [1024, 5792, 32768, 185363, 1048576]   # GigaPath's for 262144 / 256


def test_tile_encoder_hidden_states_and_embeddings_are_timms():
    import timm
    import torch

    from core.models.gigapath import TINY_TEACHER, create_tile_encoder, encode_tiles

    net = create_tile_encoder(TINY_TEACHER["architecture"], TINY_TEACHER["model_args"]).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden, emb = encode_tiles(net, x)
        assert torch.allclose(emb, net(x), atol=1e-6)                       # the tile embedding = model(images)
        last = net.forward_intermediates(x, indices=[1], intermediates_only=True, return_prefix_tokens=True,
                                         norm=False, output_fmt="NLC")[0]
    assert hidden.shape == (3, 17, 64) and torch.allclose(hidden[:, 1:], last[0], atol=1e-6)
    assert torch.allclose(hidden[:, :1], last[1], atol=1e-6)              # the class token, last block, no norm
    assert isinstance(net, timm.models.vision_transformer.VisionTransformer)


def test_full_size_teacher_and_student_on_the_meta_device_and_the_dry_run_plan(data):
    import timm
    import torch

    from core.models import gigapath as gp
    from core.config import load_spec
    from core.workloads import get

    spec, _ = load_spec(FULL, ("models={teacher: {preset: prov-gigapath}}", "model.path=null",
                               f"data.path={data['slides']}"))
    cfg = gp.teacher_config(spec.models["teacher"])
    counts = gp.meta_counts(spec.distill, cfg)
    assert counts["teacher_tile"] == 1_134_953_984                        # as models.md: ViT-g/16 at 224 px
    with torch.device("meta"):
        ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    assert counts["student_tile"] == sum(p.numel() for p in ref.parameters()) == 85_798_656
    assert counts["teacher_slide"] == 86_330_880 and counts["teacher_tokens"] == counts["student_tokens"] == 197
    size = get("gigapath_distill").model_size(spec)
    assert size.total == counts["student"] and (size.layers, size.hidden, size.heads) == (12, 768, 12)
    res = cli("submit", FULL, "-c", "cuda_a100", "--dry-run", "--no-preflight", "--set", "model.path=null",
              "--set", "models={teacher: {preset: prov-gigapath}}", "--set", f"data.path={data['slides']}",
              "--set", f"data.labels_csv={data['labels_csv']}")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "step features: array of 2 tasks for 12 items (10 items/task)" in out and "at most 8 at once" in out
    assert "step main: 1 job (1 node x 8 tasks" in out and "afterok: features" in out
    est = float(out.split("memory: est. ")[1].split(" GiB/device")[0])
    assert 0 < est < 80 and "of 80 GiB" in out
    assert "1,134,953,984 parameters + slide encoder 86,330,880" in out and "85,798,656" in out
    assert "591.00 KiB per tile (197 x 1536 bf16)" in out
    sbatch = out.split("# ---- sbatch script: step features")[1]
    assert "#SBATCH --array=0-1%2" in sbatch and "#SBATCH --gres=gpu:1" in sbatch
    res = cli("submit", FULL, "-c", "cuda_a100", "--dry-run", "--no-preflight", "--set", "model.path=null",
              "--set", "models={teacher: {preset: prov-gigapath}}", "--set", f"data.path={data['slides']}",
              "--set", "model.seq_len=2048")
    assert res.returncode == 2 and "model.seq_len" in res.stderr and "set model.seq_len: 197" in res.stderr


# ---------------------------------------------------------------- bad input: refused before submission
def _no_tiles(data, tmp):
    slides = tmp / "slides"
    shutil.copytree(data["slides"], slides)
    for f in (slides / "slide_003").iterdir():
        f.unlink()
    return ("--set", f"data.path={slides}"), "data.path", [f"slide folder {slides / 'slide_003'} has no tiles"]


def _bad_names(data, tmp):
    slides = tmp / "slides"
    shutil.copytree(data["slides"], slides)
    first = sorted((slides / "slide_002").glob("*.png"))[0]
    first.rename(slides / "slide_002" / "tile 12.png")
    return ("--set", f"data.path={slides}"), "data.path", [
        f"slide folder {slides / 'slide_002'}: 1 tile name(s) do not parse as {{x:05d}}x_{{y:05d}}y.png", "tile 12.png"]


def _beta(data, tmp):
    return ("--set", "distill.beta=1.5"), "distill.beta", ["1.5 is outside [0, 1]"]


def _teacher_keys(data, tmp):
    import torch

    teacher = tmp / "teacher"
    shutil.copytree(data["teacher"], teacher)
    state = torch.load(teacher / "slide_encoder.pth", weights_only=True)["model"]
    state["cls_tok"] = state.pop("cls_token")
    del state["norm.weight"]
    torch.save({"model": state}, teacher / "slide_encoder.pth")
    return ("--set", f"models={{teacher: {{path: {teacher}}}}}"), "models.teacher.path", [
        f"{teacher / 'slide_encoder.pth'}: does not fit the slide encoder", "2 missing keys: cls_token, norm.weight",
        "1 unexpected keys: cls_tok"]


BAD = {"slide folder without tiles": _no_tiles, "tile names that do not parse": _bad_names,
       "beta outside [0, 1]": _beta, "teacher checkpoint keys": _teacher_keys}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_before_submission_naming_the_field(slurm, data, tmp_path, uname, case):
    sets, field, needles = BAD[case](data, tmp_path)
    res = cli("submit", SPEC, "-c", "local_slurm", "--set", f"name={uname}", *data_args(data), *sets,
              "--set", f"outputs.logs_dir={tmp_path / 'logs'}")
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith(f"error: {SPEC}: {field}: "), res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr
    assert "nothing was submitted" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "logs" / uname).exists()
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--name", f"{uname},{uname}-features", "-S", "now-1hours",
                          "-o", "JobID"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


# ---------------------------------------------------------------- through Slurm: features array, 2-rank training
@pytest.fixture(scope="module")
def reference(slurm, data):
    """Features array (4 tasks of 3 slides) -> 2-rank ZeRO-2 training on n1 + n2 -> evaluation and export."""
    run_dir = run_folder(submit(*gpd_args(data, "gpd_ref")).stdout)
    job = steps_of(run_dir)["main"]["job_ids"][0]
    assert final_state(job) == "COMPLETED", sorted((run_dir / "submitit").glob("*log.out"))
    return run_dir


def test_feature_array_runs_one_task_per_slide_chunk_before_training(reference, data):
    from safetensors import safe_open

    from core.data.slides import list_tiles

    steps = steps_of(reference)
    assert list(steps) == ["features", "main"]
    feats, main = steps["features"], steps["main"]
    assert feats["n_tasks"] == 4 and main["dependency"] == feats["job_ids"] and main["after"] == ["features"]
    arr = feats["job_ids"][0]
    assert sacct_states([arr]) == {f"{arr}_{i}": "COMPLETED" for i in range(4)}
    recs = task_records(reference, "features-")
    assert [r["items"] for r in recs] == [[f"slide_{i:03d}" for i in range(a, a + 3)] for a in (0, 3, 6, 9)]
    assert all(r["result"]["computed"] == r["items"] and r["result"]["skipped"] == [] for r in recs)
    for i in range(SLIDES):
        sid = f"slide_{i:03d}"
        folder = reference / "tiles" / sid if i == 0 else data["slides"] / sid      # slide_000 was tiled by its task
        names = [n for n, _, _ in list_tiles(folder)]
        with safe_open(str(reference / "features" / f"{sid}.safetensors"), "pt") as f:
            meta = f.metadata()
            assert json.loads(meta["names"]) == names and meta["folder"] == str(folder)
            assert tuple(f.get_tensor("hidden").shape) == (len(names), 17, 64)
            assert tuple(f.get_tensor("tile_emb").shape) == (len(names), 64)
            assert tuple(f.get_tensor("slide_emb").shape) == (32,)
    started = subprocess.run(["sacct", "-X", "-n", "-P", "-j", f"{arr},{main['job_ids'][0]}", "-o", "JobID,Start,End"],
                             capture_output=True, text=True, check=True).stdout.split()
    times = {ln.split("|")[0]: ln.split("|")[1:] for ln in started}
    assert times[main["job_ids"][0]][0] >= max(v[1] for k, v in times.items() if k.startswith(f"{arr}_"))


def test_cached_features_equal_a_fresh_teacher_pass(reference, data):
    import torch
    from safetensors.torch import load_file

    from core.models import gigapath as gp
    from core.workloads.gigapath_distill import load_tiles, read_features

    spec = spec_for(data)
    tile, slide = gp.load_teacher(spec.models["teacher"], gp.teacher_config(spec.models["teacher"]))
    for sid in ("slide_000", "slide_007"):
        f = read_features(reference, sid)
        cached = load_file(str(reference / "features" / f"{sid}.safetensors"))
        with torch.no_grad():
            hidden, emb = gp.encode_tiles(tile, load_tiles(Path(f["folder"]), f["names"], spec.data))
            s = slide(emb[None], f["coords"][None])[0][0]
        assert torch.allclose(hidden, cached["hidden"], atol=1e-5) and torch.allclose(emb, cached["tile_emb"], atol=1e-5)
        assert torch.allclose(s, cached["slide_emb"], atol=1e-5)


def test_two_rank_training_lowers_the_loss_and_raises_heldout_cosine(reference):
    from PIL import Image

    got = losses(reference)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    first, last = sum(v for _, v in got[:10]) / 10, sum(v for _, v in got[-10:]) / 10
    assert last < first / 4, (first, last)
    rows = list(csv.DictReader((reference / "metrics.csv").open()))
    assert {"hidden_loss", "slide_loss", "tile_cos"} <= set(rows[0])
    tasks = [json.loads(p.read_text()) for p in (reference / "tasks").glob("main.rank*.json")]
    assert sorted((t["rank"], t["host"]) for t in tasks) == [(0, "n1"), (1, "n2")]
    m = json.loads((reference / "results" / "metrics.json").read_text())
    assert m["heldout_slides"] == 4 and len(m["heldout"]) == 4
    before, after = m["before"], m["after"]
    assert after["tile_cos"] > before["tile_cos"] + 0.5 and after["tile_cos"] > 0.7, (before, after)
    assert after["slide_cos"] > before["slide_cos"] + 0.3 and after["slide_cos"] > 0.8, (before, after)
    assert after["tile_mse"] < before["tile_mse"] / 5 and after["slide_mse"] < before["slide_mse"] / 3
    table = list(csv.DictReader((reference / "results" / "slides.csv").open()))
    held = [r for r in table if r["split"] == "heldout"]
    assert sorted(r["slide_id"] for r in held) == m["heldout"] and len(table) == SLIDES
    assert after["tile_cos"] == pytest.approx(sum(float(r["tile_cos"]) for r in held) / 4)
    probe = m["probe"]
    assert probe["teacher"]["heldout"] == 4 and 0 <= probe["student"]["accuracy"] <= 1 and "auc" in probe["teacher"]
    with Image.open(reference / "results" / "distill.png") as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_exported_student_loads_with_timm_strictly_and_reproduces_the_training_time_embeddings(reference, data):
    import timm
    import torch
    from safetensors.torch import load_file

    from core.workloads.gigapath_distill import load_tiles, read_features

    cfg = json.loads((reference / "student" / "config.json").read_text())
    assert cfg["architecture"] == "vit_base_patch16_224" and cfg["num_classes"] == 0
    net = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
    assert not net.load_state_dict(load_file(str(reference / "student" / "model.safetensors")), strict=True).missing_keys
    net.eval()
    saved = load_file(str(reference / "results" / "embeddings.safetensors"))
    held = json.loads((reference / "results" / "metrics.json").read_text())["heldout"]
    assert sorted(k.split(".")[0] for k in saved if k.endswith(".tile_emb")) == held
    spec = spec_for(data)
    for sid in held:
        f = read_features(reference, sid)
        with torch.no_grad():
            emb = net(load_tiles(Path(f["folder"]), f["names"], spec.data))
        assert emb.shape == saved[f"{sid}.tile_emb"].shape and torch.allclose(emb, saved[f"{sid}.tile_emb"], atol=1e-5)
    heads = load_file(str(reference / "student" / "heads.safetensors"))
    assert {k.split(".")[0] for k in heads} == {"adaptor", "slide", "slide_head"}


# ---------------------------------------------------------------- resubmissions and requeue
@pytest.fixture(scope="module")
def resubmitted(slurm, data, reference):
    """A run whose second feature task fails at slide_004 (slide_003 already written): training is cancelled
    (afterok); --resume-missing submits the missing slides and the training, which is requeued at step 25."""
    run_dir = run_folder(submit(*gpd_args(data, "gpd_resub"), env={"MEDHPC_FAULT": "fail@slide:slide_004"}).stdout)
    steps = steps_of(run_dir)
    arr, main = steps["features"]["job_ids"][0], steps["main"]["job_ids"][0]
    first = wait_terminal([arr], expect_tasks=4, timeout=600)
    assert final_state(main) == "CANCELLED"
    kept = {p.name: p.stat().st_mtime_ns for p in (run_dir / "features").iterdir()}
    res = submit(*gpd_args(data, "gpd_resub", "--resume-missing", str(run_dir)),
                 env={"MEDHPC_FAULT": f"hold@step:{HOLD}"})
    again = run_folder(res.stdout)
    assert again == run_dir
    job = steps_of(run_dir)["main"]["job_ids"][0]
    t0 = time.time()
    while not (run_dir / f".held-{HOLD}").exists():                        # every rank waits at step 25
        assert time.time() - t0 < 600, "training never reached the hold"
        time.sleep(0.5)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000020"
    subprocess.run(["scontrol", "requeue", job], check=True)
    assert final_state(job) == "COMPLETED"
    return {"run_dir": run_dir, "first": first, "arr": arr, "kept": kept, "plan": res.stdout}


def test_failed_chunk_cancels_training_and_resume_missing_submits_only_slides_without_features(resubmitted):
    run_dir, arr = resubmitted["run_dir"], resubmitted["arr"]
    states = resubmitted["first"]
    assert states[f"{arr}_1"] == "FAILED" and [states[f"{arr}_{i}"] for i in (0, 2, 3)] == ["COMPLETED"] * 3
    assert sorted(resubmitted["kept"]) == [f"slide_{i:03d}.safetensors" for i in range(SLIDES) if i not in (4, 5)]
    assert "resubmitting only the 2 slide(s) without features: slide_004, slide_005" in resubmitted["plan"]
    steps = steps_of(run_dir)
    assert steps["features"]["n_tasks"] == 1 and steps["main"]["after"] == ["features"]
    (rec,) = [r for r in task_records(run_dir, "features-") if r["items"] == ["slide_004", "slide_005"]]
    assert rec["result"]["computed"] == ["slide_004", "slide_005"]
    now = {p.name: p.stat().st_mtime_ns for p in (run_dir / "features").iterdir()}
    assert all(now[name] == t for name, t in resubmitted["kept"].items())   # finished slides were not rewritten
    assert len(record(run_dir)["submissions"]) == 2


def test_requeue_in_the_middle_of_training_resumes_exactly(resubmitted, reference):
    run_dir = resubmitted["run_dir"]
    res = rank0_result(run_dir)
    assert res["start_step"] == 20 and res["steps"] == STEPS and res["restart_count"] >= 1
    got, ref = losses(run_dir), losses(reference)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))              # every step once
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, ref)) <= 1e-6
    mine = json.loads((run_dir / "results" / "metrics.json").read_text())
    theirs = json.loads((reference / "results" / "metrics.json").read_text())
    for when in ("before", "after"):
        assert mine[when] == pytest.approx(theirs[when], abs=1e-6)


def test_resubmitting_the_whole_run_skips_every_finished_slide(resubmitted, data):
    run_dir = resubmitted["run_dir"]
    res = submit(*gpd_args(data, "gpd_resub", "--resume", str(run_dir)))
    again = run_folder(res.stdout)
    assert again == run_dir and steps_of(run_dir)["features"]["n_tasks"] == 4
    job = steps_of(run_dir)["main"]["job_ids"][0]
    assert final_state(job) == "COMPLETED"
    arr = steps_of(run_dir)["features"]["job_ids"][0]
    recs = [r for r in task_records(run_dir, "features-") if r["job_id"].split("_")[0] == arr]
    assert len(recs) == 4 and all(r["result"]["computed"] == [] and r["result"]["skipped"] == r["items"] for r in recs)
    assert "teacher_load_s" not in recs[0]["result"]                       # the teacher was not even loaded
    assert rank0_result(run_dir)["start_step"] == STEPS                   # nothing left to train
    res = cli("submit", SPEC, "-c", "local_slurm", "--set", "name=gpd_resub", *data_args(data),
              "--set", f"outputs.logs_dir={data['logs']}", "--resume-missing", str(run_dir))
    assert res.returncode == 2 and "--resume-missing: every slide already has teacher features" in res.stderr


# ---------------------------------------------------------------- the README command
def test_tiny_spec_runs_on_the_local_executor(tmp_path):
    """jobs/tiny/gigapath_distill.yaml on its defaults (1 rank, local executor), data and teacher written on first use."""
    ds, teacher = tmp_path / "tiny_data", tmp_path / "teacher"
    res = cli("submit", SPEC, "--set", f"outputs.logs_dir={tmp_path / 'logs'}", "--set", f"data.path={ds / 'slides'}",
              "--set", f"data.labels_csv={ds / 'labels.csv'}",
              "--set", f"models={{teacher: {{path: {teacher}, make_tiny: true}}}}", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluation.metrics:" in res.stdout and "student.config:" in res.stdout
    run_dir = run_folder(res.stdout)
    m = json.loads((run_dir / "results" / "metrics.json").read_text())
    assert m["after"]["tile_cos"] > m["before"]["tile_cos"] and m["after"]["slide_cos"] > m["before"]["slide_cos"]
    assert (teacher / "slide_encoder.pth").is_file() and (ds / "labels.csv").is_file()
    assert len(list((run_dir / "features").glob("*.safetensors"))) == SLIDES


def test_cancel_by_name_finds_the_features_array_without_a_run_record(slurm, data, tmp_path, uname):
    """Cancelling by the run's name finds every step's jobs, GigaPath's `<name>-features` array included, even when
    run.json was never written (a submitter killed before writing it): the step names come from the registry, not
    from a list in a shared module. A job holding both nodes keeps the features array queued meanwhile."""
    from conftest import queue_ids, wait_terminal

    blocker = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-N", "2", "--exclusive", "-J", f"{uname}-hold",
                              "-o", "/dev/null", "--wrap", "sleep 600"], capture_output=True, text=True, check=True
                             ).stdout.strip().split(";")[0]
    ids: list[str] = []
    try:
        deadline = time.time() + 120
        while sacct_states([blocker]).get(blocker) != "RUNNING" and time.time() < deadline:
            time.sleep(1)
        run_dir = run_folder(submit(*gpd_args(data, uname), "--set", f"outputs.logs_dir={tmp_path}").stdout)
        rec = record(run_dir)
        ids = [j for st in rec["steps"] for j in st["job_ids"]]
        assert [st["name"] for st in rec["steps"]] == ["features", "main"]
        assert set(ids) <= {q.split("_")[0] for q in queue_ids()}  # all still queued
        (run_dir / "run.json").unlink()
        res = cli("cancel", uname)
        assert res.returncode == 0, res.stderr
        assert sorted(res.stdout.split()[1:]) == sorted(ids)
        assert set(wait_terminal(ids).values()) == {"CANCELLED"}
    finally:
        subprocess.run(["scancel", blocker, *ids], capture_output=True)
