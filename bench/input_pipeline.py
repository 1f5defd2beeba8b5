"""Input pipeline: where the time goes between a JPEG file and a training batch, per process.

For a folder of JPEGs it measures, on the same files and in one run:
  read        bytes from disk (page cache warm)
  decode_pil  PIL decode + convert to RGB
  decode_tv   torchvision.io.decode_jpeg on the file bytes (uint8 tensor)
  decode      the trainer's decode, file read included (trainer.data.folders.decode_rgb: decode_jpeg for JPEGs)
  sample_pil  the training sample as it was with PIL decoding: PIL image -> the same augmentation (the
              torchvision v2 chain then resizes the PIL image, as before)
  today       the training sample as the trainer made it before data.scaled_decode (issue 34): FileDataset[i]
              with every JPEG decoded whole and its draws seeded by torch.manual_seed
  sample      the trainer's training sample with data.scaled_decode=false: decode + crop/flip augmentation +
              normalise, whole JPEGs (the CPU generator alone seeded: `today` less ~0.2 ms)
  scaled      the same samples with data.scaled_decode=true: the crop drawn from the header, the JPEG decoded
              at the smallest DCT scale that keeps it at the output size (trainer.data.folders.decode_region)
  bare_scaled the decoder's limit for `scaled`: the file read and the decode alone, at the scale each sample's
              crop gets (whole at scale 1, Pillow's draft below), no crop, resize or normalise
  region      the file read, the header and decode_region of each sample's crop: the decode and the resize to
              224 px alone (the crop drawn beforehand), no seeding, draws, flip or normalise
  scaled_u8   `scaled` without the closing ToImage/ToDtype/Normalize (a uint8 sample, the same draws): what a
              sample would cost per core if normalisation moved out of it to the batch
  dali        (photos, when nvidia-dali is installed) DALI's CPU pipeline on one thread: random-crop decode,
              resize, flip + normalise, batches of 64 from the file bytes already in memory
  packed      (photos) the trainer's training sample (data.scaled_decode=true, its default) from a pack of the
              same files made with `trainer pack --max-side 320` (trainer.data.shards: longer side 320, so
              640x480 and 1024x768 are stored as 320x240 JPEGs of quality 90): what pre-shrinking at pack time
              saves per sample, the 224-px crops then taken from 320x240 pixels (no longer the same pixels)
  loader_wN   the trainer's DataLoader with N workers (collate included), img/s for the whole loader (photos:
              of `today`'s samples)
  scaled_wN   the same with data.scaled_decode=true
  packed_wN   the same with `packed`'s samples (from the shards)
  scaled_u8_wN  the same with `scaled_u8`'s uint8 samples: uint8 batches (a quarter of float32's bytes to collate
              into shared memory), their normalisation left to the device
  DEV_decode_wN  with --decode-device DEV: the same batches with data.decode_device's path: N workers only
              read the files, the main process decodes each batch's JPEGs on DEV in one call and augments them
              there (trainer.data.device_decode); loader_wN then copies its batches to DEV too, so both columns
              are batches ready on the device (cuda: nvJPEG; cpu: the same code on libjpeg-turbo, a dry run)
Each number is the median of --repeats passes. Photo-sized JPEGs are generated when no folder is given for
them (smooth random 640x480 and 1024x768 images, quality 90), so anyone can re-run it; RandomResizedCrop to
224 px (scale 0.35-1, the trainer's default). `scaled/sample` and `scaled_w2/loader_w2` are the speed-ups of
data.scaled_decode over the path before it (`scaled/today` per sample, `scaled_wN/loader_wN` for the whole
loader), `scaled/bare_scaled` how close a scaled sample comes to its decode alone; `packed/today` and
`packed_wN/loader_wN` what a pack with --max-side 320 gives over today's path from the folder.

    OMP_NUM_THREADS=1 .venv/bin/python bench/input_pipeline.py --workers 0,2 --photo-count 256
    .venv/bin/python bench/input_pipeline.py --cifar /tmp/cifar/train --limit 5000
    .venv/bin/python bench/input_pipeline.py --smoke
    python bench/input_pipeline.py --decode-device cuda --workers 2,8 --photo-count 1000   # on a GPU
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

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


def make_photos(into: Path, n: int, width: int = 640, height: int = 480) -> list:
    """`n` photo-sized JPEGs in `into`, inside a tempfile.TemporaryDirectory of main's."""
    into.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # smooth-ish content, like a photo, not noise: a random grid of 8x8-pixel cells, bicubically upsampled
        base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((width, height), Image.BICUBIC)
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


class TodayDataset(FileDataset):
    """FileDataset as it was before data.scaled_decode: every sample seeded by torch.manual_seed."""

    def augment(self, image: torch.Tensor, index: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transform(image)


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


PACK_MAX_SIDE = 320  # px, the longer side `packed` stores: 640x480 and 1024x768 become 320x240, >= 224 on both


def packed_dataset(paths: list, work: Path, transform) -> FileDataset:
    """The training split of `trainer pack --max-side PACK_MAX_SIDE` of `paths` (one class folder), packed into
    `work` (a folder of main's tempfile.TemporaryDirectory), as data.format=shards builds it."""
    from trainer.data.shards import ShardDataset, pack, read_packed

    pack(Path(paths[0]).parents[1], work, say=lambda *_: None, max_side=PACK_MAX_SIDE)
    packed = read_packed(work)
    rows = np.array([row for row, _ in packed.found["train"]], dtype=np.int64)
    dataset = ShardDataset(packed.shards, rows, np.zeros(len(rows), dtype=np.int64), packed.paths.take(rows),
                           transform, seed=0)
    dataset.scaled_decode = True  # the trainer's default
    return dataset


def measure(paths: list, image_size: int, repeats: int, workers: list, decode_device: Optional[str] = None,
            pack_into: Optional[Path] = None) -> dict:
    from torchvision.io import decode_jpeg, read_file

    blobs = [read_file(p) for p in paths]
    out = {"files": len(paths), "read": rate(lambda p: open(p, "rb").read(), paths, repeats),
           "decode_pil": rate(load_rgb, paths, repeats),
           "decode_tv": rate(lambda b: decode_jpeg(b), blobs, repeats),
           "decode": rate(decode_rgb, paths, repeats)}
    transform = train_transform(image_size, [0.5] * 3, [0.25] * 3, hflip=True, crop_padding=4,
                                random_resized_crop=image_size > 64, rrc_min_scale=0.35, color_jitter=0.0)
    dataset = FileDataset([(p, 0) for p in paths], transform, seed=0)
    scaled = FileDataset([(p, 0) for p in paths], transform, seed=0)
    scaled.scaled_decode = True
    out["sample_pil"] = rate(lambda i: pil_sample(dataset, i), range(len(dataset)), repeats)
    if image_size > 64:  # the crop-and-resize training transform: data.scaled_decode's case
        plans = [crop_plan(scaled, i) for i in range(len(paths))]
        scales = [s for s, _ in plans]
        out["scale_mix"] = {s: scales.count(s) for s in sorted(set(scales))}
        uint8 = FileDataset([(p, 0) for p in paths], v2.Compose(transform.transforms[:-3]), seed=0)
        uint8.scaled_decode = True
        # one round-robin over the per-sample paths per repeat: the VM's drift hits them alike
        today = TodayDataset([(p, 0) for p in paths], transform, seed=0)
        fns = {"today": today.__getitem__, "sample": dataset.__getitem__, "scaled": scaled.__getitem__,
               "scaled_u8": uint8.__getitem__, "region": lambda i: region(paths[i], plans[i][1], image_size),
               "bare_scaled": lambda i: bare_decode(paths[i], scales[i])}
        packed = packed_dataset(paths, pack_into, transform) if pack_into is not None else None
        if packed is not None:
            assert len(packed) == len(paths)
            fns["packed"] = packed.__getitem__
        out.update(side_by_side(fns, range(len(paths)), repeats))
        out["dali"] = dali_rate(paths, image_size, repeats)
    else:
        out["sample"] = rate(dataset.__getitem__, range(len(dataset)), repeats)
    device = torch.device(decode_device or "cpu")
    for w in workers:
        loaders = {f"loader_w{w}": today if image_size > 64 else dataset}
        if image_size > 64:
            loaders[f"scaled_w{w}"] = scaled
            loaders[f"scaled_u8_w{w}"] = uint8  # uint8 batches: what the loader gives if the device normalises
            if packed is not None:
                loaders[f"packed_w{w}"] = packed
        loaders = {name: torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=w,
                                                     generator=torch.Generator().manual_seed(0))
                   for name, ds in loaders.items()}
        # whole passes, alternated per repeat
        passes = side_by_side({name: (lambda _, dl=dl: delivered(dl, lambda b: b[0].to(device), device))
                               for name, dl in loaders.items()}, [0], repeats)
        out.update({name: v * len(dataset) for name, v in passes.items()})
        if decode_device:
            decoder = BatchDecoder(dataset, device)
            encoded = torch.utils.data.DataLoader(decoder.samples, batch_size=64, shuffle=True, num_workers=w,
                                                  generator=torch.Generator().manual_seed(0),
                                                  collate_fn=collate_encoded)
            out[f"{decode_device}_decode_w{w}"] = rate(lambda _: delivered(encoded, lambda b: decoder(b)[0], device),
                                                       [0], repeats) * len(dataset)
    return out


def side_by_side(fns: dict, items, repeats: int) -> dict:
    """img/s of each function over `items`, the median of `repeats` passes. Interleaved item by item (each
    function on item 1, then each on item 2, ...): a burst of the VM's other load hits every function alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        spent = dict.fromkeys(fns, 0.0)
        for item in items:
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(item)
                spent[name] += time.perf_counter() - start
        for name in fns:
            times[name].append(spent[name])
    return {name: len(items) / statistics.median(t) for name, t in times.items()}


def crop_plan(dataset: FileDataset, index: int):
    """The DCT scale divisor data.scaled_decode decodes sample `index` of this epoch at, and its crop box
    (top, left, height, width) of the upright image, as scaled_sample draws it: from the header size, under the
    sample's seed."""
    from trainer.data.folders import dct_scale, jpeg_header, stored_box

    first = dataset.transform.transforms[0]
    header = jpeg_header(dataset.file_bytes(index))
    height, width = header.upright_size()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(dataset.seed, dataset.epoch, index))
        p = first.make_params([torch.empty(0, height, width)])
    box = (p["top"], p["left"], p["height"], p["width"])
    _, _, h, w = stored_box(box, header.orientation, header.height, header.width)
    return dct_scale(h, w, *first.size), box


def region(path: str, box, size: int) -> torch.Tensor:
    """The file read, its header and decode_region of `box` to size x size: a scaled sample's decode and
    resize with none of its draws, flip or normalisation."""
    from trainer.data.folders import decode_region, jpeg_header

    with open(path, "rb") as fh:
        data = fh.read()
    return decode_region(data, jpeg_header(data), box, (size, size))


def bare_decode(path: str, s: int):
    """The file read and its decode at 1/s alone: what decode_region calls (decode_bytes whole at s = 1)."""
    from trainer.data.folders import decode_bytes

    with open(path, "rb") as fh:
        data = fh.read()
    if s == 1:
        return decode_bytes(data)
    import io

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (img.width // s, img.height // s))
        img.load()
        return img


def dali_rate(paths: list, image_size: int, repeats: int) -> Optional[float]:
    """img/s of DALI's CPU pipeline (one thread) on these JPEGs, or None when nvidia-dali is not installed:
    random-crop decode (its own draw of RandomResizedCrop's scale range), resize, flip + normalise."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return None
    blobs = [np.fromfile(p, dtype=np.uint8) for p in paths]
    batch = min(64, len(blobs))
    batches = [blobs[i:i + batch] for i in range(0, len(blobs) - batch + 1, batch)]
    feed = itertools.cycle(range(len(batches)))

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=0)
    def pipe():
        jpegs = fn.external_source(source=lambda: batches[next(feed)], batch=True)
        img = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB, random_area=[0.35, 1.0])
        img = fn.resize(img, resize_x=image_size, resize_y=image_size, antialias=True)
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3,
                                        std=[64.0] * 3, mirror=fn.random.coin_flip())

    p = pipe()
    p.build()
    p.run()  # warm-up
    return rate(lambda _: p.run(), range(len(batches)), repeats) * batch


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
        if args.photos:
            results["photos_to_224"] = measure(files_under(Path(args.photos), args.limit), 224, args.repeats,
                                               workers, args.decode_device)
        else:
            for width, height in ((640, 480),) if args.smoke else ((640, 480), (1024, 768)):
                photos = make_photos(Path(tmp) / f"photos{width}", min(args.photo_count, args.limit), width, height)
                results[f"photo_{width}x{height}_to_224"] = measure(photos, 224, args.repeats, workers,
                                                                    args.decode_device,
                                                                    Path(tmp) / f"packed{width}")
    results["torch"] = torch.__version__
    results["decode_device"] = args.decode_device
    if args.decode_device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    results["threads"] = torch.get_num_threads()
    cols = (["files", "read", "decode_pil", "decode_tv", "decode", "sample_pil", "today", "sample", "scaled",
             "scaled_u8", "region", "bare_scaled",
             "packed", "dali"] + [f"{kind}_w{w}" for w in workers for kind in ("loader", "scaled", "scaled_u8",
                                                                                  "packed")])
    if args.decode_device:
        cols += [f"{args.decode_device}_decode_w{w}" for w in workers]
    lines = ["| images | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    ratios = []
    for key, r in results.items():
        if isinstance(r, dict):
            lines.append(f"| {key} | " + " | ".join(cell(r.get(c)) for c in cols) + " |")
            if "scaled" in r:
                w = max(workers)
                ratios.append(f"{key}: scaled/today {r['scaled'] / r['today']:.2f}x, scaled/sample "
                              f"{r['scaled'] / r['sample']:.2f}x, scaled_w{w}/loader_w{w} "
                              f"{r[f'scaled_w{w}'] / r[f'loader_w{w}']:.2f}x, scaled/bare_scaled "
                              f"{r['scaled'] / r['bare_scaled']:.2f}, region/bare_scaled "
                              f"{r['region'] / r['bare_scaled']:.2f}, scaled_u8/scaled "
                              f"{r['scaled_u8'] / r['scaled']:.2f}x, "
                              f"scaled_u8_w{w}/scaled_w{w} {r[f'scaled_u8_w{w}'] / r[f'scaled_w{w}']:.2f}x"
                              f", scales (divisor: samples) {r['scale_mix']}"
                              + (f", scaled/dali {r['scaled'] / r['dali']:.2f}x" if r.get("dali") else "")
                              + (f", packed/today {r['packed'] / r['today']:.2f}x, packed/scaled "
                                 f"{r['packed'] / r['scaled']:.2f}x, packed_w{w}/loader_w{w} "
                                 f"{r[f'packed_w{w}'] / r[f'loader_w{w}']:.2f}x" if r.get("packed") else ""))
    lines += [""] + ratios
    write_results(args.out, name, results, "\n".join(lines))
    print("img/s per process (files: count)\n" + "\n".join(lines))


def cell(value) -> str:
    return "-" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
