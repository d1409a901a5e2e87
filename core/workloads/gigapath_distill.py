"""Prov-GigaPath distillation: a frozen ViT-giant tile encoder + LongNet slide encoder (the teacher) into a ViT-Base
tile encoder + feature adaptor + smaller slide encoder (the student), on the engine (DeepSpeed ZeRO, checkpoints,
exact resume, requeue).

Steps (`plan` below, checked before anything is submitted):
- `features` (core.workloads.gigapath_features): a Slurm array of single-device tasks, `distill.slides_per_task`
  slides each. A task tiles the slides that are whole-slide images (core.data.slides.tile_wsi), runs the frozen
  teacher once over every tile and writes `features/<slide>.safetensors` atomically: the last block's tokens
  (`hidden`, in distill.cache_dtype), the tile embeddings, the slide embedding and the tile coordinates, with the
  tile names and a fingerprint of the teacher and the preprocessing. A slide whose file is there with the same
  fingerprint and tiles is skipped, so a resubmission (`--resume`) recomputes nothing and `--resume-missing`
  submits only the slides without a file.
- `main` (afterok: features): trains the student on the cached features, never running the teacher: one
  micro-step is one training slide (deepspeed.micro_batch of its tiles, drawn anew each epoch; all of them when it
  has fewer), loss = beta * L_hidden(adaptor(student last-block tokens), teacher's) + (1 - beta) *
  L_slide(student slide embedding, teacher's); deepspeed.grad_accum slides per rank per optimizer step. Then every
  rank scores its share of the slides (held-out metrics: cosine and MSE of student vs teacher tile and slide
  embeddings, before and after training; a scikit-learn logistic-regression probe on slide embeddings when labels
  are given), rank 0 writes results/ and the student is exported in timm's layout (student/).
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, PositiveInt

from core.errors import DatasetError
from core.metrics.embedding import AGREEMENT
from core.results import ResultFolder
from core.run_folder import atomic_path, write_json_atomic
from core.runtime import TaskContext
from core.config import DataSpec, FieldError, JobSpec, Strict
from core.workloads import Shape, Workload
from core.workloads.common import rank0_index
from core.workloads.gigapath_features import (FEATURES, FORMAT, cache_bytes_per_tile, done_slides,  # noqa: F401
                                              features, features_dir, features_path, fingerprint, load_tiles,
                                              read_features, read_hidden, safetensors_metadata, slide_rows)

log = logging.getLogger("gigapath_distill")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DistillSection(Strict):
    beta: float = Field(0.5, description="weight of the hidden-state loss; 1 - beta weighs the slide-embedding loss "
                                         "(must lie in [0, 1])")
    loss: Literal["mse", "smooth_l1", "cosine"] = Field("mse", description="distance of both loss terms")
    hidden_tokens: Literal["all", "cls"] = Field("all", description="match every last-block token or the class "
                                                                    "token only (1/197 of the cache)")
    hidden_norm: bool = Field(False, description="match the tokens after the final norm instead of the last "
                                                 "block's raw output")
    student_arch: str = Field("vit_base_patch16_224", description="timm name of the student tile encoder")
    student_kwargs: dict[str, Any] = Field(default_factory=dict, description="further timm.create_model arguments")
    adaptor: Literal["linear", "mlp"] = Field("linear", description="feature adaptor: student width -> teacher's")
    student_slide: dict[str, Any] = Field(
        default_factory=lambda: {"embed_dim": 384, "depth": 6, "num_heads": 16, "ffn_dim": 1536,
                                 "dropout": 0.1, "drop_path_rate": 0.1},
        description="the student's LongNet slide encoder (GigaPath LongNetViT arguments: arch or embed_dim, depth, "
                    "num_heads, ffn_dim, dilated_ratio, segment_length, slide_ngrids, tile_size, global_pool, "
                    "dropout, drop_path_rate); a linear head maps it to the teacher's slide width")
    tile_chunk: Optional[PositiveInt] = Field(None, description="tiles per student tile-encoder forward inside a "
                                                                "micro-step (None: all at once)")
    teacher_precision: Literal["autocast", "bf16", "fp16", "fp32"] = Field(
        "autocast", description="teacher in the features step: autocast = Prov-GigaPath's fp32 weights under fp16 "
                                "autocast on CUDA (plain fp32 on CPU); bf16 / fp16 / fp32 cast the weights")
    cache_dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="dtype of the cached hidden states "
                                                                             "(fp16: 10-bit mantissa at bf16's size; "
                                                                             "values over 65504 are refused)")
    slide_target: Literal["subset", "whole"] = Field(
        "subset", description="the slide target of a training step: subset = the frozen teacher slide encoder on the "
                              "cached tile embeddings of the same tiles the student sees (the lab's notes); whole = "
                              "the cached embedding of the whole slide")
    slide_max_tiles: Optional[PositiveInt] = Field(
        None, description="most tiles a slide encoder takes at once in evaluation and the cached slide embedding; a "
                          "longer slide uses a seeded subset of that many for teacher and student alike (None: all)")
    cache_root: Optional[str] = Field(None, description="folder for the teacher features (None: <run>/features): "
                                                        "relative inside the checkout's logs/, or absolute under one "
                                                        "of the profile's scratch_roots (or logs_roots)")
    teacher_batch: PositiveInt = Field(64, description="tiles per teacher forward in the features step")
    slides_per_task: PositiveInt = Field(1, description="slides per task of the features array")
    ignore_unexpected_keys: bool = Field(False, description="load a teacher checkpoint that has extra tensors")
    evaluate: bool = True
    eval_before: bool = Field(True, description="also score the untrained student (the 'before' figures)")
    export: bool = True


class SlideData(DataSpec):
    path: Optional[str] = Field(None, description="folder with one folder of tiles ({x:05d}x_{y:05d}y.png) or one "
                                                  "whole-slide image (.svs/.tif/.tiff/.ndpi) per slide")
    labels_csv: Optional[str] = Field(None, description="slide_id,label CSV (optional: the linear probe)")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="slides held out for evaluation (stratified)")
    heldout: Optional[list[str]] = Field(None, description="explicit held-out slide ids (instead of the fraction)")
    image_size: PositiveInt = Field(224, description="encoder input: tiles resized to S*256/224, centre-cropped to S")
    tile_px: PositiveInt = Field(256, description="tile side in pixels at target_mpp when tiling whole-slide images")
    target_mpp: float = Field(0.5, gt=0, description="microns per pixel of the tiles (Prov-GigaPath: 0.5); each "
                                                     "slide's level is chosen from its own mpp")
    mpp_tolerance: float = Field(0.1, ge=0, description="a level within this many um/px of target_mpp is read as it "
                                                        "is (GigaPath's find_level_for_target_mpp: 0.1); otherwise "
                                                        "the nearest finer level is read and resized")
    base_mpp: Optional[float] = Field(None, gt=0, description="um per level-0 pixel for slides whose files carry no "
                                                              "mpp (0.25 for a 40x scan); files that do are read")
    wsi_level: Optional[int] = Field(None, ge=0, description="pin this pyramid level for every slide, read as it is "
                                                             "(None: chosen per slide from its mpp)")
    occupancy: float = Field(0.1, ge=0, lt=1, description="least tissue share of a kept tile")
    tissue_threshold: Optional[float] = Field(None, description="luminance below it is tissue (None: Otsu)")
    tiles_dir: Optional[str] = Field(None, description="where whole-slide images are tiled (None: <run>/tiles)")
    synthetic_slides: PositiveInt = Field(12, description="make_synthetic: number of slides")
    synthetic_wsi: int = Field(1, ge=0, description="make_synthetic: how many of them as pyramidal TIFFs")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


# ---------------------------------------------------------------- planning
def synthetic_root(d) -> Path:
    return Path(d.path).parent


def _check_section(spec: JobSpec) -> None:
    s, d = spec.distill, spec.data
    if not 0 <= s.beta <= 1:
        raise FieldError("distill.beta", f"{s.beta} is outside [0, 1]: the loss is beta * L_hidden + (1 - beta) * "
                                         f"L_slide")
    if not d.path:
        raise FieldError("data.path", "give the folder of slides (one folder of tiles or one whole-slide image each)")
    if any(v <= 0 for v in d.std):
        raise FieldError("data.std", "must be > 0 per channel")
    if d.make_synthetic:
        root = synthetic_root(d)
        if Path(d.path) != root / "slides":
            raise FieldError("data.path", f"data.make_synthetic writes the slides to <folder>/slides; point data.path "
                                          f"at {root / 'slides'}")
        if d.labels_csv and Path(d.labels_csv) != root / "labels.csv":
            raise FieldError("data.labels_csv", f"data.make_synthetic writes {root / 'labels.csv'}; point it there")


def read_dataset(spec: JobSpec):
    """(scan, train, held-out) of the spec's slides; DatasetError -> FieldError naming field and file."""
    from core.data.slides import scan, split_heldout

    d = spec.data
    try:
        found = scan(d.path, d.labels_csv)
        train, held = split_heldout(found.slides, d.heldout_fraction, d.seed, d.heldout)
    except DatasetError as e:
        raise FieldError(e.field, e.message) from None
    if not train:
        raise FieldError("data.heldout_fraction", f"no slide left for training out of {len(found.slides)}")
    if spec.distill.evaluate and not held:
        raise FieldError("data.heldout_fraction", f"no held-out slide among {len(found.slides)}: raise "
                                                  f"data.heldout_fraction, name data.heldout, or set "
                                                  f"distill.evaluate: false")
    return found, train, held


def _model_checks(spec: JobSpec, problems: Optional[list] = None) -> dict:
    """Teacher and student built on the meta device: weight files whose keys do not fit, token counts and
    widths that cannot be matched, a bad student slide config. Imports torch (after the dataset checks)."""
    from core.models import gigapath as gp

    s, t = spec.distill, spec.models["teacher"]
    if t.make_tiny:
        if not t.path:
            raise FieldError("models.teacher.path", "make_tiny writes the tiny teacher there: give a folder")
        gp.write_tiny_teacher(t.path)
    elif t.path and not Path(t.path).is_dir():
        why = (f"{t.path}: not a folder (the Prov-GigaPath folder: config.json, pytorch_model.bin, "
               f"slide_encoder.pth)")
        if problems is None or not t.preset:
            raise FieldError("models.teacher.path", why)
        problems.append(("models.teacher.path", why + f"; planned with the preset {t.preset}"))
    cfg = gp.teacher_config(t)
    try:
        gp.slide_config({"in_chans": gp.teacher_width(cfg), **cfg.get("slide_encoder", {})})
    except ValueError as e:
        raise FieldError("models.teacher.path", f"slide_encoder in config.json: {e}") from None
    try:
        gp.slide_config({"in_chans": 1, **s.student_slide})
    except ValueError as e:
        raise FieldError("distill.student_slide", str(e)) from None
    files = gp.check_teacher_files(t, cfg, s.ignore_unexpected_keys)
    counts = gp.meta_counts(s, cfg)
    if counts["teacher_tokens"] != counts["student_tokens"] and s.hidden_tokens == "all":
        raise FieldError("distill.student_kwargs", f"the student attends over {counts['student_tokens']} tokens per "
                                                   f"tile, the teacher over {counts['teacher_tokens']}: make img_size "
                                                   f"/ patch_size agree or set distill.hidden_tokens: cls")
    if tuple(counts["student_img"]) != (spec.data.image_size,) * 2:
        raise FieldError("data.image_size", f"{spec.data.image_size} but the student takes {counts['student_img']}")
    if tuple(counts["teacher_img"]) != (spec.data.image_size,) * 2:
        raise FieldError("data.image_size", f"{spec.data.image_size} but the teacher takes {counts['teacher_img']}")
    if spec.model.path and not Path(spec.model.path).exists():
        why = (f"{spec.model.path}: student weights not found (a timm checkpoint file or folder; leave it out for a "
               f"random start)")
        if problems is None:
            raise FieldError("model.path", why)
        problems.append(("model.path", why))
    elif spec.model.path:
        gp.check_student_weights(counts["student_model"], spec.model.path)
    return {**counts, **files, "config": cfg}


def plan(spec: JobSpec, resume_dir: Optional[Path] = None, cluster=None) -> Shape:
    """features array (a slide chunk per task) -> training + evaluation (afterok). Bad input is a FieldError; data,
    teacher folder and student weights absent from this machine are `problems`: a dry run prints the whole plan
    (the teacher from models.teacher.preset) and then lists them."""
    s, d = spec.distill, spec.data
    _check_section(spec)
    notes, problems = [], []
    if d.make_synthetic:
        from core.data.slides import write_synthetic

        write_synthetic(synthetic_root(d), slides=d.synthetic_slides, wsi=d.synthetic_wsi, tile_px=d.tile_px,
                        seed=d.seed, occupancy=d.occupancy)
        notes.append(f"synthetic slides (scikit-image's immunohistochemistry sample) under {synthetic_root(d)}")
    found = train = held = None
    if not Path(d.path).is_dir() and not d.make_synthetic:
        problems.append(("data.path", f"{d.path}: not a folder on this machine (the folder that holds one folder of "
                                      f"tiles, or one whole-slide image, per slide)"))
    else:
        found, train, held = read_dataset(spec)
    m = _model_checks(spec, problems)
    choices = wsi_choices(spec, found) if found else {}
    if found is not None:
        ids = [sl.id for sl in found.slides]
        items = ids
        if resume_dir is not None:
            done = done_slides(resume_dir, ids, fingerprint(spec), spec)
            items = [i for i in ids if i not in done]
            if not items:
                raise FieldError("--resume-missing", f"every slide already has teacher features in "
                                                     f"{features_dir(resume_dir, spec)}; use --resume to continue "
                                                     f"the training")
            notes.append(f"resubmitting only the {len(items)} slide(s) without features: {', '.join(items[:8])}"
                         + (" ..." if len(items) > 8 else ""))
        folders = [sl for sl in found.slides if sl.kind == "tiles"]
        wsis = [sl for sl in found.slides if sl.kind == "wsi"]
        tiles = sum(sl.tiles or 0 for sl in folders)
        est = sum(c["tiles_est"] for c in choices.values())
        what = f"{len(folders)} tile folder(s) with {tiles:,} tiles" + \
            (f", {len(wsis)} whole-slide image(s) (~{est:,} tiles est.)" if wsis else "")
        labels = ", ".join(f"{c} {sum(sl.label == c for sl in found.slides)}" for c in found.classes)
        notes.append(f"dataset: {len(found.slides)} slides ({what}); train {len(train)}, held out {len(held)}"
                     + (f"; labels {labels}" if found.classes else ""))
        if wsis:
            notes.append(level_summary(spec, choices))
        if found.unlabeled:
            notes.append(f"{len(found.unlabeled)} slide(s) without a label (left out of the probe)")
        counts = {sl.id: sl.tiles for sl in folders} | {k: c["tiles_est"] for k, c in choices.items()}
    else:
        items, counts = ["<slides unknown here>"], {}
        notes.append(f"dataset: {d.path} is not on this machine: N slides unknown here (one features task shown); "
                     f"whole-slide images get the level nearest {d.target_mpp:g} um/px from their own mpp")
    tokens = m["teacher_tokens"] if s.hidden_tokens == "all" else 1
    per = cache_bytes_per_tile(tokens, m["teacher_dim"], s.cache_dtype)
    cfg = m["config"]
    notes.append(f"teacher: {cfg['architecture']} at {m['teacher_img'][0]} px, {m['teacher_tile']:,} parameters + "
                 f"slide encoder {m['teacher_slide']:,}, frozen"
                 + ("" if m["tile_file"] or (spec.models['teacher'].path and Path(spec.models['teacher'].path).is_dir())
                    else " (no weights: preset only, random init: for dry runs and tests)"))
    tasks = -(-len(items) // s.slides_per_task)
    total = per["total"] * sum(counts.values())
    where = features_dir(Path(spec.outputs.logs_dir) / spec.name / "<run>", spec) if s.cache_root else \
        "<run>/features"
    notes.append(f"features once: {len(items) if found else 'N'} slide(s) in {tasks if found else '?'} task(s); "
                 f"cache {_size(per['total'])} per tile ({tokens} x {m['teacher_dim']} {s.cache_dtype} tokens "
                 f"{_size(per['hidden'])} + tile embedding {_size(per['tile_emb'])})"
                 + (f", {_size(total)} for {sum(counts.values()):,} tiles" if counts else
                    f", {_size(per['total'] * 10_000)} per 10,000-tile slide")
                 + f" in {where}; training reads it every epoch instead of running the teacher")
    problems += cache_problems(spec, cluster, total if counts else 0)
    prec = s.teacher_precision
    act = 2 * m["teacher_tokens"] * s.teacher_batch * m["teacher_dim"] * (34 + 5 * 24 * m["teacher_tokens"] /
                                                                          m["teacher_dim"])
    wbytes = (4 if prec in ("fp32", "autocast") else 2) * (m["teacher_tile"] + m["teacher_slide"])
    notes.append(f"features task memory: teacher weights {_size(wbytes)} ({prec}"
                 + (": fp32 weights, fp16 autocast on CUDA as Prov-GigaPath" if prec == "autocast" else "")
                 + f") + one block's activations for {s.teacher_batch} tiles ~{_size(act)} per device")
    notes.append(f"student: {s.student_arch} {m['student_tile']:,} + adaptor {m['adaptor']:,} + slide encoder "
                 f"{m['student_slide']:,}; a micro-step is one slide (deepspeed.micro_batch tiles of it); slide "
                 + ("target: the teacher slide encoder on the cached tile embeddings of the same tiles"
                    if s.slide_target == "subset" else "target: the cached embedding of the whole slide"))
    notes += slide_length_notes(spec, cfg, counts, cluster)
    return Shape(items=None, pre="features", pre_items=items, pre_items_per_task=s.slides_per_task, merge=False,
                 notes=notes, problems=problems)


def wsi_choices(spec: JobSpec, found) -> dict:
    """Per whole-slide image: the level choice (core.data.slides.level_choice) and the tile count estimated from
    the tissue on its lowest level; a slide without mpp is refused by name."""
    from core.data.slides import estimate_tiles, level_choice

    d, out = spec.data, {}
    import tifffile

    for sl in found.slides:
        if sl.kind != "wsi":
            continue
        try:
            with tifffile.TiffFile(sl.source) as tif:
                ch = level_choice(sl.source, d.tile_px, d.target_mpp, d.mpp_tolerance, d.base_mpp, d.wsi_level,
                                  tif=tif)
                est = estimate_tiles(sl.source, ch, d.tissue_threshold, d.occupancy, tif=tif)
        except DatasetError as e:
            raise FieldError(e.field, e.message) from None
        out[sl.id] = {**ch.to_json(), "tiles_est": est}
    return out


def level_summary(spec: JobSpec, choices: dict) -> str:
    """One line: how many slides are read at which level and mpp, resized or not."""
    from collections import Counter

    d = spec.data
    groups = Counter()
    for c in choices.values():
        mpp = "?" if c["mpp"] is None else f"{c['mpp']:.3g}"
        lm = "?" if c["level_mpp"] is None else f"{c['level_mpp']:.3g}"
        how = f"{c['read_px']} px resized to {c['tile_px']}" if c["read_px"] != c["tile_px"] else f"{c['tile_px']} px"
        groups[f"level {c['level']} ({mpp} um/px at level 0, {lm} at level {c['level']}: {how})"] += 1
    head = (f"whole-slide images at data.wsi_level {d.wsi_level}" if d.wsi_level is not None else
            f"whole-slide images tiled at {d.target_mpp:g} um/px (+-{d.mpp_tolerance:g})")
    return head + ": " + "; ".join(f"{n} slide(s) {g}" for g, n in sorted(groups.items()))


def cache_problems(spec: JobSpec, cluster, total: int) -> list[tuple[str, str]]:
    """distill.cache_root outside the checkout's logs/ and the profile's scratch_roots / logs_roots, or a cache larger
    than the free space the planner can see where it goes."""
    import shutil

    from core.run_folder import LOGS, REPO

    s, out = spec.distill, []
    if s.cache_root:
        p = Path(s.cache_root)
        target = (p if p.is_absolute() else REPO / p).resolve()
        roots = list(dict.fromkeys(Path(r).resolve() for r in ((getattr(cluster, "scratch_roots", None) or []) +
                                                               (getattr(cluster, "logs_roots", None) or [])))) \
            if p.is_absolute() else [LOGS.resolve()]
        if not any(target == r or r in target.parents for r in roots):
            name = getattr(cluster, "name", "the profile")
            allowed = ", ".join(map(str, roots)) or "none: the profile sets no scratch_roots"
            out.append(("distill.cache_root", f"{target} is outside the folders {name} allows ({allowed}); add it "
                                              f"to the profile's scratch_roots or use a path relative to logs/"))
            return out
        where = target
    else:
        lp = Path(spec.outputs.logs_dir)
        where = (lp if lp.is_absolute() else REPO / lp)
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if total and probe.exists():
        free = shutil.disk_usage(probe).free
        if total > free:
            out.append(("distill.cache_root" if s.cache_root else "outputs.logs_dir",
                        f"the teacher features need ~{_size(total)} but {probe} has {_size(free)} free; point "
                        f"distill.cache_root at a scratch folder with room, or cache fewer tokens "
                        f"(distill.hidden_tokens: cls)"))
    return out


def slide_encoder_peak_bytes(cfg: dict, n: int) -> int:
    """Rough peak bytes of a LongNet slide encoder forward (no grad) over n tiles with this module's attention:
    the largest score block (heads x (segment / dilation)^2, float32, with its exponential and the matmul) plus
    a few (n x ffn) activations."""
    seg = cfg["segment_length"]
    heads = cfg["num_heads"]
    block = max(heads * (min(sl, n) // r + 1) ** 2 for sl, r in zip(seg, cfg["dilated_ratio"]))
    return int(3 * 4 * block + 8 * 4 * n * max(cfg["ffn_dim"], cfg["embed_dim"]))


def slide_length_notes(spec: JobSpec, teacher_cfg: dict, counts: dict, cluster) -> list[str]:
    """A plan note when the longest slide's slide-encoder pass would not fit the device (or exceeds
    distill.slide_max_tiles, which caps it)."""
    from core.models import gigapath as gp

    cap = spec.distill.slide_max_tiles
    longest = max(counts.values()) if counts else 0
    mem = (getattr(cluster, "device_mem_gb", None) or 0) * 2 ** 30 \
        if getattr(cluster, "accelerator", "cpu") != "cpu" else 0
    cfg = gp.slide_config({"in_chans": gp.teacher_width(teacher_cfg), **teacher_cfg.get("slide_encoder", {})})
    out = []
    if cap:
        over = sorted(k for k, v in counts.items() if v > cap)
        need = slide_encoder_peak_bytes(cfg, cap)
        out.append(f"slide encoders see at most {cap:,} tiles at once (distill.slide_max_tiles; ~{_size(need)} for the "
                   f"teacher's): " + (f"{len(over)} slide(s) longer use a seeded subset of {cap:,} for teacher and "
                                      f"student alike ({', '.join(over[:5])}{' ...' if len(over) > 5 else ''})"
                                      if over else "no slide here is longer"))
    elif longest and mem:
        need = slide_encoder_peak_bytes(cfg, longest)
        if need > mem / 2:
            fits = next((n for n in (100_000, 50_000, 20_000, 10_000, 5_000, 2_000)
                         if slide_encoder_peak_bytes(cfg, n) <= mem / 2), 1_000)
            out.append(f"the longest slide ({longest:,} tiles) needs ~{_size(need)} in the teacher slide encoder, "
                       f"over half of {cluster.name}'s {cluster.device_mem_gb} GiB: set distill.slide_max_tiles "
                       f"(e.g. {fits:,})")
    return out


def _size(n: float) -> str:
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def model_size(spec: JobSpec):
    """The student (tile encoder + adaptor + slide encoder + head) on the meta device for the memory estimate;
    model.seq_len must be its tokens per tile."""
    from core.model_sizes import size_of
    from core.models import gigapath as gp

    cfg = gp.teacher_config(spec.models["teacher"])
    student = gp.build_student(spec.distill, cfg, meta=True)
    tokens = gp.tokens_per_tile(student.tile)
    if spec.model.seq_len != tokens:
        raise FieldError("model.seq_len", f"{spec.model.seq_len} but the student {spec.distill.student_arch} attends "
                                          f"over {tokens} tokens per tile; set model.seq_len: {tokens} (the memory "
                                          f"estimate counts deepspeed.micro_batch tiles of that many tokens)")
    net = student.tile
    from dataclasses import replace

    # "vocab": the output width per token, as an LM's logits: the adaptor maps every token to the teacher's width
    # and the loss holds it beside the cached target (bench/gigapath_memory.py: 0.77 of measured without it)
    size = size_of(student, layers=len(net.blocks), hidden=int(net.embed_dim),
                   heads=int(net.blocks[0].attn.num_heads),
                   vocab=gp.teacher_width(cfg) if spec.distill.hidden_tokens == "all" else 0)
    size = replace(size, chunk=spec.distill.tile_chunk)   # the tile encoder sees tile_chunk tiles per forward
    if spec.distill.slide_target != "subset":
        return size
    # the frozen teacher slide encoder computes the slide target on every rank: frozen weights on the device
    slide = sum(p.numel() for p in gp.build_teacher(cfg, meta=True)[1].parameters())
    return replace(size, total=size.total + slide, trainable=size.total)


# ---------------------------------------------------------------- step 2: training + evaluation
INDEX = "data/slides.json"


def prepare(spec: JobSpec, ctx: TaskContext, rank: int) -> dict:
    """Rank 0 (first): the split, written to data/slides.json; later calls (other ranks, a requeued or resumed run)
    read it back. Every slide must have its features."""
    def write(path: Path) -> None:
        found, train, held = read_dataset(spec)
        write_json_atomic(path, {"train": [sl.id for sl in train], "heldout": [sl.id for sl in held],
                                 "labels": {sl.id: sl.label for sl in found.slides if sl.label is not None},
                                 "classes": found.classes, "seed": spec.data.seed})

    index = rank0_index(ctx.run_dir / INDEX, rank, "slide index", write)
    missing = [sid for sid in index["train"] + index["heldout"]
               if not features_path(ctx.run_dir, sid, spec).is_file()]
    if missing:
        raise RuntimeError(f"no teacher features for slide(s) {missing[:8]} in {features_dir(ctx.run_dir, spec)}; "
                           f"compute them with: python launchers/submit.py SPEC --resume-missing {ctx.run_dir}")
    index["tiles"] = {sid: int(safetensors_metadata(features_path(ctx.run_dir, sid, spec))["tiles"])
                      for sid in index["train"] + index["heldout"]}
    return index


def hold_point(run_dir, step: int, timeout_s: float = 300) -> None:
    """Test hook, off unless MEDHPC_FAULT=hold@step:<N>: on the first run of the job (not after a requeue) every rank
    waits at step N, after touching <run>/.held-<N>, until <run>/.release-<N> exists or timeout_s passes, so that a
    test can requeue a job that is certainly in the middle of its training (core.runtime.fault_point has only kill
    and fail)."""
    import os

    from core.runtime import restart_count

    if os.environ.get("MEDHPC_FAULT") != f"hold@step:{step}" or restart_count() > 0:
        return
    Path(run_dir, f".held-{step}").touch()
    t0 = time.time()
    while not Path(run_dir, f".release-{step}").exists() and time.time() - t0 < timeout_s:
        time.sleep(0.2)


def distance(kind: str, a, b):
    import torch.nn.functional as F

    a, b = a.float(), b.float()
    if kind == "mse":
        return F.mse_loss(a, b)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(a, b)
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def draw_tiles(n: int, micro: int, seed: int, k: int) -> Optional[list[int]]:
    """The tiles of the k-th micro-step's slide (n tiles): micro of them drawn with seed [seed, k], sorted; None (all)
    when it has no more than micro."""
    import numpy as np

    if n <= micro:
        return None
    rng = np.random.default_rng([seed, k])
    return sorted(int(i) for i in rng.choice(n, micro, replace=False))


def training_batch(spec: JobSpec, run_dir, sid: str, rows: Optional[list[int]]) -> dict:
    """One micro-step's slide on the CPU: the drawn tiles' images and coordinates, the teacher's cached tokens and
    tile embeddings of the same rows, and the cached whole-slide embedding (used by slide_target: whole)."""
    f = read_features(run_dir, sid, rows, spec)
    names = f["names"] if rows is None else [f["names"][i] for i in rows]
    return {"images": load_tiles(Path(f["folder"]), names, spec.data), "coords": f["coords"],
            "t_hidden": f["hidden"].float(), "t_emb": f["tile_emb"].float(), "t_slide": f["slide_emb"].float(),
            "slide": sid, "rows": rows}


def to_device(b: dict, device, dtype, teacher_slide=None) -> dict:
    """A micro-step's batch on the device; with the teacher slide encoder given, the slide target is its embedding
    of the cached tile embeddings of exactly these tiles (the lab's notes: the same tiles for both slide encoders)."""
    import torch

    out = {"images": b["images"].to(device, dtype), "coords": b["coords"].to(device),
           "t_hidden": b["t_hidden"].to(device), "t_slide": b["t_slide"].to(device)}
    if teacher_slide is not None:
        with torch.no_grad():
            out["t_slide"] = teacher_slide(b["t_emb"][None].to(device, dtype), out["coords"][None])[0][0].float()
    return out


def run(spec: JobSpec, ctx: TaskContext) -> dict:
    import torch

    from core import engine as eng
    from core.data.prefetch import Prefetcher
    from core.models import gigapath as gp

    s, d, ds = spec.distill, spec.data, spec.deepspeed
    session = eng.start(spec, ctx)
    index = session.rank0_first(lambda: prepare(spec, ctx, session.rank))
    train, held = index["train"], index["heldout"]
    torch.manual_seed(spec.train.seed)
    cfg = gp.teacher_config(spec.models["teacher"])
    model = gp.build_student(s, cfg)
    if spec.model.path:
        info = gp.load_student_weights(model, spec.model.path)
        log.info("student weights %s (%d tensors)", info["file"], info["tensors"]) if session.rank == 0 else None
    if ds is not None and ds.activation_checkpointing:
        model.tile.set_grad_checkpointing(True)
    engine = eng.initialize(session, model, spec)
    device, dtype, rank, world = session.device, session.dtype, session.rank, session.dist.world_size
    micro = ds.micro_batch if ds else 1
    accum = ds.grad_accum if ds else 1

    def sample(k: int) -> tuple[str, Optional[list[int]]]:
        """The k-th slide of the run and the tiles drawn from it: a function of k alone."""
        sid = train[eng.sample_index(k, len(train), d.seed)]
        return sid, draw_tiles(index["tiles"][sid], micro, d.seed, k)

    def load(k: int) -> dict:
        sid, rows = sample(k)
        return training_batch(spec, ctx.run_dir, sid, rows)

    teacher_slide = None
    if s.slide_target == "subset":
        teacher_slide = gp.load_teacher_slide(spec.models["teacher"], cfg, s.ignore_unexpected_keys)
        teacher_slide = teacher_slide.to(device, dtype)

    ahead = 2
    prefetch = Prefetcher(load, d.workers, keep=4 * (ahead + 2))

    def batch_fn(step: int, m: int) -> dict:
        hold_point(ctx.run_dir, step)
        k = (step * accum + m) * world + rank
        prefetch.ahead(k + world * a for a in range(1, ahead + 1))
        b = prefetch.get(k)
        return to_device(b, device, dtype, teacher_slide)

    def loss_fn(engine, batch):
        out = engine(batch["images"], batch["coords"])
        lh = distance(s.loss, out["hidden"], batch["t_hidden"])
        ls = distance(s.loss, out["slide_emb"], batch["t_slide"])
        cos = gp.cosine(out["hidden"], batch["t_hidden"]).mean()
        return {"loss": s.beta * lh + (1 - s.beta) * ls, "hidden_loss": lh.detach(), "slide_loss": ls.detach(),
                "tile_cos": cos.detach()}

    if rank == 0:
        log.info("distilling on %d training slides (%d held out), %d tile(s) per micro-step, %d slide(s) per rank "
                 "per step, %d rank(s), beta %.3f", len(train), len(held), micro, accum, world, s.beta)
    slides = train + held if s.evaluate else []
    before = evaluate(spec, ctx, session, engine, slides, index) if s.evaluate and s.eval_before else None
    result = eng.Trainer(session, engine, spec, ctx, loss_fn, batch_fn).fit()
    losses = result.pop("losses", [])
    result.update(rank=rank, world_size=world, first_loss=losses[0] if losses else None,
                  slides={"train": len(train), "heldout": len(held)},
                  trainable=sum(p.numel() for p in engine.module.parameters() if p.requires_grad))
    if s.evaluate:
        after = evaluate(spec, ctx, session, engine, slides, index, keep_tiles=True, student="trained")
        if rank == 0:
            result["evaluation"] = write_results(spec, ctx.run_dir, index, before, after)
    if s.export:
        out = gp.export_student(engine.module, ctx.run_dir / "student", s, d.image_size, d.mean, d.std,
                                session.zero3, rank)
        if out:
            result["student"] = out
    return result


def evaluate(spec, ctx, session, engine, slides: list[str], index: dict, keep_tiles: bool = False,
             student: str = "untrained"):
    """Each rank its share of the slides (padded_share: equal forward passes on every rank, for ZeRO-3), all tiles of
    each, in chunks (evaluate_slide): per-slide cosine / MSE of student vs teacher; rank 0 gets every row (None
    elsewhere) and notes how far it got (core.results.progress; `student`: which student that is)."""
    import torch

    from core.engine import padded_share
    from core.results.progress import noted

    model = engine.module
    model.eval()
    rows = []
    chunk = spec.distill.tile_chunk or (spec.deepspeed.micro_batch if spec.deepspeed else 64)
    with torch.no_grad():
        what = f"scoring the slides against the teacher ({student} student)"
        for sid, keep in noted(padded_share(slides, session.rank, session.dist.world_size), (ctx.run_dir, what),
                               session.rank):
            row = evaluate_slide(spec, ctx.run_dir, sid, model, session.device, session.dtype, chunk, keep_tiles)
            if keep:
                rows.append(row)
    model.train()
    return session.gather_rows(rows, "slide_id", slides)


def evaluate_slide(spec, run_dir, sid: str, model, device, dtype, chunk: int, keep_tiles: bool = False) -> dict:
    """AGREEMENT of one slide with memory bounded by `chunk` tiles: images, student tokens and the teacher's cached
    tokens go to the device a chunk at a time (sums of cosines and squared errors kept), the tile embeddings of the
    slide (student width) are kept for the slide encoder, which sees all of them or, for a slide over
    distill.slide_max_tiles, the same seeded subset the cached teacher slide embedding was computed on."""
    import torch

    d, s = spec.data, spec.distill
    f = read_features(run_dir, sid, spec=spec, hidden=False)
    names, n = f["names"], len(f["names"])
    folder = Path(f["folder"])
    sums = {"tok_cos": 0.0, "tok_se": 0.0, "cls_cos": 0.0, "cls_se": 0.0}
    tokens = width = 0
    embs = []
    for a in range(0, n, chunk):
        images = load_tiles(folder, names[a:a + chunk], d).to(device, dtype)
        hidden, emb = model.encode(images)
        sh = model.adaptor(hidden).float()
        th = read_hidden(f["path"], a, a + len(images)).to(device).float()
        sums["tok_cos"] += float(torch.nn.functional.cosine_similarity(sh, th, dim=-1).sum())
        sums["tok_se"] += float(((sh - th) ** 2).sum())
        sums["cls_cos"] += float(torch.nn.functional.cosine_similarity(sh[:, 0], th[:, 0], dim=-1).sum())
        sums["cls_se"] += float(((sh[:, 0] - th[:, 0]) ** 2).sum())
        tokens, width = tokens + sh.shape[0] * sh.shape[1], sh.shape[-1]
        embs.append(emb)
        del images, hidden, sh, th
    emb = torch.cat(embs)
    sel = slide_rows(n, s.slide_max_tiles, d.seed)
    coords = f["coords"].to(device)
    if sel is not None:
        emb, coords = emb[sel], coords[sel]
    student_slide = model.slide_head(model.slide(emb[None], coords[None])[0])[0].float()
    ts = f["slide_emb"].float().to(device)
    row = {"slide_id": sid, "tiles": n,
           "tile_cos": sums["tok_cos"] / tokens, "tile_mse": sums["tok_se"] / (tokens * width),
           "cls_cos": sums["cls_cos"] / n, "cls_mse": sums["cls_se"] / (n * width),
           "slide_cos": float(torch.nn.functional.cosine_similarity(student_slide, ts, dim=-1)),
           "slide_mse": float(((student_slide - ts) ** 2).mean()),
           "student_slide": student_slide.cpu().tolist(), "teacher_slide": ts.cpu().tolist(),
           "slide_tiles": n if sel is None else len(sel)}
    if keep_tiles:
        row["tile_emb"] = torch.cat(embs).float().cpu()
    return row


METRICS = AGREEMENT  # per slide: tile_cos, tile_mse, cls_cos, cls_mse, slide_cos, slide_mse


def linear_probe(rows: list[dict], index: dict, key: str) -> Optional[dict]:
    """Logistic regression (scikit-learn) on slide embeddings: fit on the labelled training slides, score on the
    labelled held-out slides; None without two classes on both sides."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels, held = index["labels"], set(index["heldout"])
    fit = [(r[key], labels[r["slide_id"]]) for r in rows if r["slide_id"] in labels and r["slide_id"] not in held]
    test = [(r[key], labels[r["slide_id"]]) for r in rows if r["slide_id"] in labels and r["slide_id"] in held]
    if len({y for _, y in fit}) < 2 or not test:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(np.array([x for x, _ in fit]), [y for _, y in fit])
    X, y = np.array([x for x, _ in test]), [y for _, y in test]
    out = {"train": len(fit), "heldout": len(test), "accuracy": float(accuracy_score(y, clf.predict(X)))}
    if len(clf.classes_) == 2 and len(set(y)) == 2:
        out["auc"] = float(roc_auc_score(y, clf.predict_proba(X)[:, 1]))
    return out


def write_results(spec, run_dir: Path, index: dict, before, after) -> dict:
    """results/: slides.csv (per slide, before / after), metrics.json (held-out means, probe), embeddings.safetensors
    (the student's held-out tile and slide embeddings), distill.png."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    out = ResultFolder(Path(run_dir) / "results")
    held = set(index["heldout"])
    prev = {r["slide_id"]: r for r in before or []}
    cols = [f"{m}_before" for m in METRICS] if before else []

    def slide_row(r):
        p = prev.get(r["slide_id"], {})
        return [r["slide_id"], "heldout" if r["slide_id"] in held else "train", index["labels"].get(r["slide_id"], ""),
                r["tiles"], *(repr(r[m]) for m in METRICS), *(repr(p[m]) for m in METRICS if before)]

    out.csv("slides.csv", ["slide_id", "split", "label", "tiles", *METRICS, *cols], [slide_row(r) for r in after])

    def means(rows):
        rs = [r for r in rows if r["slide_id"] in held]
        return {m: float(np.mean([r[m] for r in rs])) for m in METRICS} if rs else {}

    probe = {"teacher": linear_probe(after, index, "teacher_slide"),
             "student": linear_probe(after, index, "student_slide")}
    if before:
        probe["student_before"] = linear_probe(before, index, "student_slide")
    metrics = {"heldout": sorted(held), "heldout_slides": len([r for r in after if r["slide_id"] in held]),
               "after": means(after), "before": means(before) if before else None,
               "probe": probe if index["labels"] else None, "beta": spec.distill.beta,
               "classes": index["classes"]}
    tensors = {}
    for r in after:
        if r["slide_id"] in held:
            tensors[f"{r['slide_id']}.tile_emb"] = r["tile_emb"].contiguous()
            tensors[f"{r['slide_id']}.slide_emb"] = torch.tensor(r["student_slide"])
    with atomic_path(out.path("embeddings.safetensors")) as tmp:
        save_file(tensors, str(tmp))
    out.json("metrics.json", metrics)
    png = out.figure("distill.png", distill_figure(Path(run_dir), metrics))
    a, b = metrics["after"], metrics["before"] or {}
    log.info("held-out (%d slides): tile cosine %s -> %.4f, slide cosine %s -> %.4f; probe %s", len(held),
             f"{b['tile_cos']:.4f}" if b else "?", a["tile_cos"], f"{b['slide_cos']:.4f}" if b else "?",
             a["slide_cos"], probe if index["labels"] else "none (no labels)")
    return {"metrics": str(out.path("metrics.json")), "slides_csv": str(out.path("slides.csv")), "png": str(png),
            "embeddings": str(out.path("embeddings.safetensors")), "tile_cos": a["tile_cos"], "slide_cos": a["slide_cos"],
            "tile_cos_before": b.get("tile_cos"), "slide_cos_before": b.get("slide_cos")}


def distill_figure(run_dir: Path, metrics: dict):
    """Held-out cosines before / after, and the training losses from the run's metrics.csv."""
    from core.workloads.common import pyplot

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = ["tile_cos", "slide_cos"]
    a, b = metrics["after"], metrics["before"]
    x = range(len(names))
    if b:
        ax1.bar([i - 0.2 for i in x], [b[n] for n in names], 0.4, color="tab:gray", label="before")
    ax1.bar([i + 0.2 for i in x], [a[n] for n in names], 0.4, color="tab:blue", label="after")
    ax1.set_xticks(list(x), ["tile (last-block tokens)", "slide embedding"])
    ax1.set_ylabel("cosine to the teacher")
    ax1.set_title(f"held-out slides ({metrics['heldout_slides']})")
    ax1.legend()
    mfile = run_dir / "metrics.csv"
    if mfile.is_file():
        rows = list(csv.DictReader(mfile.open()))
        steps = [int(r["step"]) for r in rows]
        for key, color in (("loss", "black"), ("hidden_loss", "tab:orange"), ("slide_loss", "tab:green")):
            if rows and key in rows[0]:
                ax2.plot(steps, [float(r[key]) for r in rows], color=color, label=key, lw=1)
        ax2.set_yscale("log")
        ax2.set_xlabel("step")
        ax2.legend()
        ax2.set_title(f"training (beta {metrics['beta']})")
    fig.tight_layout()
    return fig


WORKLOAD = Workload(run=run, section="distill", Section=DistillSection, Data=SlideData, trains=True, plan=plan,
                    model_size=model_size, models=("teacher",), entries={"features": features},
                    checkpointing=True)
