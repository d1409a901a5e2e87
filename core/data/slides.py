"""Whole-slide tiles for the GigaPath distillation: tile folders, WSI tiling, slide labels, the held-out split, the
tile transform, and a synthetic generator from a real pathology image. Torch-free (numpy, PIL, tifffile).

Layout (as Prov-GigaPath's tiling writes it): `data.path` holds one folder per slide, whose tiles are named
`{x:05d}x_{y:05d}y.png` with (x, y) the level-0 coordinates of the tile's top-left corner. Whole-slide images in the
same folder (`.svs`, `.tif`, `.tiff`, `.ndpi`, read with tifffile; JPEG / JPEG 2000 tiles need imagecodecs) are
tiled by the features step into such folders: a foreground bounding box and an Otsu luminance threshold from the
lowest-resolution level, tiles of `tile_px` at `level` whose foreground share exceeds `occupancy`, coordinates
scaled to level 0 (GigaPath's `process_slide`, without openslide / MONAI).
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from core.errors import DatasetError

TILE_NAME = re.compile(r"^(\d+)x_(\d+)y\.(png|jpe?g)$", re.IGNORECASE)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
WSI_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi"}
SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")
DONE = "dataset.csv"      # written last by the tiling, as GigaPath's process_slide does: a complete tile folder


@dataclass
class Slide:
    id: str
    kind: str                        # "tiles" (a folder of tiles) or "wsi" (a whole-slide image to tile)
    source: str                      # the folder or the image file
    label: Optional[str] = None
    tiles: Optional[int] = None      # tiles in the folder (None for a WSI until it is tiled)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Scan:
    slides: list[Slide]
    classes: list[str] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)


def parse_tile_name(name: str) -> Optional[tuple[int, int]]:
    """(x, y) from `{x:05d}x_{y:05d}y.png` (also .jpg / .jpeg and unpadded digits), None when it does not parse."""
    m = TILE_NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def list_tiles(folder, field_name: str = "data.path") -> list[tuple[str, int, int]]:
    """The tiles of a slide folder as (file name, x, y), sorted by (x, y). Image files whose names do not parse, two
    files for one position, or no tile at all are DatasetErrors naming the folder and the files."""
    folder = Path(folder)
    tiles, bad = [], []
    for entry in os.scandir(folder):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        if Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
            continue                                    # dataset.csv, failed_tiles.csv, thumbnails ...
        xy = parse_tile_name(entry.name)
        (tiles.append((entry.name, *xy)) if xy else bad.append(entry.name))
    if bad:
        shown = ", ".join(sorted(bad)[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise DatasetError(field_name, f"slide folder {folder}: {len(bad)} tile name(s) do not parse as "
                                       f"{{x:05d}}x_{{y:05d}}y.png (level-0 coordinates of the top-left corner): "
                                       f"{shown}")
    if not tiles:
        raise DatasetError(field_name, f"slide folder {folder} has no tiles (PNG / JPEG files named "
                                       f"{{x:05d}}x_{{y:05d}}y.png)")
    seen: dict = {}
    for name, x, y in tiles:
        if (x, y) in seen:
            raise DatasetError(field_name, f"slide folder {folder}: {seen[(x, y)]} and {name} are both the tile at "
                                           f"x={x}, y={y}")
        seen[(x, y)] = name
    return sorted(tiles, key=lambda t: (t[1], t[2]))


def wsi_levels(path) -> list[tuple[int, int]]:
    """(height, width) of every pyramid level of a whole-slide image (tifffile), level 0 first."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        return [tuple(int(v) for v in lvl.shape[:2]) for lvl in series.levels]


def read_labels(path, field_name: str = "data.labels_csv") -> dict[str, str]:
    p = Path(path)
    if not p.is_file():
        raise DatasetError(field_name, f"file {p} not found (a CSV with columns slide_id,label)")
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"slide_id", "label"} <= set(reader.fieldnames):
            raise DatasetError(field_name, f"{p}: needs the columns slide_id,label (has {reader.fieldnames})")
        out: dict[str, str] = {}
        for i, row in enumerate(reader, start=2):
            sid, label = (row["slide_id"] or "").strip(), (row["label"] or "").strip()
            if not sid or not label:
                raise DatasetError(field_name, f"{p} line {i}: empty slide_id or label")
            if sid in out and out[sid] != label:
                raise DatasetError(field_name, f"{p} line {i}: slide {sid} has two labels ({out[sid]}, {label})")
            out[sid] = label
    return out


def scan(path, labels_csv: Optional[str] = None, field_name: str = "data.path") -> Scan:
    """Every slide under `path`: sub-folders of tiles and whole-slide images; labels from `labels_csv`."""
    root = Path(path) if path else None
    if root is None or not root.is_dir():
        raise DatasetError(field_name, f"{path}: not a folder (give the folder that holds one folder of tiles, or "
                                       f"one whole-slide image, per slide)")
    slides: list[Slide] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        p = Path(entry.path)
        if entry.is_dir():
            sid, kind = entry.name, "tiles"
        elif p.suffix.lower() in WSI_SUFFIXES:
            sid, kind = p.stem, "wsi"
        else:
            continue
        if not SLIDE_ID.match(sid):
            raise DatasetError(field_name, f"{p}: slide id {sid!r} must be letters, digits, '.', '_', '-' (it names "
                                           f"the slide's feature file)")
        if kind == "tiles":
            slides.append(Slide(sid, "tiles", str(p), tiles=len(list_tiles(p, field_name))))
        else:
            try:
                levels = wsi_levels(p)
            except Exception as e:  # noqa: BLE001  (tifffile raises many kinds)
                raise DatasetError(field_name, f"{p}: not a whole-slide image tifffile can read "
                                               f"({type(e).__name__}: {e})") from None
            if not levels or len(levels[0]) < 2:
                raise DatasetError(field_name, f"{p}: no image in the file")
            slides.append(Slide(sid, "wsi", str(p)))
    ids = [s.id for s in slides]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DatasetError(field_name, f"{root}: slide(s) {dup} given twice (a folder and a whole-slide image)")
    if not slides:
        raise DatasetError(field_name, f"{root} holds no slide: no folder of tiles and no whole-slide image "
                                       f"({', '.join(sorted(WSI_SUFFIXES))})")
    result = Scan(slides)
    if labels_csv:
        labels = read_labels(labels_csv)
        unknown = sorted(set(labels) - set(ids))
        if unknown:
            raise DatasetError("data.labels_csv", f"{labels_csv}: slide(s) {unknown[:5]} have no folder or image "
                                                  f"in {root}")
        for s in slides:
            s.label = labels.get(s.id)
        result.classes = sorted(set(labels.values()))
        result.unlabeled = [s.id for s in slides if s.label is None]
    return result


def split_heldout(slides: list[Slide], fraction: float, seed: int, explicit: Optional[list[str]] = None,
                  ) -> tuple[list[Slide], list[Slide]]:
    """(train, held-out): the slides named in `explicit`, else `fraction` of them (at least one when fraction > 0),
    stratified by label and seeded."""
    import random

    if explicit is not None:
        ids = {s.id for s in slides}
        unknown = sorted(set(explicit) - ids)
        if unknown:
            raise DatasetError("data.heldout", f"slide(s) {unknown[:5]} are not in the dataset")
        held = set(explicit)
    else:
        held = set()
        groups: dict = {}
        for s in slides:
            groups.setdefault(s.label, []).append(s.id)
        rng = random.Random(seed)
        for label in sorted(groups, key=lambda v: (v is None, str(v))):
            members = sorted(groups[label])
            rng.shuffle(members)
            k = round(fraction * len(members))
            if fraction > 0 and k == 0 and len(members) > 1:
                k = 1
            held.update(members[:k])
        if fraction > 0 and not held and len(slides) > 1:
            held.add(sorted(s.id for s in slides)[0])
    train = [s for s in slides if s.id not in held]
    return train, [s for s in slides if s.id in held]


# ---------------------------------------------------------------- tiles -> tensors (numpy)
def tile_array(path, image_size: int, mean, std):
    """GigaPath's tile transform: Resize(image_size * 256 / 224, bicubic) of the short side, CenterCrop(image_size),
    ToTensor, Normalize(mean, std): a (3, S, S) float32 array."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        short = round(image_size * 256 / 224)
        if min(w, h) != short:
            if w <= h:
                size = (short, int(short * h / w))
            else:
                size = (int(short * w / h), short)
            im = im.resize(size, Image.BICUBIC)
        w, h = im.size
        top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
        im = im.crop((left, top, left + image_size, top + image_size))
        a = np.asarray(im, dtype=np.float32) / 255.0
    a = (a - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


# ---------------------------------------------------------------- whole-slide images -> tile folders
def _luminance(rgb):
    return rgb.astype("float32").mean(axis=-1)


def foreground(rgb, threshold: Optional[float] = None):
    """(mask, threshold): luminance below `threshold` (Otsu's when None) is tissue, as GigaPath segments it."""
    from skimage.filters import threshold_otsu

    lum = _luminance(rgb)
    if threshold is None:
        threshold = float(threshold_otsu(lum)) if lum.max() > lum.min() else float(lum.max()) + 1
    return lum < threshold, threshold


def tiles_of(image, tile_px: int, threshold: float, occupancy: float, origin=(0, 0), scale: float = 1.0):
    """Tiles (x0, y0, array) of an RGB array (H, W, 3) padded white at the far edges; x0, y0 = level-0 corner
    `origin + scale * position`; a tile is kept when its tissue share exceeds `occupancy`."""
    import numpy as np

    H, W = image.shape[:2]
    ph, pw = (-H) % tile_px, (-W) % tile_px
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=255)
    out = []
    for y in range(0, image.shape[0], tile_px):
        for x in range(0, image.shape[1], tile_px):
            tile = image[y:y + tile_px, x:x + tile_px]
            if (_luminance(tile) < threshold).mean() > occupancy:
                out.append((int(origin[0] + round(scale * x)), int(origin[1] + round(scale * y)), tile))
    return out


def write_tile_folder(folder, tiles, slide_id: str) -> int:
    """Write tiles `{x:05d}x_{y:05d}y.png` into a fresh folder next to `folder`, then rename it into place (a reader
    never sees half a slide); dataset.csv (slide_id, tile_id, image, tile_x, tile_y) is written inside it."""
    from PIL import Image

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = ["slide_id,tile_id,image,tile_x,tile_y"]
    for x, y, arr in tiles:
        name = f"{x:05d}x_{y:05d}y.png"
        Image.fromarray(arr).convert("RGB").save(tmp / name)
        rows.append(f"{slide_id},{slide_id}.{name[:-4]},{slide_id}/{name},{x},{y}")
    (tmp / DONE).write_text("\n".join(rows) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return len(tiles)


def tile_wsi(path, folder, level: int, tile_px: int, occupancy: float = 0.1,
             threshold: Optional[float] = None) -> dict:
    """Tile a whole-slide image into `folder` (GigaPath's process_slide): foreground bounding box and Otsu threshold
    from the lowest-resolution level, tiles of tile_px at `level`, kept above `occupancy`, level-0 coordinates."""
    import numpy as np
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        levels = tif.series[0].levels
        if not 0 <= level < len(levels):
            raise DatasetError("data.wsi_level", f"{path} has levels 0..{len(levels) - 1}, not {level}")
        low = np.asarray(levels[-1].asarray())
        full_h, full_w = levels[0].shape[:2]
        low_scale = full_w / low.shape[1]
        mask, thr = foreground(low[..., :3], threshold)
        if not mask.any():
            raise DatasetError("data.path", f"{path}: no tissue found (luminance threshold {thr:.1f})")
        ys, xs = np.nonzero(mask)
        box0 = (int(xs.min() * low_scale), int(ys.min() * low_scale),
                int(math.ceil((xs.max() + 1) * low_scale)), int(math.ceil((ys.max() + 1) * low_scale)))
        img = np.asarray(levels[level].asarray())[..., :3]
        scale = full_w / img.shape[1]
        x0, y0 = int(box0[0] / scale), int(box0[1] / scale)
        x1, y1 = int(math.ceil(box0[2] / scale)), int(math.ceil(box0[3] / scale))
        roi = img[y0:y1, x0:x1]
    tiles = tiles_of(roi, tile_px, thr, occupancy, origin=(round(x0 * scale), round(y0 * scale)), scale=scale)
    if not tiles:
        raise DatasetError("data.path", f"{path}: no tile above {occupancy:.0%} tissue at level {level}")
    n = write_tile_folder(folder, tiles, Path(path).stem)
    return {"tiles": n, "level": level, "downsample": scale, "threshold": thr, "roi_level0": box0}


def tile_folder_ready(folder) -> bool:
    return (Path(folder) / DONE).is_file()


# ---------------------------------------------------------------- synthetic slides
def _stained(rng, ihc, positive: bool):
    """A crop of scikit-image's immunohistochemistry sample, flipped / rotated, its DAB stain strengthened
    (positive) or weakened (negative) in HED colour space."""
    import numpy as np
    from skimage.color import hed2rgb, rgb2hed

    h = int(rng.integers(224, 384))
    w = int(rng.integers(224, 384))
    y, x = int(rng.integers(0, ihc.shape[0] - h + 1)), int(rng.integers(0, ihc.shape[1] - w + 1))
    crop = ihc[y:y + h, x:x + w]
    crop = np.rot90(crop, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    hed = rgb2hed(np.ascontiguousarray(crop))
    hed[..., 2] *= (1.8 if positive else 0.3) * rng.uniform(0.85, 1.15)
    hed[..., 0] *= rng.uniform(0.9, 1.1)
    return (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)


def synthetic_canvas(i: int, seed: int, tile_px: int):
    """Slide i: the stained crop on a white background with a margin, label 'positive' for odd i, and a level-0
    origin that is not a multiple of the grid (as GigaPath's bounding-box origins are not)."""
    import numpy as np
    from skimage import data

    rng = np.random.default_rng([seed, i])
    positive = bool(i % 2)
    tissue = _stained(rng, data.immunohistochemistry(), positive)
    m = tile_px + int(rng.integers(0, tile_px))
    canvas = np.full((tissue.shape[0] + 2 * m, tissue.shape[1] + 2 * m, 3), 255, np.uint8)
    canvas[m:m + tissue.shape[0], m:m + tissue.shape[1]] = tissue
    origin = (int(rng.integers(1, 40)) * 256 + int(rng.integers(1, 255)),
              int(rng.integers(1, 40)) * 256 + int(rng.integers(1, 255)))
    return canvas, ("positive" if positive else "negative"), origin


def write_pyramid(path, level_img, downsamples=(4, 2, 1)):
    """A pyramidal TIFF (tifffile, zlib, 256-px tiles, levels as SubIFDs) with level k downsampled downsamples[k]
    times from level 0; the last level is `level_img` itself (level 0 is it enlarged downsamples[-1] times)."""
    import numpy as np
    import tifffile
    from PIL import Image

    base = Image.fromarray(level_img)
    levels = []
    for d in downsamples:
        f = downsamples[-1] / d
        size = (round(base.width * f), round(base.height * f))
        levels.append(np.asarray(base if size == base.size else base.resize(size, Image.BICUBIC)))
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    with tifffile.TiffWriter(str(tmp)) as tif:
        opts = dict(tile=(256, 256), compression="zlib", photometric="rgb")
        tif.write(levels[0], subifds=len(levels) - 1, **opts)
        for lvl in levels[1:]:
            tif.write(lvl, subfiletype=1, **opts)
    os.replace(tmp, path)


def write_synthetic(root, slides: int = 12, wsi: int = 1, tile_px: int = 64, seed: int = 0,
                    occupancy: float = 0.1) -> dict:
    """Synthetic slides from scikit-image's real immunohistochemistry sample under `root`: slides/<id>/ tile folders
    (the first `wsi` slides instead as pyramidal TIFFs slides/<id>.tiff, whose level 2 is the slide at the tile
    scale), labels.csv (positive / negative: DAB stain strength). A tile of tile_px covers 256 level-0 px (the
    slide is at level 2 of a 4x / 2x / 1x pyramid). Idempotent: a complete set (marker file) is left alone."""
    root = Path(root)
    marker = root / ".synthetic.json"
    params = {"slides": slides, "wsi": wsi, "tile_px": tile_px, "seed": seed, "occupancy": occupancy}
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return paths_of(root)
    folder = root / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    scale = 256 / tile_px
    rows = ["slide_id,label"]
    for i in range(slides):
        sid = f"slide_{i:03d}"
        canvas, label, origin = synthetic_canvas(i, seed, tile_px)
        rows.append(f"{sid},{label}")
        if i < wsi:
            write_pyramid(folder / f"{sid}.tiff", canvas, downsamples=(1, 2, 4))
            continue
        _, thr = foreground(canvas)
        tiles = tiles_of(canvas, tile_px, thr, occupancy, origin=origin, scale=scale)
        write_tile_folder(folder / sid, tiles, sid)
    from core.run_folder import write_json_atomic, write_text_atomic

    write_text_atomic(root / "labels.csv", "\n".join(rows) + "\n")
    write_json_atomic(marker, params)
    return paths_of(root)


def paths_of(root) -> dict:
    root = Path(root)
    return {"root": root, "slides": root / "slides", "labels_csv": root / "labels.csv"}
