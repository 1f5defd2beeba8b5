"""The embedded generated dataset: shapes drawn procedurally on noisy backgrounds, written as a real
ImageFolder of PNG files (train/ val/ test/) on first use.

Every image is a pure function of (seed, split, class, index), so the same parameters give byte-identical
files on any machine. What makes it need a CNN: the shape's position, size, rotation and colour are random,
the background is a random gradient plus noise, and thin distractor lines cross the image, so no fixed
pixel weighting (a linear model) separates the classes well, while local shape detectors do.

The segmentation variant is written as a `masks` folder instead (trainer.data.masks): ROOT/<split>/images/
NNNNN.png with ROOT/<split>/masks/NNNNN.png (mode L, class indices) and ROOT/classes.txt. Each image holds
1-4 shapes of random kinds over the same kind of background; every shape's colour is drawn anew, so a
pixel's colour says "some shape" (or a distractor line) but not which kind: that takes the shape around it.
The detection variant draws the same kind of scenes and writes them as a COCO folder (trainer.data.coco reads
it): ROOT/<split>/NNNNN.png with ROOT/<split>/annotations.json, a tight box per visible shape.
The multilabel variant draws them once more and writes a multi-label CSV folder (trainer.data.multilabel):
ROOT/<split>/NNNNN.png, ROOT/<split>.csv (image, labels: the kinds of shape visible, space-separated) and
ROOT/classes.txt.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import List, NamedTuple, Tuple

import numpy as np
from PIL import Image, ImageDraw

from trainer.errors import DataError
from trainer.outputs import Folder

CLASSES = {
    "binary": ["cross", "square"],
    "multiclass": ["circle", "cross", "square", "triangle"],
    "segmentation": ["background", "circle", "cross", "square", "triangle"],  # mask value = list index
    "detection": ["circle", "cross", "square", "triangle"],  # COCO category ids: GENERATED_CATEGORY_IDS
    "multilabel": ["circle", "cross", "square", "triangle"],  # an image holds 1-4 shapes: 1-4 of these labels
}
SHAPES = CLASSES["multiclass"]  # the kinds a segmentation image draws from; mask value of SHAPES[k] is k + 1
SPLITS = {"train": 0, "val": 1, "test": 2}
SUPERSAMPLE = 4  # drawn at 4x then downsampled with a Lanczos filter, for anti-aliased edges
FORMAT_VERSION = 2  # bump when the drawing changes, so old folders are not silently reused


def default_root(variant: str, image_size: int, seed: int) -> Path:
    return Path("data") / "generated" / f"{variant}-{image_size}px-seed{seed}-v{FORMAT_VERSION}"


def _polygon(cx: float, cy: float, radius: float, angle: float, kind: str) -> list:
    if kind == "square":
        corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        pts = [(x * radius * 0.75, y * radius * 0.75) for x, y in corners]
    elif kind == "triangle":
        pts = [(radius * math.cos(a), radius * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "cross":
        w, r = radius * 0.33, radius
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    else:
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, radius: float, angle: float,
                fill) -> None:
    if kind == "circle":
        r = radius * 0.85
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(cx, cy, radius, angle, kind), fill=fill)


def _gradient(big: int, c0: np.ndarray, c1: np.ndarray, theta: float) -> Image.Image:
    """A linear gradient between two colours in direction `theta`, `big` x `big` RGB."""
    yy, xx = np.mgrid[0:big, 0:big] / big
    t = (np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5)) + 0.5
    bg = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    return Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")


def draw_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of `size` x `size` with a single `kind` shape; all randomness from `rng`."""
    big = size * SUPERSAMPLE
    # background: a linear gradient between two random colours, in a random direction
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    img = _gradient(big, c0, c1, theta)
    draw = ImageDraw.Draw(img)
    # shape colour: resampled until it stands out from the background mean (never invisible)
    bg_mean = (c0 + c1) / 2
    for _ in range(100):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - bg_mean) > 110:
            break
    radius = rng.uniform(0.18, 0.34) * big
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, big - margin, 2)
    angle = rng.uniform(0, 2 * math.pi)
    _draw_shape(draw, kind, cx, cy, radius, angle, tuple(int(v) for v in colour))
    # distractors: 0-2 thin lines of random colour anywhere
    for _ in range(int(rng.integers(0, 3))):
        x0, y0, x1, y1 = rng.uniform(0, big, 4)
        draw.line([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=SUPERSAMPLE)
    small = img.resize((size, size), Image.LANCZOS)
    noisy = np.asarray(small, dtype=np.float32) + rng.normal(0, 14, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


# ---- segmentation scenes ----

class Shape(NamedTuple):
    kind: str  # one of SHAPES
    cx: float  # centre and radius in supersampled pixels
    cy: float
    radius: float
    angle: float  # radians
    fill: Tuple[int, int, int]


class ScenePlan(NamedTuple):
    """Every random choice of one segmentation image, drawn before any pixel is: `render_scene` can then
    paint it with or without its shapes or noise (tests compare those against the mask)."""
    c0: np.ndarray  # gradient end colours, 0-255
    c1: np.ndarray
    theta: float  # gradient direction, radians
    lines: list  # distractors: ((x0, y0, x1, y1), fill) in supersampled pixels, drawn under the shapes
    shapes: List[Shape]  # in drawing order: a later shape covers an earlier one, in the mask too
    noise: np.ndarray  # (size, size, 3) Gaussian, std 14 (0-255 scale), added after downsampling


def plan_scene(size: int, rng: np.random.Generator) -> ScenePlan:
    """The random choices of one `size` x `size` segmentation image; all randomness from `rng`."""
    big = size * SUPERSAMPLE
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = float(rng.uniform(0, 2 * math.pi))
    bg_mean = (c0 + c1) / 2
    # 0-3 thin lines of random colour: clutter a per-pixel colour rule takes for a shape
    lines = [(tuple(rng.uniform(0, big, 4)), tuple(int(v) for v in rng.uniform(0, 255, 3)))
             for _ in range(int(rng.integers(0, 4)))]
    shapes: List[Shape] = []
    for _ in range(int(rng.integers(1, 5))):
        kind = SHAPES[int(rng.integers(0, len(SHAPES)))]
        radius = rng.uniform(0.12, 0.26) * big  # smaller than the classification shapes: up to 4 share an image
        margin = radius * 1.05
        # a few tries at a centre that keeps the shapes mostly apart (overlap is allowed, not total cover)
        for _ in range(20):
            cx, cy = rng.uniform(margin, big - margin, 2)
            if all(math.hypot(cx - o.cx, cy - o.cy) > 0.8 * (radius + o.radius) for o in shapes):
                break
        angle = float(rng.uniform(0, 2 * math.pi))
        # stands out from the background (as draw_image) and from the shapes already drawn, so that an edge
        # between two shapes is visible
        for _ in range(100):
            colour = rng.uniform(0, 255, 3)
            if np.linalg.norm(colour - bg_mean) > 110 and all(np.linalg.norm(colour - np.array(o.fill)) > 80
                                                              for o in shapes):
                break
        shapes.append(Shape(kind, float(cx), float(cy), float(radius), angle, tuple(int(v) for v in colour)))
    noise = rng.normal(0, 14, (size, size, 3))
    return ScenePlan(c0, c1, theta, lines, shapes, noise)


def render_scene(plan: ScenePlan, size: int, shapes: bool = True, noise: bool = True
                 ) -> Tuple[Image.Image, Image.Image]:
    """The RGB image and its mask (mode L: 0 background, k + 1 for SHAPES[k]) of a plan.

    Both are drawn at SUPERSAMPLE x with the same geometry. The image is then Lanczos-downsampled like the
    classification images; each mask pixel takes the class covering most of its SUPERSAMPLE^2 subpixels
    (ties to the lower index), i.e. the colour that dominates the downsampled pixel. `shapes=False` paints
    the background and lines only (mask all 0), `noise=False` leaves the noise out.
    """
    big = size * SUPERSAMPLE
    img = _gradient(big, plan.c0, plan.c1, plan.theta)
    mask = Image.new("L", (big, big), 0)
    draw, draw_mask = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for xy, fill in plan.lines:
        draw.line(list(xy), fill=fill, width=SUPERSAMPLE)
    for s in plan.shapes if shapes else []:
        _draw_shape(draw, s.kind, s.cx, s.cy, s.radius, s.angle, s.fill)
        _draw_shape(draw_mask, s.kind, s.cx, s.cy, s.radius, s.angle, SHAPES.index(s.kind) + 1)
    small = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float64)
    if noise:
        small = small + plan.noise
    blocks = np.asarray(mask).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE)
    votes = np.stack([(blocks == c).sum(axis=(1, 3)) for c in range(len(SHAPES) + 1)])
    return (Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB"),
            Image.fromarray(votes.argmax(axis=0).astype(np.uint8), "L"))


def draw_scene(size: int, rng: np.random.Generator) -> Tuple[Image.Image, Image.Image]:
    """One segmentation image and its mask (see render_scene); all randomness from `rng`."""
    return render_scene(plan_scene(size, rng), size)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # three numbers: never the stream of a classification image ([seed, split, class, index])
    return np.random.default_rng([seed, SPLITS[split], index])


# images per split of the segmentation variant: data.generated.<split>_per_class x this (one per shape kind), so
# switching a recipe from the multiclass variant keeps its number of images (and generation time)
SEGMENTATION_IMAGES_PER_COUNT = len(SHAPES)


def _params(variant: str, image_size: int, seed: int, counts: dict) -> dict:
    params = {"format_version": FORMAT_VERSION, "variant": variant, "image_size": image_size, "seed": seed,
              "classes": CLASSES[variant], "per_class": counts}
    if variant in SCENE_WRITERS:  # a key of its own: the classification markers stay as they were
        params["images_per_split"] = {k: n * SEGMENTATION_IMAGES_PER_COUNT for k, n in counts.items()}
    return params


def _write_segmentation(tmp: Path, image_size: int, seed: int, counts: dict) -> None:
    (tmp / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES["segmentation"]))
    for split, n in counts.items():
        images, masks = tmp / split / "images", tmp / split / "masks"
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        for i in range(n * SEGMENTATION_IMAGES_PER_COUNT):
            img, mask = draw_scene(image_size, scene_rng(seed, split, i))
            img.save(images / f"{i:05d}.png", optimize=False)
            mask.save(masks / f"{i:05d}.png", optimize=False)


def _write_detection(tmp: Path, image_size: int, seed: int, counts: dict) -> None:
    write_generated_coco(tmp, image_size, seed, {k: n * SEGMENTATION_IMAGES_PER_COUNT for k, n in counts.items()})


def _write_multilabel(tmp: Path, image_size: int, seed: int, counts: dict) -> None:
    write_generated_multilabel(tmp, image_size, seed,
                               {k: n * SEGMENTATION_IMAGES_PER_COUNT for k, n in counts.items()})


# the variants drawn as scenes of several shapes, by the writer of each (the others are class folders)
SCENE_WRITERS = {"segmentation": _write_segmentation, "detection": _write_detection,
                 "multilabel": _write_multilabel}


def _write_variant(tmp: Path, variant: str, image_size: int, seed: int, counts: dict) -> None:
    if variant in SCENE_WRITERS:
        SCENE_WRITERS[variant](tmp, image_size, seed, counts)
        return
    for split, n in counts.items():
        for class_idx, kind in enumerate(CLASSES[variant]):
            folder = tmp / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, SPLITS[split], class_idx, i])
                draw_image(kind, image_size, rng).save(folder / f"{i:05d}.png", optimize=False)


# ---- the detection variant: the segmentation scenes as a COCO folder ----

# the generated set's category ids: deliberately neither contiguous nor starting at 1, so that every run that
# uses it goes through the id <-> label mapping (label = position in id order + 1)
GENERATED_CATEGORY_IDS = {"circle": 2, "cross": 3, "square": 5, "triangle": 7}
MIN_VISIBLE_PIXELS = 4  # a generated shape covered down to fewer visible pixels gets no box


def detection_scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # a fourth number, 7: never the stream of a segmentation scene ([seed, split, index]) or a classification
    # image ([seed, split, class, index] has class < 7)
    return np.random.default_rng([seed, SPLITS[split], index, 7])


def visible_shapes(plan, size: int) -> np.ndarray:
    """(size, size) uint8 map of which shape (j + 1 for plan.shapes[j], 0 none) is the visible one at each pixel:
    the shapes drawn at SUPERSAMPLE x with render_scene's geometry, later ones over earlier ones, and each
    pixel given to the shape covering most of its subpixels (ties to the lower number), as render_scene's mask
    does per class. Two touching shapes of one kind stay apart here."""
    big = size * SUPERSAMPLE
    ids = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(ids)
    for j, s in enumerate(plan.shapes):
        _draw_shape(draw, s.kind, s.cx, s.cy, s.radius, s.angle, j + 1)
    blocks = np.asarray(ids).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE)
    votes = np.stack([(blocks == j).sum(axis=(1, 3)) for j in range(len(plan.shapes) + 1)])
    return votes.argmax(axis=0).astype(np.uint8)


def write_generated_coco(tmp: Path, image_size: int, seed: int, counts: dict) -> None:
    """For each split, `counts[split]` images tmp/<split>/NNNNN.png of the segmentation scenes (1-4 shapes on a
    noisy gradient with distractor lines) and tmp/<split>/annotations.json: one annotation per shape, its box
    the tight box of the pixels where that shape is visible (a shape covered down to under MIN_VISIBLE_PIXELS
    gets none), area = those pixels. Byte-identical for the same arguments."""
    tmp = Path(tmp)
    categories = [{"id": GENERATED_CATEGORY_IDS[name], "name": name, "supercategory": "shape"} for name in SHAPES]
    for split, n in counts.items():
        folder = tmp / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            plan = plan_scene(image_size, detection_scene_rng(seed, split, i))
            img, _ = render_scene(plan, image_size)
            name = f"{i:05d}.png"
            img.save(folder / name, optimize=False)
            images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
            shown = visible_shapes(plan, image_size)
            for j, s in enumerate(plan.shapes):
                ys, xs = np.nonzero(shown == j + 1)
                if len(xs) < MIN_VISIBLE_PIXELS:
                    continue
                x0, y0 = int(xs.min()), int(ys.min())
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                    "category_id": GENERATED_CATEGORY_IDS[s.kind],
                                    "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                                    "area": int(len(xs)), "iscrowd": 0})
        coco = {"info": {"description": f"generated shapes, seed {seed}, {image_size} px"},
                "images": images, "annotations": annotations, "categories": categories}
        (folder / "annotations.json").write_text(json.dumps(coco, separators=(",", ":")))


# ---- the multilabel variant: the scenes as a multi-label CSV folder ----

def multilabel_scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # a fourth number, 11: never the stream of a segmentation (3 numbers), detection (7) or classification
    # image (its class < 7)
    return np.random.default_rng([seed, SPLITS[split], index, 11])


def write_generated_multilabel(tmp: Path, image_size: int, seed: int, counts: dict) -> None:
    """For each split, `counts[split]` scenes tmp/<split>/NNNNN.png and tmp/<split>.csv naming, per image, the
    kinds of shape visible in it (at least MIN_VISIBLE_PIXELS pixels, as the detection variant's boxes), sorted
    and space-separated: a scene's 1-4 shapes give 1-4 labels (two shapes of a kind, one). Byte-identical for
    the same arguments."""
    tmp = Path(tmp)
    (tmp / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES["multilabel"]))
    for split, n in counts.items():
        folder = tmp / split
        folder.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["image", "labels"])
        for i in range(n):
            plan = plan_scene(image_size, multilabel_scene_rng(seed, split, i))
            img, _ = render_scene(plan, image_size)
            name = f"{split}/{i:05d}.png"
            img.save(tmp / name, optimize=False)
            shown = visible_shapes(plan, image_size)
            kinds = {s.kind for j, s in enumerate(plan.shapes) if (shown == j + 1).sum() >= MIN_VISIBLE_PIXELS}
            writer.writerow([name, " ".join(sorted(kinds))])
        (tmp / f"{split}.csv").write_text(text.getvalue())


class _Finished(Exception):
    """Another process finished the same dataset while this one drew it."""


def ensure_generated(root: Path, variant: str, image_size: int, seed: int, counts: dict) -> Path:
    """Write the dataset under `root` unless an identical one is already there; returns `root`. `counts` maps a
    split to images per class, or for the segmentation variant to a quarter of its images (x SHAPES).

    Drawn into a temporary folder beside `root` and renamed into place (the write gate's `replacing`, recorded in
    the ledger of root's parent), so an interrupted generation never leaves a half-written dataset that a later
    run would trust, and a folder that is not a generated dataset is never written into.
    """
    root = Path(root)
    params = _params(variant, image_size, seed, counts)
    marker = root / "dataset.json"

    def check_found() -> bool:
        if not marker.is_file():
            return False
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError):
            raise DataError(f"{marker} is not the marker of a generated dataset (not readable JSON); choose another "
                            f"data.root or move it away") from None
        if found != params:
            raise DataError(f"{root} holds a generated dataset with other parameters ({found}); "
                            f"choose another data.root or delete it")
        return True

    if check_found():
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not a generated dataset (no dataset.json); choose another data.root")
    try:
        with Folder(root.parent, "train", option="data.root").replacing(root.name) as tmp:
            _write_variant(tmp, variant, image_size, seed, counts)
            (tmp / "dataset.json").write_text(json.dumps(params, indent=1))
            if marker.is_file():  # drawn by another process meanwhile: theirs stays (it may be read already)
                raise _Finished
    except _Finished:
        pass
    if not check_found():
        raise DataError(f"{root}: the generated dataset was not written")
    return root
