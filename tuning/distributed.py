"""Training over several processes: data parallel workers that train one adapter together.

Run a job under torchrun (it ships with torch); it sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT, which is all this module reads:

    torchrun --nproc-per-node 2 app.py train --as ADMIN [--set epochs=1]          # 2 CPU processes
    torchrun --nproc-per-node 2 -m tuning.train --data-dir data --as ADMIN ...    # the same job
    accelerate launch --multi_gpu --num_processes 4 app.py train --as ADMIN       # GPUs: torchrun underneath

(``accelerate launch --cpu --num_processes N`` starts one process unless given an MPI
hostfile: on CPUs use torchrun.)

Why the launchers and not an ``app.py train --processes N`` that re-launches itself: they
already own the ports, several machines (``--nnodes``), restarts and killing the whole group
when one worker dies; a wrapper would copy their options and add a parent process that is
not the one the job row records. With WORLD_SIZE unset (or 1) nothing here does anything.

Who does what. Rank 0, the leader, is the job as one process runs it: it checks who asks,
takes the job row, builds the pairs, and then sends the work (pairs, settings, base model,
parent adapter) to the other ranks (``send``); they load the same model and train with it
(``tuning.trainer.follow``). Only the leader writes progress, saves the adapter, runs the gate
and registers the version; the others exit after the last step. Every rank cuts the same
shuffled batches from the seed (``tuning.dpo.optimise``), computes the loss of its share of
each global batch (``split``), weighted by its share, and the gradients are summed across
ranks (``sum_gradients``), so all ranks take the same step from the same gradient. The
leader alone asks whether to stop, and its answer is broadcast (``agree``): every rank stops
at the same step, none is left waiting.

What is exact. A DPO step's loss is a mean over pairs (the DPO term and the per-pair NLL
term), an SFT step's a mean over answer tokens: weighted by its share of pairs (tokens), the
ranks' gradients add up to the one-process gradient of the same batch; what differs is
floating-point rounding (other matmul shapes, another summation order), about 1e-7
relative per step, which AdamW can amplify where a gradient element is near zero (its first
steps move each weight by about the learning rate, whatever the gradient's size). The test
(tests/test_distributed.py) bounds the difference between the adapters of one and two
processes. A KTO step is weighted by votes and its NLL term by up-votes (``tuning.kto.
train_kto``), but is not exact: its reference point z0 (no gradient) is estimated from each
rank's share of the batch, as TRL's KTOTrainer does per device.

On GPUs: ``torchrun --nproc-per-node <gpus>``; the group then uses NCCL and each rank its
own device (``device``); see docs/architecture.md "Training over several processes".
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

# torch is imported inside each function: tuning.train reads the launcher's environment
# before torch loads (a refused job answers in a moment, and the CPU priority is set before
# torch starts its threads).

# How long a rank waits in a collective (the first one waits for the leader to build the
# pairs, minutes on a big store). A rank that dies closes its sockets and the others fail at
# once; torchrun also ends the group when one worker exits with an error, so this bounds
# only a rank that freezes.
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1


def launched() -> World:
    """The ranks a launcher (torchrun, accelerate launch) set in the environment."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def current() -> World:
    """This process's place in the process group; one process when there is none."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), launched().local_rank)
    return World()


def start() -> World:
    """Join the process group the launcher set up (gloo on CPU, NCCL when there is a GPU);
    nothing without a launcher. Safe to call again."""
    import torch

    world = launched()
    if world.several and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank)
            torch.distributed.init_process_group("nccl", timeout=TIMEOUT)
        else:
            torch.distributed.init_process_group("gloo", timeout=TIMEOUT)
    return current()


def finish() -> None:
    """Leave the process group (closing its sockets: a rank still waiting fails at once)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    """Where this rank's collectives run: its GPU under NCCL, else the CPU."""
    import torch

    if (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_backend() == "nccl"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- what every rank does at each step ----------------------------------------------------


def split(indices: list, world: World) -> list:
    """This rank's share of a global batch: a contiguous slice, the first ranks one item more
    when it does not divide (10 items on 4 ranks: 3, 3, 2, 2); possibly empty."""
    per, extra = divmod(len(indices), world.size)
    start = world.rank * per + min(world.rank, extra)
    return indices[start : start + per + (1 if world.rank < extra else 0)]


def agree(flag: bool) -> bool:
    """The leader's ``flag``, on every rank (whatever the others pass)."""
    import torch

    if not current().several:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device())
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def same_start(params: list[torch.Tensor]) -> None:
    """Every rank starts from the leader's trainable weights (the seed makes them equal
    already; this makes sure, e.g. after a library drew random numbers differently)."""
    import torch

    if not current().several:
        return
    with torch.no_grad():
        for p in params:
            t = p.data.to(device())
            torch.distributed.broadcast(t, src=0)
            p.data.copy_(t)


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Each parameter's gradient becomes the sum of the ranks' (one flat all-reduce); a rank
    with no share of the batch contributes zeros."""
    import torch

    if not current().several:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(device())
    torch.distributed.all_reduce(flat)
    flat = flat.to(params[0].device)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def combine(weight: float, stats: dict | None) -> dict:
    """The step's figures over the whole batch: each numeric figure the weighted mean of the
    ranks' (``weight``: a rank's share; a rank with no share passes 0 and None). Exact for
    figures that are means over the weighing unit (a DPO step's loss, reward accuracy,
    margins); the same on every rank."""
    import torch

    if not current().several:
        return dict(stats or {})
    gathered: list = [None] * current().size
    torch.distributed.all_gather_object(gathered, (weight, stats))
    out: dict = {}
    for key in next(s for w, s in gathered if s is not None):
        values = [(w, s[key]) for w, s in gathered if s is not None and s.get(key) is not None]
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for _, v in values):
            total = sum(w for w, _ in values)
            out[key] = sum(w * v for w, v in values) / total if total else values[0][1]
        else:
            out[key] = values[0][1] if values else None
    return out


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over the ranks (``t`` itself with one process)."""
    import torch

    if not current().several:
        return t
    out = t.to(device())
    torch.distributed.all_reduce(out)
    return out.to(t.device)


# -- the work the leader hands out ---------------------------------------------------------


_sent = False  # whether this leader has handed out its one message (``send``, ``release``)


def send(work: dict | None) -> None:
    """The leader: hand ``work`` to the other ranks, or None (nothing to train: they exit).
    Once per process group: the others wait for exactly one message."""
    import torch

    global _sent
    if current().several and not _sent:
        _sent = True
        torch.distributed.broadcast_object_list([work], src=0, device=device())


def release() -> None:
    """The leader, whatever happened (a refusal, no data, an error before training): the
    other ranks are told there is nothing to train unless they already have their work."""
    send(None)


def receive() -> dict | None:
    """The other ranks: wait for the leader's work (None: nothing to train)."""
    import torch

    box: list = [None]
    torch.distributed.broadcast_object_list(box, src=0, device=device())
    return box[0]
