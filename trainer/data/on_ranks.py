"""Building the data of a run on several processes: one scans, all share the start-up checks of the files.

Why: checking a million files (data.verify_images) on one rank while the others wait costs the whole check,
and a full decode of 100 k files on one rank out-waited the 300 s start-up collective timeout here
(BENCHMARKS.md, data at scale). Steps, each ended by one collective that every rank reaches (`agree`), so a
failure anywhere is the same error everywhere, never a hang:
1. the main rank scans the folder (or reads the cached scan) and caches it; then the others read that cache
   (with data.cache_dir=off each scans for itself: the same sorted lists);
2. the main rank says which sample lists still need a check, and how;
3. each rank checks its contiguous share of each list (shard_bounds) and the bad files found are gathered to
   every rank (a few paths and reasons, not the lists);
4. every rank records the results in its manifest, the main rank caches them, and every rank builds its
   datasets from them without reading any file again.
"""
from __future__ import annotations

from typing import Dict, Sequence

from trainer.data import Data, build_data, scan_files, save_scan, unchecked
from trainer.data.folders import find_bad_images
from trainer.distributed import agree, main_first, shard_bounds
from trainer.targets import data_targets


def build_data_on_ranks(acc, data_cfg, seed: int, splits: Sequence[str], log) -> Data:
    """build_data on every rank of `acc`, the file checks split across them (image folders; any other source
    is built by the main rank first, then by the others: it may write the generated dataset)."""
    if (acc.num_processes == 1 or data_cfg.format != "imagefolder" or "all" in splits
            or data_targets(data_cfg) != "labels"):  # a CSV folder given as an image folder: multilabel's builder
        return main_first(acc, lambda: build_data(data_cfg, seed, splits, log=log))
    scan = main_first(acc, lambda: scan_files(data_cfg, splits, log))
    todo = agree(acc, lambda: unchecked(scan, data_cfg, splits), main_only=True, share=True)
    if todo:
        def check_my_share() -> Dict[str, Dict[str, str]]:
            found = {}
            for split, full in todo:
                samples = scan.found[split]
                mine = shard_bounds(len(samples), acc.process_index, acc.num_processes)
                found[split] = find_bad_images(samples[mine.start:mine.stop], full)
            return found

        shares = agree(acc, check_my_share, gather=True)
        for split, full in todo:
            bad = {path: why for share in shares for path, why in share[split].items()}
            scan.manifest.record(scan.found[split], full, bad)
        agree(acc, lambda: save_scan(scan, log), main_only=True)
    return agree(acc, lambda: build_data(data_cfg, seed, splits, log=log, scan=scan))
