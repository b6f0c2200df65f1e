"""What train.py, sample.py and extract_latents.py share: process-group setup under torchrun
(or a world of one under plain `python`), seeds that do not depend on the world size, and writing
files so that a crash never leaves a half-written file under the final name, and a full disk is
named as such."""
import errno
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs). A plain `python` launch gets a
    process group of one too, built in-process without a rendezvous, so FSDP2, DCP and collectives
    run the same code path. Multi-node safe: the GPU is picked by LOCAL_RANK."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ:
            # torchrun's env:// store, with every key under this restart's own prefix: torchrun (c10d
            # rendezvous) keeps one TCP store across worker restarts, and without the prefix restarted
            # workers can read the dead round's peer addresses ("Gloo connectFullMesh failed ...
            # Connection refused"), which made `--max-restarts` recover only some of the time.
            store, _, _ = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(rank, world_size, local_rank, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def seed_for(*keys):
    """A 64-bit seed for the random stream named by integers, e.g. (seed, stream, step): any two key
    tuples give independent streams (numpy's SeedSequence hashing), whatever rank asks."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


# Below this many free bytes a file system counts as full. A write fails when the next block cannot
# be allocated, so at that moment a little space is usually still free (part of a block, space held
# back for metadata); and a disk this close to full could not take the next file anyway.
DISK_FULL_MARGIN = 1 << 20


class DiskFullError(OSError):
    """A write failed because its file system is full; str() is one line naming the file."""

    def __str__(self):
        return self.strerror or super().__str__()


def disk_full(path) -> bool:
    """Whether the file system holding `path` (or its nearest existing parent) has (almost) no space
    left for us: f_bavail, the blocks a process without root's reserve may use, below DISK_FULL_MARGIN."""
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < DISK_FULL_MARGIN


def atomic_write(path, write):
    """Call `write(f)` on a binary file object opened on a temporary name beside `path`, then
    rename it to `path`. A reader (or a resumed run) sees the whole file or no file.

    Any failure on a full disk is a DiskFullError: the writers do not say so themselves (numpy's short
    write raises OSError without an errno, torch.save a RuntimeError)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        # Asked while the temp file still holds its space: removing it would make the disk look free.
        if getattr(e, "errno", None) == errno.ENOSPC or disk_full(tmp):
            raise DiskFullError(errno.ENOSPC, f"disk full while writing {path}") from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_dead_temps(directory):
    """Remove the temp files atomic_write left in `directory` ({path}.tmp.{pid}) whose writer no
    longer runs: what a killed process leaves behind. A live writer's are left alone. Returns the
    names removed."""
    removed = []
    for name in sorted(os.listdir(directory)):
        _, tag, pid = name.rpartition(".tmp.")
        if tag and pid.isdigit() and int(pid) > 0 and not _running(int(pid)):
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


def _running(pid):
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True
