"""One worker per GPU over a shared task list, with per-worker part logs (ARCHITECTURE.md §5, §6).

`run_workers(fn, tasks, gpu_ids, part_log, payload)` calls `fn(rank, gpu_id, tasks, writer, payload)`
in this process when there is at most one GPU (or none: the CPU), and in one spawned process per
GPU otherwise. Each worker gets a contiguous slice of the tasks still to do and appends finished
records to its own part file; the caller then assembles the output in input order, so the result
does not depend on how many GPUs ran it or how often it was interrupted.
`fn` must be a module-level function (spawned processes import it by name).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from .errors import InputError
from .io import PartLog

log = logging.getLogger(__name__)


def split_evenly(items: Sequence, n: int) -> list[list]:
    """n contiguous slices whose sizes differ by at most one."""
    base, extra = divmod(len(items), n)
    out, start = [], 0
    for r in range(n):
        end = start + base + (1 if r < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def _spawned(rank: int, fn: Callable, slices: list[list], gpu_ids: list[int], part_log: PartLog, payload) -> None:
    import torch

    from .console import set_quiet_env

    set_quiet_env()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [gpu{gpu_ids[rank]}] %(levelname)s %(message)s")
    torch.cuda.set_device(gpu_ids[rank])
    fn(rank, gpu_ids[rank], slices[rank], part_log.writer(rank), payload)


def run_workers(fn: Callable, tasks: Sequence, gpu_ids: list[int], part_log: PartLog, payload=None) -> None:
    """Run `fn` over `tasks` on each GPU in `gpu_ids` (or once on the CPU when it is empty)."""
    if not tasks:
        return
    if len(gpu_ids) <= 1:
        try:
            fn(0, gpu_ids[0] if gpu_ids else None, list(tasks), part_log.writer(0), payload)
        except InputError:  # found by the worker (a model refused at load): leave no empty partial work behind
            if not part_log.done():
                part_log.remove()
            raise
        return
    import torch.multiprocessing as mp

    slices = split_evenly(tasks, len(gpu_ids))
    log.info("splitting %d tasks over GPUs %s", len(tasks), gpu_ids)
    mp.start_processes(_spawned, args=(fn, slices, gpu_ids, part_log, payload), nprocs=len(gpu_ids),
                       join=True, start_method="spawn")
