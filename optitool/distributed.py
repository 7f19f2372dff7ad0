"""Runs spread over processes with torchrun (torch.distributed): a pass that trains on several processes says
so with `Pass.processes()`; `optitool run` then starts itself again under torchrun with that many, unless it
already runs under it. Every rank runs the pipeline (the same seed gives the same stages); rank 0 writes the
run folder, the others work in a temporary folder that is removed, without benchmark or budget."""

from __future__ import annotations

import os
import sys


def torchrun_world() -> tuple[int, int]:
    """(rank, world size) of this process as torchrun set them; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def relaunch(processes: int, cli_args: list[str]) -> int:
    """Run `optitool <cli_args>` under torchrun with `processes` processes on this machine; its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "optitool.cli", *cli_args]
    # torch's C++ warnings (DDP's notes on unused parameters) write to the terminal past run.log
    env = {"TORCH_CPP_LOG_LEVEL": "ERROR", **os.environ}
    from optitool.children import run_child

    return run_child(command, env=env, quiet_when_stopped=True)  # on SIGTERM/Ctrl-C torchrun and every rank stop before this returns
