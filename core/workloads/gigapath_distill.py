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
from core.metrics.embedding import AGREEMENT, embedding_agreement
from core.results import ResultFolder
from core.run_folder import atomic_path, write_json_atomic
from core.runtime import TaskContext
from core.config import DataSpec, FieldError, JobSpec, Strict
from core.workloads import Shape, Workload
from core.workloads.common import rank0_index
from core.workloads.gigapath_features import (FEATURES, FORMAT, done_slides, features, features_path,  # noqa: F401
                                              fingerprint, load_tiles, read_features, safetensors_metadata)

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
    teacher_precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    cache_dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="dtype of the cached hidden states")
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
    tile_px: PositiveInt = Field(256, description="tile size in pixels at wsi_level when tiling whole-slide images")
    wsi_level: int = Field(1, ge=0, description="pyramid level tiled (GigaPath: the level nearest 0.5 mpp)")
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


def _model_checks(spec: JobSpec) -> dict:
    """Teacher and student built on the meta device: weight files whose keys do not fit, token counts and
    widths that cannot be matched, a bad student slide config. Imports torch (after the dataset checks)."""
    from core.models import gigapath as gp

    s, t = spec.distill, spec.models["teacher"]
    if t.make_tiny:
        if not t.path:
            raise FieldError("models.teacher.path", "make_tiny writes the tiny teacher there: give a folder")
        gp.write_tiny_teacher(t.path)
    elif t.path and not Path(t.path).is_dir():
        raise FieldError("models.teacher.path", f"{t.path}: not a folder (the Prov-GigaPath folder: config.json, "
                                                f"pytorch_model.bin, slide_encoder.pth)")
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
        raise FieldError("model.path", f"{spec.model.path}: student weights not found (a timm checkpoint file or "
                                       f"folder; leave it out for a random start)")
    if spec.model.path:
        gp.check_student_weights(counts["student_model"], spec.model.path)
    return {**counts, **files, "config": cfg}


def plan(spec: JobSpec, resume_dir: Optional[Path] = None) -> Shape:
    """features array (a slide chunk per task) -> training + evaluation (afterok). Bad input is a FieldError."""
    s, d = spec.distill, spec.data
    _check_section(spec)
    notes = []
    if d.make_synthetic:
        from core.data.slides import write_synthetic

        write_synthetic(synthetic_root(d), slides=d.synthetic_slides, wsi=d.synthetic_wsi, tile_px=d.tile_px,
                        seed=d.seed, occupancy=d.occupancy)
        notes.append(f"synthetic slides (scikit-image's immunohistochemistry sample) under {synthetic_root(d)}")
    found, train, held = read_dataset(spec)
    m = _model_checks(spec)
    ids = [sl.id for sl in found.slides]
    items = ids
    if resume_dir is not None:
        done = done_slides(resume_dir, ids, fingerprint(spec))
        items = [i for i in ids if i not in done]
        if not items:
            raise FieldError("--resume-missing", f"every slide already has teacher features in {resume_dir}; use "
                                                 f"--resume to continue the training")
        notes.append(f"resubmitting only the {len(items)} slide(s) without features: {', '.join(items[:8])}"
                     + (" ..." if len(items) > 8 else ""))
    folders = [sl for sl in found.slides if sl.kind == "tiles"]
    wsis = [sl for sl in found.slides if sl.kind == "wsi"]
    tiles = sum(sl.tiles or 0 for sl in folders)
    what = f"{len(folders)} tile folder(s) with {tiles:,} tiles" + \
        (f", {len(wsis)} whole-slide image(s) tiled at level {d.wsi_level} ({d.tile_px} px)" if wsis else "")
    notes.append(f"dataset: {len(found.slides)} slides ({what}); train {len(train)}, held out {len(held)}"
                 + (f"; labels {', '.join(f'{c} {sum(sl.label == c for sl in found.slides)}' for c in found.classes)}"
                    if found.classes else ""))
    if found.unlabeled:
        notes.append(f"{len(found.unlabeled)} slide(s) without a label (left out of the probe)")
    per_tile = (m["teacher_tokens"] if s.hidden_tokens == "all" else 1) * m["teacher_dim"] * \
        (4 if s.cache_dtype == "fp32" else 2)
    cfg = m["config"]
    notes.append(f"teacher: {cfg['architecture']} at {m['teacher_img'][0]} px, {m['teacher_tile']:,} parameters + "
                 f"slide encoder {m['teacher_slide']:,}, frozen"
                 + ("" if m["tile_file"] or (spec.models['teacher'].path and Path(spec.models['teacher'].path).is_dir())
                    else " (no weights: preset only, random init: for dry runs and tests)"))
    tasks = -(-len(items) // s.slides_per_task)
    notes.append(f"features once: {len(items)} slide(s) in {tasks} task(s); cache {_size(per_tile)} per tile "
                 f"({m['teacher_tokens'] if s.hidden_tokens == 'all' else 1} x {m['teacher_dim']} {s.cache_dtype})"
                 + (f", {_size(per_tile * tiles)} for the tile folders" if tiles else "")
                 + "; training reads it every epoch instead of running the teacher")
    act = 2 * m["teacher_tokens"] * s.teacher_batch * m["teacher_dim"] * (34 + 5 * 24 * m["teacher_tokens"] /
                                                                          m["teacher_dim"])
    wbytes = (4 if s.teacher_precision == "fp32" else 2) * (m["teacher_tile"] + m["teacher_slide"])
    notes.append(f"features task memory: teacher weights {_size(wbytes)} ({s.teacher_precision}) + one block's "
                 f"activations for {s.teacher_batch} tiles ~{_size(act)} per device")
    notes.append(f"student: {s.student_arch} {m['student_tile']:,} + adaptor {m['adaptor']:,} + slide encoder "
                 f"{m['student_slide']:,}; a micro-step is one slide (deepspeed.micro_batch tiles of it)")
    return Shape(items=None, pre="features", pre_items=items, pre_items_per_task=s.slides_per_task, merge=False,
                 notes=notes)


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
    return size_of(student, layers=len(net.blocks), hidden=int(net.embed_dim),
                   heads=int(net.blocks[0].attn.num_heads), vocab=0)


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
    missing = [sid for sid in index["train"] + index["heldout"] if not features_path(ctx.run_dir, sid).is_file()]
    if missing:
        raise RuntimeError(f"no teacher features for slide(s) {missing[:8]} in {ctx.run_dir / FEATURES}; compute "
                           f"them with: python launchers/submit.py SPEC --resume-missing {ctx.run_dir}")
    index["tiles"] = {sid: int(safetensors_metadata(features_path(ctx.run_dir, sid))["tiles"])
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


def run(spec: JobSpec, ctx: TaskContext) -> dict:
    import numpy as np
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
        n = index["tiles"][sid]
        if n <= micro:
            return sid, None
        rng = np.random.default_rng([d.seed, k])
        return sid, sorted(int(i) for i in rng.choice(n, micro, replace=False))

    def load(k: int) -> dict:
        sid, rows = sample(k)
        f = read_features(ctx.run_dir, sid, rows)
        names = f["names"] if rows is None else [f["names"][i] for i in rows]
        return {"images": load_tiles(Path(f["folder"]), names, d), "coords": f["coords"],
                "t_hidden": f["hidden"].float(), "t_slide": f["slide_emb"].float(), "slide": sid}

    ahead = 2
    prefetch = Prefetcher(load, d.workers, keep=4 * (ahead + 2))

    def batch_fn(step: int, m: int) -> dict:
        hold_point(ctx.run_dir, step)
        k = (step * accum + m) * world + rank
        prefetch.ahead(k + world * a for a in range(1, ahead + 1))
        b = prefetch.get(k)
        return {"images": b["images"].to(device, dtype), "coords": b["coords"].to(device),
                "t_hidden": b["t_hidden"].to(device), "t_slide": b["t_slide"].to(device)}

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
        after = evaluate(spec, ctx, session, engine, slides, index, keep_tiles=True)
        if rank == 0:
            result["evaluation"] = write_results(spec, ctx.run_dir, index, before, after)
    if s.export:
        out = gp.export_student(engine.module, ctx.run_dir / "student", s, d.image_size, d.mean, d.std,
                                session.zero3, rank)
        if out:
            result["student"] = out
    return result


def evaluate(spec, ctx, session, engine, slides: list[str], index: dict, keep_tiles: bool = False):
    """Each rank its share of the slides (padded_share: equal forward passes on every rank, for ZeRO-3), all tiles of
    each: per-slide cosine / MSE of student vs teacher; rank 0 gets every row (None elsewhere)."""
    import torch

    from core.engine import padded_share

    d = spec.data
    model = engine.module
    model.eval()
    chunk = model.tile_chunk
    model.tile_chunk = chunk or (spec.deepspeed.micro_batch if spec.deepspeed else None)
    rows = []
    with torch.no_grad():
        for sid, keep in padded_share(slides, session.rank, session.dist.world_size):
            f = read_features(ctx.run_dir, sid)
            images = load_tiles(Path(f["folder"]), f["names"], d).to(session.device, session.dtype)
            out = model(images, f["coords"].to(session.device))
            th = f["hidden"].float().to(session.device)
            sh, ts = out["hidden"].float(), f["slide_emb"].float().to(session.device)
            if not keep:
                continue
            row = {"slide_id": sid, "tiles": len(f["names"]), **embedding_agreement(sh, th, out["slide_emb"], ts),
                   "student_slide": out["slide_emb"].float().cpu().tolist(),
                   "teacher_slide": ts.cpu().tolist()}
            if keep_tiles:
                row["tile_emb"] = out["tile_emb"].float().cpu()
            rows.append(row)
    model.tile_chunk = chunk
    model.train()
    return session.gather_rows(rows, "slide_id", slides)


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
