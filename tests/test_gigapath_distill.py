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

from conftest import (cli, final_state, losses, rank0_result, record, run_folder, sacct_states, submit, task_records, log_tails,
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
    info = tile_wsi(tiff, tmp_path / "slide_000", tile_px=64, occupancy=0.1, target_mpp=0.5)
    got = list_tiles(tmp_path / "slide_000")
    assert info["tiles"] == len(got) > 10 and info["downsample"] == 4.0
    assert (info["level"], info["mpp"], info["level_mpp"], info["read_px"]) == (2, 0.125, 0.5, 64)   # from its tags
    assert (tmp_path / "slide_000" / "dataset.csv").read_text().count("\n") == len(got) + 1
    h, w = levels[2].shape[:2]
    assert len(got) < math.ceil(h / 64) * math.ceil(w / 64)            # background tiles left out
    for name, x, y in got[:5]:                                            # level-0 coordinates of the top-left corner
        with Image.open(tmp_path / "slide_000" / name) as im:
            tile = np.asarray(im)
        expect = levels[2][y // 4:y // 4 + 64, x // 4:x // 4 + 64]
        assert np.array_equal(tile[:expect.shape[0], :expect.shape[1]], expect)
        assert (tile.astype(float).mean(-1) < info["threshold"]).mean() > 0.1


# ---------------------------------------------------------------- magnification: each slide at its own level
def _scans(tmp):
    """The same synthetic tissue as a 40x-like scan (0.25 um/px at level 0, Aperio 'MPP =' description) and a
    20x-like one (0.5 um/px, XResolution / YResolution in pixels per centimetre), both with TCGA's 1 / 4 / 16
    pyramid, and one without any magnification."""
    import numpy as np
    from PIL import Image

    from core.data.slides import synthetic_canvas, write_pyramid

    tissue, _, _ = synthetic_canvas(1, 0, 64)                 # ~560 px: taken as a 0.25 um/px scan
    half = np.asarray(Image.fromarray(tissue).resize((tissue.shape[1] // 2, tissue.shape[0] // 2), Image.BICUBIC))
    write_pyramid(tmp / "s40.tiff", tissue, (1, 4, 16), mpp=0.25, aperio=True, anchor=0)
    write_pyramid(tmp / "s20.tiff", half, (1, 4, 16), mpp=0.5, anchor=0)
    write_pyramid(tmp / "bare.tiff", half, (1, 4), anchor=0)
    return tissue


def test_slides_scanned_at_40x_and_20x_give_the_same_tiles_at_half_a_micron_per_pixel(tmp_path):
    import numpy as np
    import tifffile
    from PIL import Image

    from core.data.slides import level_choice, list_tiles, read_region, slide_mpp, tile_wsi
    from core.errors import DatasetError

    _scans(tmp_path)
    a = tile_wsi(tmp_path / "s40.tiff", tmp_path / "t40", tile_px=64, occupancy=0.1, target_mpp=0.5)
    b = tile_wsi(tmp_path / "s20.tiff", tmp_path / "t20", tile_px=64, occupancy=0.1, target_mpp=0.5)
    # 40x: level 1 is 1.0 um/px (too coarse), so level 0 is read over 128 px and resized to 64; 20x: level 0 as it is
    assert (a["mpp"], a["mpp_source"], a["level"], a["read_px"], a["tile_mpp"]) == \
        (0.25, "ImageDescription MPP", 0, 128, 0.5)
    assert (b["mpp"], b["mpp_source"], b["level"], b["read_px"], b["tile_mpp"]) == \
        (0.5, "TIFF resolution tags", 0, 64, 0.5)
    assert json.loads((tmp_path / "t40" / "tiling.json").read_text())["read_px"] == 128
    um40 = {(x * 0.25, y * 0.25): n for n, x, y in list_tiles(tmp_path / "t40")}   # tile corners in microns
    um20 = {(x * 0.5, y * 0.5): n for n, x, y in list_tiles(tmp_path / "t20")}
    common = sorted(set(um40) & set(um20))
    assert len(common) >= 0.8 * max(len(um40), len(um20)) and len(common) >= 6
    assert all(x % 32 == 0 and y % 32 == 0 for x, y in common)     # a 32-um grid (64 px at 0.5 um/px)

    def tile(folder, name):
        with Image.open(folder / name) as im:
            return np.asarray(im, dtype=np.float32)

    same = [np.abs(tile(tmp_path / "t40", um40[k]) - tile(tmp_path / "t20", um20[k])).mean() for k in common]
    assert max(same) < 8 and tile(tmp_path / "t40", um40[common[0]]).shape == (64, 64, 3)
    # the old fixed level would have cut the 40x slide at 0.25 um/px: tiles of half the side, other content
    pinned = tile_wsi(tmp_path / "s40.tiff", tmp_path / "p40", tile_px=64, occupancy=0.1, level=0)
    assert pinned["tile_mpp"] == 0.25
    um_p = {(x * 0.25, y * 0.25): n for n, x, y in list_tiles(tmp_path / "p40")}
    wrong = [np.abs(tile(tmp_path / "p40", um_p[k]) - tile(tmp_path / "t20", um20[k])).mean()
             for k in common if k in um_p]
    assert wrong and np.mean(wrong) > 2 * np.mean(same)
    # a window read tile by tile equals the level read whole
    with tifffile.TiffFile(tmp_path / "s40.tiff") as tif:
        page = tif.series[0].levels[0].keyframe
        full = page.asarray()
        assert np.array_equal(read_region(tif, page, 200, 230, 300, 170), full[200:500, 230:400])
        assert slide_mpp(tif)[:2] == (0.25, 0.25)
    tifffile.imwrite(tmp_path / "strips.tif", full[:300, :200], photometric="rgb", rowsperstrip=37)
    with tifffile.TiffFile(tmp_path / "strips.tif") as tif:                  # strips: only those overlapping
        assert np.array_equal(read_region(tif, tif.pages[0], 50, 20, 120, 300)[:, :180], full[50:170, 20:200])
    tifffile.imwrite(tmp_path / "inch.tif", full[:64, :64], photometric="rgb", resolution=(25400 / 0.5,) * 2,
                     resolutionunit="INCH")
    with tifffile.TiffFile(tmp_path / "inch.tif") as tif:
        assert [round(v, 6) for v in slide_mpp(tif)[:2]] == [0.5, 0.5]
    # no magnification: refused naming the slide, unless the spec gives it
    with pytest.raises(DatasetError) as e:
        level_choice(tmp_path / "bare.tiff", 64)
    assert e.value.field == "data.path" and "slide bare has no magnification" in e.value.message
    assert "data.base_mpp" in e.value.message
    assert level_choice(tmp_path / "bare.tiff", 64, base_mpp=0.5).level == 0
    with pytest.raises(DatasetError) as e:                      # a scan coarser than the target
        level_choice(tmp_path / "s20.tiff", 64, target_mpp=0.25)
    assert e.value.field == "data.target_mpp" and "slide s20" in e.value.message


def test_plan_summarises_the_level_per_slide_and_refuses_a_slide_without_magnification(data, tmp_path):
    from core.config import load_spec
    from core.config import load_cluster
    from core.errors import FieldError
    from core.workloads.gigapath_distill import plan

    slides = tmp_path / "slides"
    slides.mkdir()
    _scans(slides)
    for sid in ("slide_001", "slide_002"):
        shutil.copytree(data["slides"] / sid, slides / sid)
    spec, _ = load_spec(SPEC, (f"data.path={slides}", "data.make_synthetic=false", "data.labels_csv=null",
                               f"models={{teacher: {{path: {data['teacher']}}}}}", "data.heldout=[slide_001]"))
    with pytest.raises(FieldError) as e:
        plan(spec)
    assert e.value.field == "data.path" and "slide bare has no magnification" in str(e.value)
    (slides / "bare.tiff").unlink()
    notes = plan(spec, cluster=load_cluster("local")).notes
    line = next(n for n in notes if n.startswith("whole-slide images tiled at 0.5 um/px"))
    assert "1 slide(s) level 0 (0.25 um/px at level 0, 0.25 at level 0: 128 px resized to 64)" in line
    assert "1 slide(s) level 0 (0.5 um/px at level 0, 0.5 at level 0: 64 px)" in line


# ---------------------------------------------------------------- the slide target: the same tiles as the student
def _cached_slide(data, run_dir, sid="slide_001", extra=()):
    """A feature file written by the features step's own code path (tiny teacher) for one tile-folder slide."""
    from core.workloads.gigapath_features import features
    from core.runtime import TaskContext

    spec = spec_for(data, *extra)
    ctx = TaskContext(run_dir=run_dir, step="features", job_id="0", root_id="0", task_index=0, items=[sid])
    features(spec, ctx)
    return spec


def test_slide_target_is_the_teacher_on_the_tiles_the_student_sees(data, tmp_path):
    import torch

    from core.models import gigapath as gp
    from core.workloads.gigapath_distill import draw_tiles, load_tiles, read_features, to_device, training_batch

    spec = _cached_slide(data, tmp_path)
    full = read_features(tmp_path, "slide_001")
    n = len(full["names"])
    rows = draw_tiles(n, 8, spec.data.seed, k=3)
    assert len(rows) == 8 and rows == sorted(rows) and rows == draw_tiles(n, 8, spec.data.seed, k=3)
    b = training_batch(spec, tmp_path, "slide_001", rows)
    cfg = gp.teacher_config(spec.models["teacher"])
    t_slide = gp.load_teacher_slide(spec.models["teacher"], cfg)
    out = to_device(b, torch.device("cpu"), torch.float32, t_slide)
    # by hand: the teacher (tile encoder, then slide encoder) on the images of exactly these tiles
    tile, slide = gp.load_teacher(spec.models["teacher"], cfg)
    images = load_tiles(Path(full["folder"]), [full["names"][i] for i in rows], spec.data)
    with torch.no_grad():
        _, emb = gp.encode_tiles(tile, images)
        target = slide(emb[None], full["coords"][rows][None])[0][0]
        student = gp.build_student(spec.distill, cfg).eval()(b["images"], b["coords"])["slide_emb"]
    assert torch.equal(b["images"], images) and torch.equal(b["coords"], full["coords"][rows])
    assert torch.allclose(b["t_hidden"], full["hidden"][rows]) and b["rows"] == rows
    assert torch.allclose(out["t_slide"], target, atol=1e-5)
    assert not torch.allclose(out["t_slide"], full["slide_emb"], atol=1e-2)      # not the whole slide's
    assert student.shape == out["t_slide"].shape
    whole = to_device(b, torch.device("cpu"), torch.float32, None)             # distill.slide_target: whole
    assert torch.equal(whole["t_slide"], full["slide_emb"])
    # all tiles drawn: the subset target is the cached whole-slide embedding
    every = to_device(training_batch(spec, tmp_path, "slide_001", None), torch.device("cpu"), torch.float32, t_slide)
    assert torch.allclose(every["t_slide"], full["slide_emb"], atol=1e-5)


def test_evaluation_in_chunks_equals_all_tiles_at_once_and_long_slides_share_one_subset(data, tmp_path):
    import torch

    from core.metrics.embedding import embedding_agreement
    from core.models import gigapath as gp
    from core.workloads.gigapath_distill import evaluate_slide, load_tiles, read_features

    spec = _cached_slide(data, tmp_path)
    f = read_features(tmp_path, "slide_001")
    torch.manual_seed(1)
    model = gp.build_student(spec.distill, gp.teacher_config(spec.models["teacher"])).eval()
    with torch.no_grad():
        row = evaluate_slide(spec, tmp_path, "slide_001", model, torch.device("cpu"), torch.float32, chunk=5,
                             keep_tiles=True)
        out = model(load_tiles(Path(f["folder"]), f["names"], spec.data), f["coords"])
    ref = embedding_agreement(out["hidden"], f["hidden"], out["slide_emb"], f["slide_emb"])
    for k, v in ref.items():
        assert row[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert torch.allclose(row["tile_emb"], out["tile_emb"], atol=1e-5) and row["slide_tiles"] == len(f["names"])
    # a slide longer than distill.slide_max_tiles: the cached teacher slide embedding and the student's come from the
    # same seeded subset of tiles
    from core.config import load_cluster, load_spec
    from core.workloads.gigapath_distill import slide_length_notes, slide_rows

    capped = _cached_slide(data, tmp_path / "capped", extra=("distill.slide_max_tiles=10",))
    fc = read_features(tmp_path / "capped", "slide_001")
    rows = slide_rows(len(fc["names"]), 10, capped.data.seed)
    assert len(rows) == 10 and rows == slide_rows(len(fc["names"]), 10, capped.data.seed)
    _, t_slide = gp.load_teacher(capped.models["teacher"], gp.teacher_config(capped.models["teacher"]))
    with torch.no_grad():
        assert torch.allclose(fc["slide_emb"], t_slide(fc["tile_emb"][rows][None], fc["coords"][rows][None])[0][0],
                              atol=1e-5)
        row = evaluate_slide(capped, tmp_path / "capped", "slide_001", model, torch.device("cpu"), torch.float32, 7)
        mine = model.slide_head(model.slide(out["tile_emb"][rows][None], f["coords"][rows][None])[0])[0]
    assert row["slide_tiles"] == 10 and torch.allclose(torch.tensor(row["student_slide"]), mine, atol=1e-5)
    assert row["tile_cos"] == pytest.approx(ref["tile_cos"], rel=1e-4)       # the tokens: still every tile
    # the plan: a cap names the longer slides; without one, a slide too long for the device gets a note
    a100 = load_cluster("cuda_a100")
    full, _ = load_spec(FULL, ("model.path=null",))
    cfg = gp.teacher_config(full.models["teacher"])
    (note,) = slide_length_notes(full, cfg, {"a": 60_000, "b": 900}, a100)
    assert "1 slide(s) longer use a seeded subset of 20,000 for teacher and student alike (a)" in note
    uncapped, _ = load_spec(FULL, ("distill.slide_max_tiles=null",))
    (note,) = slide_length_notes(uncapped, cfg, {"a": 150_000}, a100)
    assert "the longest slide (150,000 tiles) needs ~" in note and "set distill.slide_max_tiles" in note
    assert slide_length_notes(uncapped, cfg, {"a": 5_000}, a100) == []


# ---------------------------------------------------------------- the cache: dtype, size, where it may go
def test_cache_bytes_fp16_overflow_and_cache_root_under_scratch_roots_with_room(data, tmp_path):
    import torch

    from core.config import load_cluster
    from core.workloads.gigapath_distill import cache_problems
    from core.workloads.gigapath_features import cache_bytes_per_tile, to_cache

    per = cache_bytes_per_tile(197, 1536, "fp16")
    assert per["hidden"] == 605_184 and per["total"] == 605_184 + 6144 + 16       # 591 KiB + 6 KiB + 16 B
    assert cache_bytes_per_tile(1, 1536, "fp32")["hidden"] == 6144
    assert to_cache(torch.tensor([[1.5, -60000.0]]), torch.float16, "s", 0).dtype == torch.float16
    with pytest.raises(ValueError, match="slide s7, tiles from 64: hidden states up to 7e\\+04 overflow fp16"):
        to_cache(torch.tensor([[1.0, 70000.0]]), torch.float16, "s7", 64)
    local = load_cluster("local")                                   # scratch_roots: [/tmp]
    inside = spec_for(data, f"distill.cache_root={tmp_path / 'cache'}")
    assert cache_problems(inside, local, 10 * 2 ** 20) == []
    (field, why), = cache_problems(inside, local, 2 ** 62)          # more than any disk: refused with the free space
    assert field == "distill.cache_root" and "the teacher features need ~" in why and " free" in why
    outside = spec_for(data, "distill.cache_root=/var/cache/gigapath")
    (field, why), = cache_problems(outside, local, 1)
    assert field == "distill.cache_root" and "outside the folders local allows (/tmp)" in why
    assert cache_problems(spec_for(data, "distill.cache_root=logs/gp_cache"), local, 1) == []
    # the features step writes there (fp16), the training reads it back from there, not from the run folder
    from core.workloads.gigapath_distill import training_batch
    from core.workloads.gigapath_features import features_dir, fingerprint, safetensors_metadata

    spec = _cached_slide(data, tmp_path / "run", extra=(f"distill.cache_root={tmp_path / 'cache'}",
                                                        "distill.cache_dtype=fp16"))
    where = features_dir(tmp_path / "run", spec)
    assert where == tmp_path / "cache" / f"{spec.name}-{fingerprint(spec)}"
    assert not (tmp_path / "run" / "features").exists()
    assert safetensors_metadata(where / "slide_001.safetensors")["cache_dtype"] == "fp16"
    b = training_batch(spec, tmp_path / "run", "slide_001", [0, 2])
    assert b["t_hidden"].shape[0] == 2 and b["t_hidden"].dtype == torch.float32


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
    assert size.trainable == counts["student"] and (size.layers, size.hidden, size.heads) == (12, 768, 12)
    assert size.total == counts["student"] + counts["teacher_slide"]          # the frozen slide-target encoder
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
    assert "cache 597.02 KiB per tile (197 x 1536 fp16 tokens 591.00 KiB + tile embedding 6.00 KiB)" in out
    assert "whole-slide images tiled at 0.5 um/px (+-0.1): 1 slide(s) level 2 (0.125 um/px at level 0" in out
    sbatch = out.split("# ---- sbatch script: step features")[1]
    assert "#SBATCH --array=0-1%2" in sbatch and "#SBATCH --gres=gpu:1" in sbatch
    # the spec as it is, away from the data: the whole plan from the preset, the estimate, then what is missing
    res = cli("submit", FULL, "--dry-run", "--no-preflight")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "1,134,953,984 parameters + slide encoder 86,330,880" in res.stdout and "memory: est. " in res.stdout
    assert "N slides unknown here" in res.stdout and "5.69 GiB per 10,000-tile slide in /scratch/" in res.stdout
    assert "step main: 1 job (1 node x 8 tasks" in res.stdout and "afterok: features" in res.stdout
    assert res.stderr.lstrip().startswith(f"error: {FULL}: a submission would be refused:")
    for field in ("data.path: /data/tcga/tiles: not a folder", "models.teacher.path: /data/models/prov-gigapath",
                  "model.path: /data/models/vit_base_patch16_224"):
        assert field in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
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
    assert final_state(job) == "COMPLETED", log_tails(run_dir)
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
    # the evaluations said how far they got; the submitting terminal showed each one's end
    done = f"scoring the slides against the teacher (trained student): {SLIDES}/{SLIDES}"
    assert done in res.stdout and "(untrained student)" in res.stdout, res.stdout
    from core.results.progress import read_note
    assert read_note(run_dir) == ("scoring the slides against the teacher (trained student)", SLIDES, SLIDES)


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
