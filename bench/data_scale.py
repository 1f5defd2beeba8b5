"""Data at scale (issue 15): what an image folder of 10 k, 100 k and 1 M files costs before the first training step.

For each size it makes (once, then reuses) a synthetic ImageFolder of small JPEGs under --work: train/ with
the files spread over classes of 1,000 images (like ImageNet's 1,281 per class; 10 classes at 10 k), and val/
with 2% of that. The file count is what is measured here, not decoding: every file is one of 256 distinct
32x32 JPEGs (about 1 KB), written as bytes.

Per size it reports, for 1 and 2 processes and each data.verify_images value asked for (--verify):
- launch -> first training step: wall seconds from starting `trainer train` (or torchrun) to the first row
  of metrics.jsonl (train.log_every_steps=1), for a first start (no cached scan: a new TRAINER_CACHE_DIR,
  its own) and for a restart right after it (as a requeued or resumed job: the scan cache, if the trainer
  has one, and the page cache warm);
- peak resident memory (VmHWM) of each rank process at that moment, and of its DataLoader workers;
- file-system calls per rank up to that moment (--strace: `strace -f -c` over the whole launch, divided by
  the number of ranks; it slows the start, so it is a separate run);
- memory per DataLoader worker after reading every sample's table entry once (the copy-on-read growth of
  forked workers over an epoch; decoding left out): the workers' unique set size (USS).
With --shards, also: `trainer pack` of each folder (its time, shard count and size), the starts above from the
shards (data.format=shards, the "verify" column reads "shards"), and a read pass (an epoch's decoding in a
shuffled order through a DataLoader with 2 workers, no augmentation) from the folder and from the shards,
alternated, median images/s of --repeats, and (--strace) the files opened by the pass.

    .venv/bin/python bench/data_scale.py --sizes 10000,100000,1000000 --work /tmp/data-scale --strace
    .venv/bin/python bench/data_scale.py --sizes 100000 --verify header --shards --strace   # + packed shards
    .venv/bin/python bench/data_scale.py --smoke      # tiny sizes: checks that it runs (CI)

Writes JSON + a Markdown table to --out.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
# the subprocesses' import path: this checkout first, the caller's PYTHONPATH kept after it (pip --target installs)
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
sys.path.insert(0, str(ROOT))

from gate import check_results, made_once, result_files, write_file, write_results  # noqa: E402

PER_CLASS = 1000
DISTINCT = 256  # distinct JPEGs written in rotation
FILE_CALLS = "openat,open,stat,lstat,fstat,newfstatat,statx,getdents64,access,faccessat,faccessat2,readlink,readlinkat"


def noisy_jpegs(rng: np.random.Generator, width: int, height: int, count: int) -> list:
    """`count` distinct JPEG files' bytes of width x height: noise around a colour, quality 90."""
    from PIL import Image

    out = []
    for _ in range(count):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_folder(root: Path, n_train: int) -> Path:
    """root/train/cNNNN/NNNNNNNN.jpg and root/val/..., made once through the write gate (gate.made_once)."""
    per_class = min(PER_CLASS, max(n_train // 10, 1))
    classes = max(n_train // per_class, 2)
    params = {"made_by": "bench/data_scale.py", "n_train": n_train, "per_class": per_class, "classes": classes,
              "val_fraction": 0.02}
    val_per_class = max(int(per_class * params["val_fraction"]), 1)
    jobs = [("train", c, per_class) for c in range(classes)] + [("val", c, val_per_class) for c in range(classes)]

    def draw(staging: Path) -> None:  # into the staging folder made_once renames into place
        blobs = noisy_jpegs(np.random.default_rng(0), 32, 32, DISTINCT)

        def write_class(job):
            split, c, count = job
            class_dir = staging / split / f"c{c:04d}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (class_dir / f"{i:08d}.jpg").write_bytes(blobs[(c * 7919 + i) % DISTINCT])

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(write_class, jobs))

    return made_once(root, params, draw)


def make_shards(root: Path, dest: Path) -> dict:
    """`trainer pack root dest` (256 MiB shards), once; how long it took is kept beside the shards (the shards
    are pack's own folder; the timing file is the bench's, written through the gate)."""
    timing = dest.with_name(dest.name + ".seconds.json")
    if (dest / "index.json").is_file() and timing.is_file():
        return json.loads(timing.read_text())
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "trainer", "pack", str(root), str(dest)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": PYTHONPATH})
    if res.returncode != 0:
        raise SystemExit(f"error: trainer pack failed: {res.stderr.strip().splitlines()[-1:]}")
    index = json.loads((dest / "index.json").read_text())
    made = {"pack_seconds": time.perf_counter() - start,
            "shards": sum(len(v) for v in index["splits"].values()),
            "mib": sum(e["bytes"] for v in index["splits"].values() for e in v) / 2**20}
    write_file(timing.parent, timing.name, json.dumps(made), option="--work")
    return made


def train_command(root: Path, run_dir: Path, processes: int, verify: str) -> list:
    """`verify` "shards": train from the packed shards at `root` (nothing to verify: checked when packed)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    data = (["data.format=shards", f"data.root={root}"] if verify == "shards" else
            ["data.format=imagefolder", f"data.root={root}", f"data.verify_images={verify}"])
    return launcher + ["-m", "trainer", "train", "-", *data, "data.image_size=32", "data.num_workers=2",
                       "model.name=small_cnn", "train.batch_size=64", "train.log_every_steps=1", "train.epochs=1",
                       "train.progress_bar=false", "checkpoint.every_epochs=0", f"run.dir={run_dir}"]


def _kill_tree(proc: subprocess.Popen) -> None:
    """The launched processes first (under strace, strace then writes its summary and leaves), then the rest."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:  # it has ended already
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _peak_rss_mib(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024


def first_step(root: Path, tmp: Path, processes: int, verify: str, prefix=(), timeout: float = 3600) -> dict:
    """Launch, wait for the first metrics row, take the memory readings, kill the tree. `tmp` is a
    tempfile.mkdtemp folder of main's, this measurement's alone: its run, log and scan cache are written there
    directly, and the run of the previous start is removed (the cache kept: a restart's)."""
    run_dir = tmp / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": PYTHONPATH,
           "TRAINER_CACHE_DIR": str(tmp / "cache")}  # this measurement's own: empty at its first start
    log = open(tmp / "launch.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen([*prefix, *train_command(root, run_dir, processes, verify)], cwd=tmp, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    try:
        while not (metrics.is_file() and '"train"' in metrics.read_text()):
            if proc.poll() is not None:
                errors = [line for line in (tmp / "launch.log").read_text().splitlines() if "error:" in line]
                raise RuntimeError(f"the run ended before its first step: {(errors or ['(see its log)'])[0]}")
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"no first step within {timeout} s")
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        ranks, workers = [], []
        for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            try:
                cmd = " ".join(p.cmdline())
                parent = " ".join(p.parent().cmdline()) if p.parent() else ""
            except psutil.Error:
                continue
            if "trainer" in cmd and "train" in cmd and "torch.distributed.run" not in cmd and "strace" not in cmd:
                # a DataLoader worker is a fork of a rank: the same command line as its parent
                (workers if cmd == parent else ranks).append(_peak_rss_mib(p.pid))
    finally:
        _kill_tree(proc)
        log.close()
    return {"seconds": seconds, "rank_peak_rss_mib": max(ranks) if ranks else None,
            "worker_peak_rss_mib": max(workers) if workers else None}


def file_calls(root: Path, tmp: Path, processes: int, verify: str) -> dict:
    """System calls on files (open, stat, directory listing, ...) up to the first step, per rank."""
    out = tmp / "strace.txt"
    first_step(root, tmp, processes, verify, prefix=["strace", "-f", "-c", "-o", str(out), "-e", f"trace={FILE_CALLS}"])
    counts = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in FILE_CALLS.split(",") and parts[3].isdigit():
            counts[parts[-1]] = int(parts[3])
    return {"per_rank": sum(counts.values()) / processes, "by_call": counts}


def worker_memory(root: Path) -> dict:
    """Unique memory of each of 2 DataLoader workers after every sample's path and label were read once."""
    import torch

    from trainer.config import load_config
    from trainer.data import build_data

    cfg = load_config(None, ["data.format=imagefolder", f"data.root={root}", "data.verify_images=false",
                             "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"])
    dataset = build_data(cfg.data, 0, ("train",), log=lambda *_: None).datasets["train"]

    class Touch(torch.utils.data.Dataset):  # what a worker reads per sample, without decoding the file
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return len(dataset.paths[i]) + int(dataset.labels[i])

    me = psutil.Process()
    base = me.memory_full_info().uss / 2**20
    loader = torch.utils.data.DataLoader(Touch(), batch_size=4096, num_workers=2, persistent_workers=True)
    for _ in loader:
        pass
    uss = [c.memory_full_info().uss / 2**20 for c in me.children()]
    del loader
    return {"samples": len(dataset), "main_uss_mib": base, "worker_uss_mib": max(uss) if uss else None}


READ_PASS = """
import json, sys, time
import numpy as np, torch
from trainer.config import load_config
from trainer.data import build_data
from trainer.data.coco import collate_detection, detection_eval_transform
from trainer.data.masks import collate_masks
kind, fmt, root, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
extra = ["data.verify_images=off"] if fmt == "imagefolder" else []
cfg = load_config(None, [f"data.format={fmt}", f"data.root={root}", "data.mean=[0.5,0.5,0.5]",
                         "data.std=[0.25,0.25,0.25]", *extra])
collate = {"classes": None, "masks": collate_masks, "coco": collate_detection}[kind]
ds = build_data(cfg.data, 0, ("train",), log=lambda *_: None).datasets["train"]
# decoded, not augmented (a detection dataset always has a transform: its eval one, the image as floats)
ds.transform = detection_eval_transform() if kind == "coco" else None
order = np.random.default_rng(0).permutation(len(ds))[:n].tolist()  # a shuffled epoch's order
loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size=256, num_workers=2,
                                     collate_fn=collate)
start = time.perf_counter()
images = sum(len(y) for _, y in loader) if n else 0
print(json.dumps({"seconds": time.perf_counter() - start, "images": images}))
"""

# data.format of each kind of folder `trainer pack` packs (its shards are data.format=shards)
FOLDER_FORMAT = {"classes": "imagefolder", "masks": "masks", "coco": "coco"}


def read_pass(kind: str, fmt: str, root: Path, n: int, prefix=()) -> dict:
    """Decode `n` training images (and their masks or boxes) of a `kind` folder in a shuffled order through a
    DataLoader with 2 workers (no augmentation), from the folder (fmt its format) or from its shards (fmt
    "shards"), in a fresh process (the page cache warm: both were read before)."""
    res = subprocess.run([*prefix, sys.executable, "-c", READ_PASS, kind, fmt, str(root), str(n)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH})
    if res.returncode != 0:
        raise SystemExit(f"error: the read pass failed: {res.stderr.strip()[-500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def opens_per_pass(kind: str, fmt: str, root: Path, n: int, tmp: Path) -> int:
    """openat calls of a read pass of `n` images, minus those of the same process reading none (the imports,
    the start): the file opens the reading itself costs."""
    counts = []
    for images in (n, 0):
        out = tmp / f"opens-{fmt}-{images}.txt"
        read_pass(kind, fmt, root, images, prefix=["strace", "-f", "-c", "-o", str(out), "-e", "trace=openat,open"])
        counts.append(sum(int(line.split()[3]) for line in out.read_text().splitlines()
                          if line.split()[-1:] in (["openat"], ["open"]) and line.split()[3].isdigit()))
    return counts[0] - counts[1]


def compare_reads(root: Path, packed: Path, n: int, repeats: int, strace: bool, tmp: Path, kind: str = "classes"
                  ) -> dict:
    """Folder against shards side by side: median images/s of `repeats` alternating passes, and opens. Keyed
    by data.format: the folder's (FOLDER_FORMAT) and "shards"."""
    sides = ((FOLDER_FORMAT[kind], root), ("shards", packed))
    for fmt, where in sides:  # warm the page cache for both
        read_pass(kind, fmt, where, n)
    speeds: dict = {fmt: [] for fmt, _ in sides}
    for _ in range(repeats):
        for fmt, where in sides:
            r = read_pass(kind, fmt, where, n)
            speeds[fmt].append(r["images"] / r["seconds"])
    out = {fmt: {"images_per_s": float(np.median(v)), "runs": v} for fmt, v in speeds.items()}
    out["ratio_shards_over_folder"] = out["shards"]["images_per_s"] / out[FOLDER_FORMAT[kind]]["images_per_s"]
    if strace:
        for fmt, where in sides:
            out[fmt]["opens"] = opens_per_pass(kind, fmt, where, n, tmp)
    return out


PACK_READ_HEADER = ("| pack (s) | shards | MiB | images read | folder img/s | shards img/s | shards / folder | "
                    "opens, folder | opens, shards |")


def pack_read_cells(pack: dict, reads: dict, folder_format: str, images: int) -> str:
    """The PACK_READ_HEADER cells of a table row: make_shards' and compare_reads' results."""
    folder, shards = reads[folder_format], reads["shards"]
    return (f"| {pack['pack_seconds']:.1f} | {pack['shards']} | {pack['mib']:.0f} | {images:,} | "
            f"{folder['images_per_s']:.0f} | {shards['images_per_s']:.0f} | {reads['ratio_shards_over_folder']:.2f} | "
            f"{folder.get('opens', '')} | {shards.get('opens', '')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", help="files per folder (default 10000,100000,1000000; --smoke: 200,400)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "data-scale"))
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--verify", default="true,false", help="data.verify_images values to measure (true = full decode, "
                    "false = none; since issue 15 also header, full, off)")
    ap.add_argument("--strace", action="store_true", help="also count file-system calls (a separate, slower run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--label", default="", help="a name for this measurement in the output files (before/after)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 process")
    ap.add_argument("--shards", action="store_true", help="also pack each folder (trainer pack), measure starts "
                    "from the shards, and compare reading an epoch's images from the folder and from the shards")
    ap.add_argument("--read-images", type=int, default=20000, help="images per read pass (--shards)")
    ap.add_argument("--repeats", type=int, default=3, help="read passes per format (--shards; the median is kept)")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.processes = args.sizes or "200,400", "1"
    args.sizes = args.sizes or "10000,100000,1000000"
    sizes = [int(s) for s in args.sizes.split(",")]
    procs = [int(p) for p in args.processes.split(",")]
    modes = args.verify.split(",")
    if args.strace and not shutil.which("strace"):
        raise SystemExit("error: --strace needs strace installed")
    name = "data-scale" + ("-smoke" if args.smoke else "") + (f"-{args.label}" if args.label else "")
    check_results(args.out, result_files(name))
    work = Path(args.work)
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        root = make_folder(work / f"imgs-{n}", n)
        print(f"[data_scale] {n} files ready in {time.perf_counter() - t0:.1f} s: {root}", flush=True)
        row = {"files": n, "worker_memory": worker_memory(root)}
        print(f"[data_scale] {n}: worker memory {row['worker_memory']}", flush=True)
        if args.shards:
            packed = work / f"shards-{n}"
            row["pack"] = make_shards(root, packed)
            print(f"[data_scale] {n}: packed {row['pack']}", flush=True)
            tmp = Path(tempfile.mkdtemp(prefix="reads-", dir=work))  # strace's counts; removed below
            row["reads"] = compare_reads(root, packed, min(n, args.read_images), args.repeats, args.strace, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"[data_scale] {n}: reads {row['reads']}", flush=True)
        for p in procs:
            for verify in modes + (["shards"] if args.shards else []):
                where = work / f"shards-{n}" if verify == "shards" else root
                tmp = Path(tempfile.mkdtemp(prefix="ds-", dir=work))
                key = f"p{p}_verify_{verify}"
                try:
                    first = first_step(where, tmp, p, verify)
                    row[key] = {**first_step(where, tmp, p, verify), "first_start_seconds": first["seconds"]}
                    if args.strace:
                        row[key]["file_calls"] = file_calls(where, tmp, p, verify)
                except RuntimeError as err:  # a start that failed (e.g. a rank timing out while another scans)
                    row.setdefault(key, {})["error"] = str(err).strip().splitlines()[-1][:300]
                    print(f"[data_scale] {n} files, {p} process(es), data.verify_images={verify}: FAILED: "
                          f"{row[key]['error']} (log: {tmp / 'launch.log'})", flush=True)
                    continue
                shutil.rmtree(tmp, ignore_errors=True)
                print(f"[data_scale] {n} files, {p} process(es), data.verify_images={verify}: {row[key]}", flush=True)
        rows.append(row)
    result = {"label": args.label, "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                               "platform": platform.platform()},
              "settings": {"sizes": sizes, "processes": procs, "verify": modes, "smoke": args.smoke}, "rows": rows}
    lines = ["| files | processes | data.verify_images | first start -> first step (s) | restart -> first step (s) | "
             "rank peak RSS (MiB) | worker peak RSS (MiB) | file calls per rank (restart) | worker USS after a pass (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for p in procs:
            for verify in modes + (["shards"] if args.shards else []):
                r = row[f"p{p}_verify_{verify}"]
                if "seconds" not in r:
                    lines.append(f"| {row['files']:,} | {p} | {verify} | failed: {r.get('error', '')[:120]} |||||")
                    continue
                calls = r.get("file_calls", {}).get("per_rank")
                lines.append(f"| {row['files']:,} | {p} | {verify} | {r['first_start_seconds']:.1f} | {r['seconds']:.1f} | "
                             f"{r['rank_peak_rss_mib']:.0f} | "
                             f"{(r['worker_peak_rss_mib'] or float('nan')):.0f} | "
                             f"{'' if calls is None else f'{calls:,.0f}'} | {row['worker_memory']['worker_uss_mib']:.1f} |")
    if args.shards:
        lines += ["", "| files " + PACK_READ_HEADER, "|---" * 10 + "|"]
        for row in rows:
            lines.append(f"| {row['files']:,} " + pack_read_cells(row["pack"], row["reads"], "imagefolder",
                                                                  min(row["files"], args.read_images)))
    write_results(args.out, name, result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
