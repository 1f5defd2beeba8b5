"""`trainer pack --max-side`: what decoding each image once saves over decoding it twice (issue 34).

Before, a pack with --max-side decoded every image in full to check it (folders._check_one) and then again to
shrink it (shards._shrunk); now one decode (folders.decode_checked) does both. `twice` is the pack with that
extra check decode put back (the check, then the pack as it is now: the same work as before), `once` the pack
as it is; both pack the same generated photo-like JPEGs (bench/input_pipeline.py's make_photos) into a new
folder, one read thread (per core), interleaved, the median of --repeats each. The figure is `twice/once`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/pack_shrink.py --count 40 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from input_pipeline import make_photos  # noqa: E402
import trainer.data.shards as shards  # noqa: E402
from trainer.data.folders import _check_one, decode_checked  # noqa: E402


def decoded_twice(fh, exif_orientation: bool = False):
    """decode_checked after the full check the pack made before (a decode of its own)."""
    why = _check_one(fh)
    fh.seek(0)
    return (None, why) if why else decode_checked(fh, exif_orientation)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=40, help="photos to pack")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--max-side", type=int, default=320)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    shards.READ_THREADS = 1  # per core
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        make_photos(work / "photos" / "train", args.count, args.width, args.height)
        times = {"twice": [], "once": []}
        for r in range(args.repeats):
            for name, decode in (("twice", decoded_twice), ("once", decode_checked)):
                shards.decode_checked = decode
                start = time.perf_counter()
                shards.pack(work / "photos", work / f"{name}-{r}", say=lambda *_: None, max_side=args.max_side)
                times[name].append(time.perf_counter() - start)
        shards.decode_checked = decode_checked
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in median.items():
        print(f"{name:6s} {t:.3f} s for {args.count} {args.width}x{args.height} JPEGs "
              f"({args.count / t:.1f} images/s)")
    print(f"twice/once {median['twice'] / median['once']:.2f}x")


if __name__ == "__main__":
    main()
