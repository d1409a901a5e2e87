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
TILING = "tiling.json"    # the level choice of a tiled whole-slide image (mpp, level, read size)
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


def write_tile_folder(folder, tiles, slide_id: str, extra: Optional[dict] = None) -> int:
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
    for name, obj in (extra or {}).items():
        (tmp / name).write_text(json.dumps(obj, indent=1) + "\n")
    (tmp / DONE).write_text("\n".join(rows) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return len(tiles)


# ---------------------------------------------------------------- magnification: microns per pixel
MPP_RANGE = (0.05, 20.0)          # what a microscope scan plausibly has at level 0 (72 dpi defaults are not)
_DESC_MPP = re.compile(r"(?:^|[|\s;])MPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_UNIT_UM = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre (1 = none: no physical size)


def _rational(value) -> Optional[float]:
    try:
        if isinstance(value, (tuple, list)):
            return float(value[0]) / float(value[1]) if float(value[1]) else None
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def slide_mpp(tif) -> tuple[Optional[float], Optional[float], str]:
    """(mpp_x, mpp_y, source) of level 0 of an open tifffile.TiffFile: the Aperio ImageDescription's `MPP = 0.2520`
    (what OpenSlide reports as aperio.MPP / openslide.mpp-x for .svs), else the TIFF XResolution / YResolution tags
    with ResolutionUnit inch or centimetre (OpenSlide's tiff.XResolution, as GigaPath's find_level_for_target_mpp
    reads it); (None, None, why) when neither gives a plausible value."""
    page = tif.series[0].levels[0].keyframe
    for desc in (tif.pages[0].description or "", getattr(page, "description", "") or ""):
        m = _DESC_MPP.search(desc)
        if m:
            mpp = float(m.group(1))
            if MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
                return mpp, mpp, "ImageDescription MPP"
    tags = page.tags
    unit, xr, yr = tags.get("ResolutionUnit"), tags.get("XResolution"), tags.get("YResolution")
    if unit is None or xr is None or yr is None:
        return None, None, "no MPP in the ImageDescription and no resolution tags"
    per = _UNIT_UM.get(int(unit.value))
    x, y = _rational(xr.value), _rational(yr.value)
    if per is None:
        return None, None, "no MPP in the ImageDescription and ResolutionUnit NONE (no physical pixel size)"
    if not x or not y:
        return None, None, "XResolution / YResolution are zero"
    mx, my = per / x, per / y
    if not (MPP_RANGE[0] <= mx <= MPP_RANGE[1] and MPP_RANGE[0] <= my <= MPP_RANGE[1]):
        return None, None, (f"resolution tags give {mx:.4g} x {my:.4g} um per pixel, outside {MPP_RANGE[0]}.."
                            f"{MPP_RANGE[1]} (a writer's default, not a scan's)")
    return mx, my, "TIFF resolution tags"


def choose_level(mpp: float, downsamples: list[float], target_mpp: float, tolerance: float) -> tuple[int, float]:
    """(level, its mpp): the coarsest level whose mpp is at most target_mpp + tolerance, i.e. the level at the
    target (within the tolerance) or the nearest finer one, which the tiling then reads larger and resizes down.
    ValueError when even level 0 is coarser than that."""
    ok = [(lvl, mpp * ds) for lvl, ds in enumerate(downsamples) if mpp * ds <= target_mpp + tolerance]
    if not ok:
        raise ValueError(f"level 0 is {mpp:.4g} um per pixel, coarser than data.target_mpp {target_mpp:g} "
                         f"(+ tolerance {tolerance:g}): the slide cannot give tiles at that magnification")
    return max(ok, key=lambda t: t[1])


@dataclass
class LevelChoice:
    """How a whole-slide image is tiled: its level-0 mpp (and where it came from), the level read, that level's mpp,
    the pixels read per tile at that level (tile_px when the level is at the target, more when it is finer and the
    tiles are resized down), and the tile's side in level-0 pixels (the grid step of the coordinates)."""
    slide: str
    mpp: Optional[float]
    mpp_source: str
    level: int
    level_mpp: Optional[float]
    downsample: float
    read_px: int
    tile_px: int
    step0: float
    tile_mpp: Optional[float]
    levels: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def level_choice(path, tile_px: int, target_mpp: float = 0.5, tolerance: float = 0.1,
                 base_mpp: Optional[float] = None, level: Optional[int] = None,
                 field_name: str = "data.path", tif=None) -> LevelChoice:
    """The level and read size for tiles of tile_px at target_mpp from a slide's own mpp (slide_mpp; base_mpp when
    the file has none). A level within `tolerance` of the target is read as it is (GigaPath's
    find_level_for_target_mpp: |level mpp - target| < 0.1); otherwise the nearest finer level is read over
    tile_px * target / level_mpp pixels and resized to tile_px. `level` (data.wsi_level) tiles that level of every
    slide as it is instead. A slide without mpp (and no base_mpp) is a DatasetError naming it."""
    import tifffile

    if tif is None:
        with tifffile.TiffFile(str(path)) as t:
            return level_choice(path, tile_px, target_mpp, tolerance, base_mpp, level, field_name, tif=t)
    series = tif.series[0]
    shapes = [tuple(int(v) for v in lvl.shape[:2]) for lvl in series.levels]
    h0, w0 = shapes[0]
    downsamples = [(w0 / w + h0 / h) / 2 for h, w in shapes]      # as OpenSlide's level_downsamples
    mx, my, source = slide_mpp(tif)
    if mx is None and base_mpp is not None:
        mx, my, source = base_mpp, base_mpp, "data.base_mpp"
    sid = Path(path).stem
    if level is not None:
        if not 0 <= level < len(shapes):
            raise DatasetError("data.wsi_level", f"{path} has levels 0..{len(shapes) - 1}, not {level}")
        lm = mx * downsamples[level] if mx else None
        return LevelChoice(sid, mx, source, level, lm, downsamples[level], tile_px, tile_px,
                           tile_px * downsamples[level], lm, shapes)
    if mx is None:
        raise DatasetError(field_name, f"{path}: slide {sid} has no magnification ({source}); tifffile reads the "
                                       f"Aperio ImageDescription 'MPP = ...' and the XResolution / YResolution tags "
                                       f"with ResolutionUnit inch or centimetre. Give data.base_mpp (um per level-0 "
                                       f"pixel, e.g. 0.25 for a 40x scan) or pin data.wsi_level")
    mpp = (mx + my) / 2
    try:
        lvl, lm = choose_level(mpp, downsamples, target_mpp, tolerance)
    except ValueError as e:
        raise DatasetError("data.target_mpp", f"{path}: slide {sid}: {e}") from None
    read_px = tile_px if abs(lm - target_mpp) <= tolerance else int(round(tile_px * target_mpp / lm))
    tile_mpp = lm * read_px / tile_px
    return LevelChoice(sid, mpp, source, lvl, lm, downsamples[lvl], read_px, tile_px, read_px * downsamples[lvl],
                       tile_mpp, shapes)


def whole_level_only(page) -> bool:
    """A level that cannot be read in pieces here: one strip for the whole level (NDPI's single JPEG per level) or
    separate colour planes; tile_wsi reads such a level once, whole, as the tiling did before."""
    return (not page.is_tiled and len(page.dataoffsets) == 1) or int(getattr(page, "planarconfig", 1)) == 2


def read_region(tif, page, y: int, x: int, h: int, w: int, fill: int = 255, whole=None):
    """Pixels [y, y + h) x [x, x + w) of a page (RGB), decoding only the tiles / strips that overlap it (memory
    bounded by the region, not the level); outside the image is `fill`. `whole`: the level already read whole."""
    import numpy as np

    H, W = page.shape[:2]
    out = np.full((h, w, 3), fill, np.uint8)
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
    if y0 >= y1 or x0 >= x1:
        return out
    if whole is not None or whole_level_only(page):
        whole = np.asarray(page.asarray()) if whole is None else whole
        out[y0 - y:y1 - y, x0 - x:x1 - x] = whole[y0:y1, x0:x1, :3]
        return out
    if page.is_tiled:
        ch, cw = int(page.chunks[0]), int(page.chunks[1])
    else:                                            # strips of rowsperstrip full-width rows
        ch, cw = int(page.rowsperstrip or H), W
    across = -(-W // cw)
    fh = tif.filehandle
    decode = page.decode
    for ty in range(y0 // ch, (y1 - 1) // ch + 1):
        for tx in range(x0 // cw, (x1 - 1) // cw + 1):
            idx = ty * across + tx
            off, n = page.dataoffsets[idx], page.databytecounts[idx]
            if not n:
                continue
            fh.seek(off)
            seg, _, _ = decode(fh.read(n), idx, jpegtables=page.jpegtables)
            seg = np.asarray(seg).reshape(seg.shape[-3:])[..., :3]
            sy, sx = ty * ch, tx * cw
            a, b = max(y0, sy), min(y1, sy + ch)
            c, d = max(x0, sx), min(x1, sx + cw)
            out[a - y:b - y, c - x:d - x] = seg[a - sy:b - sy, c - sx:d - sx]
    return out


def tissue_box(tif, threshold: Optional[float] = None, path=""):
    """(mask, threshold, low-level scale, level-0 box (x0, y0, x1, y1)) from the lowest-resolution level."""
    import numpy as np

    levels = tif.series[0].levels
    low = np.asarray(levels[-1].asarray())
    full_w = levels[0].shape[1]
    low_scale = full_w / low.shape[1]
    mask, thr = foreground(low[..., :3], threshold)
    if not mask.any():
        raise DatasetError("data.path", f"{path}: no tissue found (luminance threshold {thr:.1f})")
    ys, xs = np.nonzero(mask)
    box0 = (int(xs.min() * low_scale), int(ys.min() * low_scale),
            int(math.ceil((xs.max() + 1) * low_scale)), int(math.ceil((ys.max() + 1) * low_scale)))
    return mask, thr, low_scale, box0


def estimate_tiles(path, choice: LevelChoice, threshold: Optional[float] = None, occupancy: float = 0.1,
                   tif=None) -> int:
    """About how many tiles the tiling keeps: cells of the tiling's grid (anchored as tile_wsi anchors it) whose
    tissue share on the lowest level exceeds `occupancy`."""
    import numpy as np
    import tifffile

    if tif is None:
        with tifffile.TiffFile(str(path)) as t:
            return estimate_tiles(path, choice, threshold, occupancy, tif=t)
    mask, _, low_scale, _ = tissue_box(tif, threshold, path)
    cy = (np.arange(mask.shape[0]) * low_scale // choice.step0).astype(np.int64)
    cx = (np.arange(mask.shape[1]) * low_scale // choice.step0).astype(np.int64)
    cell = cy[:, None] * (int(cx.max()) + 1) + cx[None, :]
    tissue = np.bincount(cell.ravel(), weights=mask.ravel().astype(np.float64))
    area = np.bincount(cell.ravel())
    return int(((tissue / np.maximum(area, 1)) > occupancy).sum())


def tile_wsi(path, folder, tile_px: int, occupancy: float = 0.1, threshold: Optional[float] = None,
             target_mpp: float = 0.5, tolerance: float = 0.1, base_mpp: Optional[float] = None,
             level: Optional[int] = None) -> dict:
    """Tile a whole-slide image into `folder` (GigaPath's process_slide, at the level level_choice picks from the
    slide's own mpp): foreground bounding box and Otsu threshold from the lowest-resolution level, tiles of
    read_px at the chosen level resized to tile_px, kept above `occupancy`, level-0 coordinates on a grid anchored
    at multiples of the tile's level-0 side (the same tissue scanned at 20x and 40x gives tiles at the same physical
    places). Read one row of tiles at a time (memory: one band, not the level; a level stored as one strip, as NDPI
    stores its levels, is read whole). Returns the level choice and
    counts, also written to the folder as tiling.json."""
    import numpy as np
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(str(path)) as tif:
        ch = level_choice(path, tile_px, target_mpp, tolerance, base_mpp, level, tif=tif)
        mask, thr, _, box0 = tissue_box(tif, threshold, path)
        page = tif.series[0].levels[ch.level].keyframe
        step, ds, r = ch.step0, ch.downsample, ch.read_px
        whole = np.asarray(page.asarray()) if whole_level_only(page) else None
        gx0, gy0 = int(box0[0] // step), int(box0[1] // step)
        gx1, gy1 = int(math.ceil(box0[2] / step)), int(math.ceil(box0[3] / step))
        tiles = []
        for gy in range(gy0, gy1):
            ly = int(round(gy * step / ds))
            lx = int(round(gx0 * step / ds))
            band = read_region(tif, page, ly, lx, r, r * (gx1 - gx0), whole=whole)
            for k, gx in enumerate(range(gx0, gx1)):
                tile = band[:, k * r:(k + 1) * r]
                if r != tile_px:
                    tile = np.asarray(Image.fromarray(tile).resize((tile_px, tile_px), Image.BICUBIC))
                if (_luminance(tile) < thr).mean() > occupancy:
                    tiles.append((int(round(gx * step)), int(round(gy * step)), np.ascontiguousarray(tile)))
    if not tiles:
        raise DatasetError("data.path", f"{path}: no tile above {occupancy:.0%} tissue at level {ch.level}")
    n = write_tile_folder(folder, tiles, Path(path).stem, extra={TILING: {**ch.to_json(), "threshold": thr,
                                                                         "roi_level0": box0}})
    return {**ch.to_json(), "tiles": n, "threshold": thr, "roi_level0": box0}


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


def write_pyramid(path, level_img, downsamples=(4, 2, 1), mpp: Optional[float] = None, aperio: bool = False,
                  anchor: int = -1):
    """A pyramidal TIFF (tifffile, zlib, 256-px tiles, levels as SubIFDs) with level k downsampled downsamples[k]
    times from level 0; level `anchor` (default the last) is `level_img` itself, the others resized from it.
    `mpp` (um per level-0 pixel) is written as XResolution / YResolution in pixels per centimetre, or with `aperio`
    as an Aperio ImageDescription 'MPP = ...' (no resolution tags); None writes neither (no magnification)."""
    import numpy as np
    import tifffile
    from PIL import Image

    base = Image.fromarray(level_img)
    levels = []
    for d in downsamples:
        f = downsamples[anchor] / d
        size = (round(base.width * f), round(base.height * f))
        levels.append(np.asarray(base if size == base.size else base.resize(size, Image.BICUBIC)))
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    first = {}
    if mpp is not None and aperio:
        first = {"description": f"Aperio Image Library v12.0.15 |AppMag = {round(10 / mpp)}|MPP = {mpp:.4f}",
                 "metadata": None}
    elif mpp is not None:
        first = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(str(tmp)) as tif:
        opts = dict(tile=(256, 256), compression="zlib", photometric="rgb")
        tif.write(levels[0], subifds=len(levels) - 1, **opts, **first)
        for lvl in levels[1:]:
            tif.write(lvl, subfiletype=1, **opts)
    os.replace(tmp, path)


SYNTHETIC_MPP = 0.125   # level 0 of the synthetic pyramids: level 2 (4x down) at GigaPath's 0.5 mpp


def write_synthetic(root, slides: int = 12, wsi: int = 1, tile_px: int = 64, seed: int = 0,
                    occupancy: float = 0.1) -> dict:
    """Synthetic slides from scikit-image's real immunohistochemistry sample under `root`: slides/<id>/ tile folders
    (the first `wsi` slides instead as pyramidal TIFFs slides/<id>.tiff, whose level 2 is the slide at the tile
    scale, level 0 tagged SYNTHETIC_MPP um per pixel so that level 2 is at 0.5 mpp), labels.csv (positive /
    negative: DAB stain strength). A tile of tile_px covers 256 level-0 px (the slide is at level 2 of a 4x / 2x /
    1x pyramid). Idempotent: a complete set (marker file) is left alone."""
    root = Path(root)
    marker = root / ".synthetic.json"
    params = {"slides": slides, "wsi": wsi, "tile_px": tile_px, "seed": seed, "occupancy": occupancy,
              "mpp": SYNTHETIC_MPP}
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
            write_pyramid(folder / f"{sid}.tiff", canvas, downsamples=(1, 2, 4), mpp=SYNTHETIC_MPP)
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
