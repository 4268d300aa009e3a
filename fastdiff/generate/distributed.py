"""``fastdiff generate`` across processes: joining torchrun's process group, the collectives the job needs, and
starting N local workers without torchrun (``fastdiff generate --nproc N``) through PyTorch's elastic launcher.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/MASTER_PORT set) each process joins a process group — NCCL
on GPUs (rank r uses cuda:LOCAL_RANK), gloo on the CPU — unless one is already initialised, in which case it is used
and left alone. :func:`launch` starts the same workers itself with ``torch.distributed.launcher.api.elastic_launch``
(a local rendezvous, no restarts, its log folder a temporary one removed afterwards) and returns each rank's
result.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fastdiff import hub


@dataclass
class Ranks:
    """This process's rank in the job and the collectives the job uses (no-ops for a single process)."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # this call initialised the process group (and destroys it at the end)
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def sum(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def gather_objects(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def gather(self, values: list[float]) -> list[list[float]]:
        if self.world == 1:
            return [values]
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(out, t)
        return [o.tolist() for o in out]


def resolve_device(device) -> torch.device:
    """The device this rank samples on: ``device`` (default cuda if present, else cpu); under torchrun a bare
    "cuda" means cuda:LOCAL_RANK."""
    dev = hub.resolve_device(None if device is None else str(device))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: torch.device) -> Ranks:
    """Join the torchrun process group (NCCL for CUDA, gloo for CPU), or use the one already initialised."""
    import torch.distributed as dist

    comm = device if device.type == "cuda" else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
        comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return Ranks(dist.get_rank(), dist.get_world_size(), False, comm)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return Ranks(dist.get_rank(), dist.get_world_size(), True, comm)


def launch(nproc: int, fn: Callable[..., Any], *args) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` local worker processes that form one gloo/NCCL job, as torchrun would, through
    PyTorch's elastic launcher; returns {rank: fn's return value}. ``fn`` must be a module-level function (the
    workers are started with the spawn method). A worker that fails raises the launcher's ChildFailedError here
    (its message carries the worker's traceback).

    The launcher's log folder (the workers' error files; their output goes to this process's stdout and stderr) is
    a temporary folder removed when the launch ends, however it ends: left to itself the launcher makes a
    ``torchelastic_*`` folder in the temp dir for every launch and never removes it.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    log_dir = tempfile.mkdtemp(prefix="fastdiff-launch-")
    try:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                              run_id=f"fastdiff-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1, start_method="spawn",
                              logs_specs=DefaultLogsSpecs(log_dir=log_dir))
        return elastic_launch(config, fn)(*args)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
