"""The embedded generated dataset: shapes drawn procedurally on noisy backgrounds, written as a real
ImageFolder of PNG files (train/ val/ test/) on first use.

Every image is a pure function of (seed, split, class, index), so the same parameters give byte-identical
files on any machine. What makes it need a CNN: the shape's position, size, rotation and colour are random,
the background is a random gradient plus noise, and thin distractor lines cross the image, so no fixed
pixel weighting (a linear model) separates the classes well, while local shape detectors do.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.errors import DataError

CLASSES = {
    "binary": ["cross", "square"],
    "multiclass": ["circle", "cross", "square", "triangle"],
}
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


def draw_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of `size` x `size` with a single `kind` shape; all randomness from `rng`."""
    big = size * SUPERSAMPLE
    # background: a linear gradient between two random colours, in a random direction
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:big, 0:big] / big
    t = (np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5)) + 0.5
    bg = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
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
    fill = tuple(int(v) for v in colour)
    if kind == "circle":
        r = radius * 0.85
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(cx, cy, radius, angle, kind), fill=fill)
    # distractors: 0-2 thin lines of random colour anywhere
    for _ in range(int(rng.integers(0, 3))):
        x0, y0, x1, y1 = rng.uniform(0, big, 4)
        draw.line([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=SUPERSAMPLE)
    small = img.resize((size, size), Image.LANCZOS)
    noisy = np.asarray(small, dtype=np.float32) + rng.normal(0, 14, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def _params(variant: str, image_size: int, seed: int, counts: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "variant": variant, "image_size": image_size, "seed": seed,
            "classes": CLASSES[variant], "per_class": counts}


def ensure_generated(root: Path, variant: str, image_size: int, seed: int, counts: dict) -> Path:
    """Write the dataset under `root` unless an identical one is already there; returns `root`.

    Written into a temporary sibling folder and renamed into place, so an interrupted generation never
    leaves a half-written dataset that a later run would trust.
    """
    root = Path(root)
    params = _params(variant, image_size, seed, counts)
    marker = root / "dataset.json"
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != params:
            raise DataError(f"{root} holds a generated dataset with other parameters ({found}); "
                            f"choose another data.root or delete it")
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} exists and is not a generated dataset (no dataset.json); choose another data.root")
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n in counts.items():
        for class_idx, kind in enumerate(CLASSES[variant]):
            folder = tmp / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, SPLITS[split], class_idx, i])
                draw_image(kind, image_size, rng).save(folder / f"{i:05d}.png", optimize=False)
    (tmp / "dataset.json").write_text(json.dumps(params, indent=1))
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        if root.exists():
            root.rmdir()  # an empty folder left by a user (fails if another process has just filled it)
        os.rename(tmp, root)
    except OSError:
        # another process finished the same dataset first: use theirs if it is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not (marker.is_file() and json.loads(marker.read_text()) == params):
            raise
    return root
