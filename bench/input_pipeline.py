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
  DEV_decode_wN  with --decode-device DEV: the same batches with data.decode_device's path: N workers only
              read the files, the main process decodes each batch's JPEGs on DEV in one call and augments them
              there (trainer.data.device_decode); loader_wN then copies its batches to DEV too, so both columns
              are batches ready on the device (cuda: nvJPEG; cpu: the same code on libjpeg-turbo, a dry run)
Each number is the median of --repeats passes. Photo-sized JPEGs are generated when no folder is given for
them (random 640x480 images, quality 90), so anyone can re-run it.

    .venv/bin/python bench/input_pipeline.py --cifar /tmp/cifar/train --limit 5000
    .venv/bin/python bench/input_pipeline.py --smoke
    python bench/input_pipeline.py --decode-device cuda --workers 2,8 --photo-count 1000   # on a GPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gate import check_results, result_files, write_results  # noqa: E402
from trainer.data.datasets import FileDataset, sample_seed, train_transform  # noqa: E402
from trainer.data.device_decode import BatchDecoder, collate_encoded  # noqa: E402
from trainer.data.folders import decode_rgb, is_image_file, load_rgb  # noqa: E402


def files_under(folder: Path, limit: int) -> list:
    found = sorted(str(p) for p in folder.rglob("*") if is_image_file(p))
    rng = np.random.default_rng(0)
    return [found[i] for i in sorted(rng.permutation(len(found))[:limit])] if len(found) > limit else found


def make_photos(into: Path, n: int) -> list:
    """`n` photo-sized JPEGs in `into`, inside a tempfile.TemporaryDirectory of main's."""
    into.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)  # smooth-ish content, like a photo, not noise
        img = Image.fromarray(base).resize((640, 480), Image.BICUBIC)
        path = into / "c" / f"{i:05d}.jpg"
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


def measure(paths: list, image_size: int, repeats: int, workers: list, decode_device: Optional[str] = None) -> dict:
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
    device = torch.device(decode_device or "cpu")
    for w in workers:
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=w,
                                             generator=torch.Generator().manual_seed(0))
        out[f"loader_w{w}"] = rate(lambda _: delivered(loader, lambda b: b[0].to(device), device), [0],
                                   repeats) * len(dataset)
        if decode_device:
            decoder = BatchDecoder(dataset, device)
            encoded = torch.utils.data.DataLoader(decoder.samples, batch_size=64, shuffle=True, num_workers=w,
                                                  generator=torch.Generator().manual_seed(0),
                                                  collate_fn=collate_encoded)
            out[f"{decode_device}_decode_w{w}"] = rate(lambda _: delivered(encoded, lambda b: decoder(b)[0], device),
                                                       [0], repeats) * len(dataset)
    return out


def delivered(loader, to_device, device: torch.device) -> int:
    """Batches of one pass made ready on `device` (the GPU's queue drained before the clock stops)."""
    count = sum(1 for batch in loader if to_device(batch) is not None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", help="a folder of CIFAR-size JPEGs, e.g. the extracted train/ split")
    p.add_argument("--photos", help="a folder of photo-sized JPEGs (default: generate 300 at 640x480)")
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--photo-count", type=int, default=300, help="photo-sized JPEGs to generate (without --photos)")
    p.add_argument("--decode-device", choices=["cpu", "cuda"],
                   help="also measure data.decode_device's path: batches decoded and augmented on this device")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    if args.smoke:
        args.limit, args.repeats, workers = 20, 1, [0]
    name = "input-pipeline" + ("-smoke" if args.smoke else "")
    check_results(args.out, result_files(name))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:  # the generated photos: gone with it
        if args.cifar:
            results["cifar_32px"] = measure(files_under(Path(args.cifar), args.limit), 32, args.repeats, workers,
                                            args.decode_device)
        photos = (files_under(Path(args.photos), args.limit) if args.photos
                  else make_photos(Path(tmp) / "photos", min(args.photo_count, args.limit)))
        results["photo_640x480_to_224"] = measure(photos, 224, args.repeats, workers, args.decode_device)
    results["torch"] = torch.__version__
    results["decode_device"] = args.decode_device
    if args.decode_device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    results["threads"] = torch.get_num_threads()
    cols = ["files", "read", "decode_pil", "decode_tv", "decode", "sample_pil", "sample"] + [f"loader_w{w}" for w in workers]
    if args.decode_device:
        cols += [f"{args.decode_device}_decode_w{w}" for w in workers]
    lines = ["| images | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, r in results.items():
        if isinstance(r, dict):
            lines.append(f"| {key} | " + " | ".join(f"{r[c]:.0f}" for c in cols) + " |")
    write_results(args.out, name, results, "\n".join(lines))
    print("img/s per process (files: count)\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
