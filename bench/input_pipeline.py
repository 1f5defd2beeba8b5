"""Input pipeline: where the time goes between a JPEG file and a training batch, per process.

For a folder of JPEGs it measures, on the same files and in one run:
  read        bytes from disk (page cache warm)
  decode_pil  PIL decode + convert to RGB
  decode_tv   torchvision.io.decode_jpeg on the file bytes (uint8 tensor)
  decode      the trainer's decode, file read included (trainer.data.folders.decode_rgb: decode_jpeg for JPEGs)
  sample_pil  the training sample as it was with PIL decoding: PIL image -> the same augmentation (the
              torchvision v2 chain then resizes the PIL image, as before)
  sample      the trainer's training sample: decode + crop/flip augmentation + normalise (FileDataset[i])
  loader_wN   the trainer's DataLoader with N workers (collate included), img/s for the whole loader
Each number is the median of --repeats passes. Photo-sized JPEGs are generated when no folder is given for
them (random 640x480 images, quality 90), so anyone can re-run it.

    .venv/bin/python bench/input_pipeline.py --cifar /tmp/cifar/train --limit 5000
    .venv/bin/python bench/input_pipeline.py --smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.data.datasets import FileDataset, sample_seed, train_transform  # noqa: E402
from trainer.data.folders import decode_rgb, is_image_file, load_rgb  # noqa: E402


def files_under(folder: Path, limit: int) -> list:
    found = sorted(str(p) for p in folder.rglob("*") if is_image_file(p))
    rng = np.random.default_rng(0)
    return [found[i] for i in sorted(rng.permutation(len(found))[:limit])] if len(found) > limit else found


def make_photos(folder: Path, n: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)  # smooth-ish content, like a photo, not noise
        img = Image.fromarray(base).resize((640, 480), Image.BICUBIC)
        path = folder / "c" / f"{i:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        img.save(path, quality=90)
        paths.append(str(path))
    return paths


def rate(fn, items, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        times.append(time.perf_counter() - start)
    return len(items) / statistics.median(times)


def pil_sample(dataset: FileDataset, index: int) -> torch.Tensor:
    """One training sample with PIL decoding: the same augmentation and random draws as dataset[index]."""
    image = load_rgb(dataset.paths[index])
    transform = dataset.transform
    if getattr(transform, "takes_rng", False):  # PadCropFlip takes a uint8 tensor
        return transform(torch.from_numpy(np.array(image)).permute(2, 0, 1),
                         np.random.default_rng([dataset.seed, dataset.epoch, index]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(dataset.seed, dataset.epoch, index))
        return transform(image)  # the v2 chain on the PIL image: PIL's resize


def measure(paths: list, image_size: int, repeats: int, workers: list) -> dict:
    from torchvision.io import decode_jpeg, read_file

    blobs = [read_file(p) for p in paths]
    out = {"files": len(paths), "read": rate(lambda p: open(p, "rb").read(), paths, repeats),
           "decode_pil": rate(load_rgb, paths, repeats),
           "decode_tv": rate(lambda b: decode_jpeg(b), blobs, repeats),
           "decode": rate(decode_rgb, paths, repeats)}
    transform = train_transform(image_size, [0.5] * 3, [0.25] * 3, hflip=True, crop_padding=4,
                                random_resized_crop=image_size > 64, rrc_min_scale=0.35, color_jitter=0.0)
    dataset = FileDataset([(p, 0) for p in paths], transform, seed=0)
    out["sample_pil"] = rate(lambda i: pil_sample(dataset, i), range(len(dataset)), repeats)
    out["sample"] = rate(dataset.__getitem__, range(len(dataset)), repeats)
    for w in workers:
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=w,
                                             generator=torch.Generator().manual_seed(0))
        out[f"loader_w{w}"] = rate(lambda _: sum(1 for _ in loader), [0], repeats) * len(dataset)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", help="a folder of CIFAR-size JPEGs, e.g. the extracted train/ split")
    p.add_argument("--photos", help="a folder of photo-sized JPEGs (default: generate 300 at 640x480)")
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    if args.smoke:
        args.limit, args.repeats, workers = 20, 1, [0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.cifar:
            results["cifar_32px"] = measure(files_under(Path(args.cifar), args.limit), 32, args.repeats, workers)
        photos = (files_under(Path(args.photos), args.limit) if args.photos
                  else make_photos(Path(tmp) / "photos", min(300, args.limit)))
        results["photo_640x480_to_224"] = measure(photos, 224, args.repeats, workers)
    results["torch"] = torch.__version__
    results["threads"] = torch.get_num_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "input-pipeline" + ("-smoke" if args.smoke else "")
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    cols = ["files", "read", "decode_pil", "decode_tv", "decode", "sample_pil", "sample"] + [f"loader_w{w}" for w in workers]
    lines = ["| images | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, r in results.items():
        if isinstance(r, dict):
            lines.append(f"| {key} | " + " | ".join(f"{r[c]:.0f}" for c in cols) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("img/s per process (files: count)\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
