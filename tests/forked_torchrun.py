"""`torchrun TORCHRUN_ARGS SCRIPT ARGS` (or `torchrun TORCHRUN_ARGS -m trainer ARGS`) for the tests: torchrun's
own argument parser, configuration and elastic agent, with the ranks forked from this process instead of
started as fresh interpreters.

Why: each rank of a two-process test run otherwise spends ~5 s of this 2-core machine on imports, both at once.
Run from tests/cli_zygote.py's server (a fork of a process that imported the trainer), the ranks are forks of
forks and start at once. What a rank sees is what torchrun gives it: the same environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_*), the same c10d rendezvous, the same agent that stops the other
ranks when one fails; only torchrun's start method for a function entry point (fork) replaces its subprocess
for a script. Like torchrun, it exits 1 when a rank failed, printing the agent's report.
"""
from __future__ import annotations

import runpy
import sys

import torch.distributed.run as torchrun
from torch.distributed.launcher.api import elastic_launch


def rank_main(script: str, module: bool, argv: list) -> None:
    """One rank: `python SCRIPT ARGV` or `python -m trainer ARGV`, in the forked process."""
    if module:
        import trainer

        sys.argv = [f"{trainer.__path__[0]}/__main__.py", *argv]
        from trainer.cli import main

        main(argv)
    else:
        sys.argv = [script, *argv]
        runpy.run_path(script, run_name="__main__")


def main() -> None:
    args = torchrun.parse_args(sys.argv[1:])
    if args.module and args.training_script != "trainer":
        raise SystemExit(f"forked_torchrun.py runs `-m trainer` or a script, not -m {args.training_script}")
    entry = (args.training_script, args.module, list(args.training_script_args))

    def forked_launch(config, entrypoint):
        """torchrun's launch as torchrun configured it (--standalone's rendezvous included), with this entry
        point: a function, whose processes torchrun forks."""
        config.start_method = "fork"
        return lambda *_: elastic_launch(config, rank_main)(*entry)

    torchrun.elastic_launch = forked_launch
    torchrun.main(sys.argv[1:])  # a failed rank: ChildFailedError's report, exit 1, as from torchrun


if __name__ == "__main__":
    main()
