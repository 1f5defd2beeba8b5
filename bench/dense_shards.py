"""Packed shards of segmentation and detection folders against the folders themselves (issue 15): how fast an
epoch's images (with their masks or boxes) are read from each, and how many files that opens.

bench/data_scale.py --shards measures this for image folders of classes; this does it for the two other kinds
`trainer pack` packs. For each kind and photo size it makes (once, then reuses) a folder under --work of
--images training images and 2% of that for val:
- masks: train/images/NNNNNNNN.jpg + train/masks/NNNNNNNN.png (4 classes: background and 3 rectangles), the
  layout data.format=masks reads;
- coco: train/NNNNNNNN.jpg + train/annotations.json (1 to 3 boxes an image, 3 categories), as data.format=coco
  reads it.
Each photo is one of 64 distinct JPEGs of the size asked for (noise on a colour, quality 90) written as bytes,
its mask one of 64 distinct PNGs. Then `trainer pack` (256 MiB shards), and read passes as data_scale's: decode
the training images (masks: and masks; coco: the image as floats and its boxes) in a shuffled order through a
DataLoader with 2 workers, no augmentation, in a fresh process, folder and shards alternated, median images/s
of --repeats; with --strace, the files each pass opens.

    .venv/bin/python bench/dense_shards.py --images 20000 --px 32,320 --strace --work /tmp/dense
    .venv/bin/python bench/dense_shards.py --smoke      # tiny: checks that it runs (CI)

Writes JSON + a Markdown table to --out.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from data_scale import (FOLDER_FORMAT, PACK_READ_HEADER, compare_reads, make_shards, noisy_jpegs,  # noqa: E402
                        pack_read_cells)
from gate import check_results, made_once, result_files, write_results  # noqa: E402

DISTINCT = 64  # distinct photos (and masks) written in rotation
CLASSES = ["background", "red", "green", "blue"]  # masks: index 0 and 3 rectangle classes; coco: ids 1-3


def _boxes(rng: np.random.Generator, width: int, height: int) -> list:
    """1 to 3 (class 1-3, x0, y0, x1, y1) rectangles, each at least a quarter of the photo's side."""
    out = []
    for _ in range(int(rng.integers(1, 4))):
        w, h = int(rng.integers(width // 4, width // 2 + 1)), int(rng.integers(height // 4, height // 2 + 1))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        out.append((int(rng.integers(1, len(CLASSES))), x0, y0, x0 + w, y0 + h))
    return out


def _mask_png(boxes: list, width: int, height: int) -> bytes:
    from PIL import Image

    mask = np.zeros((height, width), np.uint8)
    for c, x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = c
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def make_dense(root: Path, kind: str, n_train: int, width: int) -> Path:
    """A masks or COCO folder of n_train training images (and 2% for val) of width x 3/4 width, made once
    through the write gate (gate.made_once)."""
    height = width * 3 // 4
    params = {"made_by": "bench/dense_shards.py", "kind": kind, "n_train": n_train, "width": width,
              "height": height, "val_fraction": 0.02}
    return made_once(root, params, lambda staging: draw_dense(staging, kind, n_train, width, height,
                                                              params["val_fraction"]))


def draw_dense(tmp: Path, kind: str, n_train: int, width: int, height: int, val_fraction: float) -> None:
    """make_dense's folder, drawn into the staging folder `tmp` that made_once renames into place."""
    rng = np.random.default_rng(0)
    photos = noisy_jpegs(rng, width, height, DISTINCT)
    boxes = [_boxes(rng, width, height) for _ in range(DISTINCT)]
    masks = [_mask_png(b, width, height) for b in boxes]
    (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    for split, n in (("train", n_train), ("val", max(int(n_train * val_fraction), 2))):
        images = tmp / split / ("images" if kind == "masks" else "")
        images.mkdir(parents=True)
        if kind == "masks":
            (tmp / split / "masks").mkdir()
        coco: dict = {"images": [], "annotations": [],
                      "categories": [{"id": c, "name": name} for c, name in enumerate(CLASSES) if c]}
        for i in range(n):
            k = (i * 7919) % DISTINCT
            (images / f"{i:08d}.jpg").write_bytes(photos[k])
            if kind == "masks":
                (tmp / split / "masks" / f"{i:08d}.png").write_bytes(masks[k])
                continue
            coco["images"].append({"id": i + 1, "file_name": f"{i:08d}.jpg", "width": width, "height": height})
            for c, x0, y0, x1, y1 in boxes[k]:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": c,
                                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                            "iscrowd": 0})
        if kind == "coco":
            (tmp / split / "annotations.json").write_text(json.dumps(coco))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="masks,coco")
    ap.add_argument("--images", type=int, default=20000, help="training images per folder (val: 2%% more)")
    ap.add_argument("--px", default="32,320", help="photo widths (height: 3/4 of it), one folder each")
    ap.add_argument("--repeats", type=int, default=3, help="read passes per side (the median is kept)")
    ap.add_argument("--strace", action="store_true", help="also count the files each read pass opens")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dense-shards"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--smoke", action="store_true", help="200 images of 32 px, 1 repeat")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.px, args.repeats = 200, "32", 1
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in ("masks", "coco")]
    if unknown:
        raise SystemExit(f"error: --kinds: unknown kind {unknown[0]!r} (masks, coco; image folders of classes: "
                         f"bench/data_scale.py --shards)")
    if args.strace and not shutil.which("strace"):
        raise SystemExit("error: --strace needs strace installed")
    name = "dense-shards" + ("-smoke" if args.smoke else "")
    check_results(args.out, result_files(name))
    work = Path(args.work)
    rows = []
    for kind in kinds:
        for width in (int(p) for p in args.px.split(",")):
            root = make_dense(work / f"{kind}-{width}px-{args.images}", kind, args.images, width)
            pack = make_shards(root, work / f"{kind}-{width}px-{args.images}-shards")
            tmp = Path(tempfile.mkdtemp(prefix="reads-", dir=work))  # strace's counts; removed below
            reads = compare_reads(root, work / f"{kind}-{width}px-{args.images}-shards", args.images, args.repeats,
                                  args.strace, tmp, kind=kind)
            shutil.rmtree(tmp, ignore_errors=True)
            rows.append({"kind": kind, "width": width, "height": width * 3 // 4, "images": args.images,
                         "pack": pack, "reads": reads})
            print(f"[dense_shards] {rows[-1]}", flush=True)
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "settings": vars(args), "rows": rows}
    lines = ["| kind | photo (px) " + PACK_READ_HEADER, "|---" * 11 + "|"]
    for row in rows:
        lines.append(f"| {row['kind']} | {row['width']}x{row['height']} "
                     + pack_read_cells(row["pack"], row["reads"], FOLDER_FORMAT[row["kind"]], row["images"]))
    write_results(args.out, name, result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
