"""Many processes, one run: process groups, how a model is spread over them, and the collectives the loop needs.

`torchrun` starts one process per device and tells each who it is in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (multi-node: the same, with a rendezvous endpoint). `init` reads them: without them (plain `python`,
`torchrun --nproc-per-node 1`) nothing is initialised and every function here is the single-process no-op, so a run
on one process is bit for bit what it was before. With them: NCCL for CUDA tensors, gloo for CPU ones, chosen
automatically; process `LOCAL_RANK` owns `cuda:LOCAL_RANK`. Only rank 0 prints, shows progress and writes files.

`Parallel` spreads a model over the processes, from outside the model (torchtitan's rule):

* `dp`: `DistributedDataParallel`, every process a full replica; gradients averaged in buckets during backward.
* `fsdp`: FSDP2 `fully_shard` per block, then the whole model: parameters, gradients and AdamW's moments sharded
  across all processes, gathered one block at a time for forward and backward.
* `expert_parallel = k` (either mode): each group of k consecutive ranks splits every MoE layer's routed experts k
  ways (`Experts.shard`); tokens reach their expert's rank and come back with `all_to_all`. The gate, the shared
  experts and attention stay replicated (dp) or sharded (fsdp). Experts are replicated across the world / k groups.

Each process's loss is the mean over its share of the global batch, so the gradient of the global mean is the mean
of the processes' gradients: DDP and FSDP average; a routed expert's gradient arrives summed over every rank whose
tokens it served (the all_to_all's backward), so it is summed over its replicas and divided by the world size.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .errors import TrainError
from .model.moe import Experts


# ---- processes ------------------------------------------------------------------------------------------------------
def init(device: str = "auto") -> torch.device:
    """Join the process group torchrun describes (if any) and return this process's device. Idempotent."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        if want_cuda:
            torch.cuda.set_device(local_rank())
        # CPU tensors (counts, metrics) always travel by gloo; CUDA ones by NCCL
        dist.init_process_group("cpu:gloo,cuda:nccl" if want_cuda else "gloo")
        atexit.register(shutdown)
        if dist.get_rank() != 0:  # one voice: the others' stdout goes nowhere (their errors still reach stderr)
            sys.stdout = open(os.devnull, "w")
    if want_cuda:
        return torch.device("cuda", local_rank()) if world() > 1 else torch.device("cuda")
    return torch.device(device if device != "auto" else "cpu")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """The sum over processes (a new tensor; the input itself when there is one process)."""
    if world() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / world() if world() > 1 else t


def mean_metrics(metrics: dict) -> dict:
    """The mean over processes of each float metric (over the processes that logged it), in rank 0's key order."""
    if world() == 1:
        return metrics
    everyone = [None] * world()
    dist.all_gather_object(everyone, metrics)
    keys = list(everyone[0]) + [k for m in everyone[1:] for k in m if k not in everyone[0]]
    return {k: sum(m[k] for m in everyone if k in m) / sum(k in m for m in everyone) for k in keys}


def any_true(flag: bool) -> bool:
    """True if `flag` is true on any process."""
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def share(n: int, what: str) -> int:
    """This process's part of n things split evenly over the processes; `what` names the setting if it cannot be."""
    if n % world():
        raise TrainError(f"'{what}' = {n}: must be divisible by the number of processes ({world()})")
    return n // world()


@contextlib.contextmanager
def full_weights(model: nn.Module):
    """Inside: an FSDP-sharded model holds its full parameters, so forwards run without collectives and may differ
    between processes (rollouts of different lengths). Entering and leaving are collective. No-op otherwise."""
    from torch.distributed.fsdp import FSDPModule
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


# ---- spreading a model ---------------------------------------------------------------------------------------------
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def expert_names(model: nn.Module) -> dict[str, Experts]:
    """Name of each routed-expert weight (as in `model.state_dict()`) -> its Experts module."""
    return {f"{name}.{w}": m for name, m in model.named_modules() if isinstance(m, Experts) for w in EXPERT_WEIGHTS}


class Parallel:
    """How a model and its training step are spread over the processes (see the module docstring). With one
    process every method is the single-process behaviour."""

    def __init__(self, mode: str = "dp", expert_parallel: int = 1):
        self.mode, self.ep, self.world = mode, expert_parallel, world()
        if self.world % self.ep:
            raise TrainError(f"'expert_parallel' = {self.ep}: must divide the number of processes ({self.world})")
        self.mesh = self.ep_group = self.replica_group = None
        self.experts: dict[str, Experts] = {}
        if self.ep > 1:
            from torch.distributed.device_mesh import init_device_mesh
            device = "cuda" if torch.cuda.is_available() and dist.get_backend() != "gloo" else "cpu"
            self.mesh = init_device_mesh(device, (self.world // self.ep, self.ep), mesh_dim_names=("replica", "ep"))
            self.ep_group, self.replica_group = self.mesh.get_group("ep"), self.mesh.get_group("replica")

    @property
    def active(self) -> bool:
        return self.world > 1

    def wrap(self, model: nn.Module, unused_parameters: bool = True) -> nn.Module:
        """Shard the experts (EP), then wrap (DDP) or shard (FSDP) the rest, in place where possible. Returns the
        module to call for training steps; `model` keeps naming the underlying one. Before the optimizer is made.
        `unused_parameters`: some parameters may get no gradient in a step (DDP then looks for them)."""
        if not self.active:
            return model
        from .model import Transformer
        if self.ep > 1:
            experts = {n: m for n, m in expert_names(model).items()}
            if not experts:
                raise TrainError(f"'expert_parallel' = {self.ep}: the model has no routed experts to split")
            n = next(iter(experts.values())).n_experts
            if n % self.ep:
                raise TrainError(f"'expert_parallel' = {self.ep}: must divide n_routed_experts ({n})")
            for m in set(experts.values()):
                m.shard(self.ep_group)
            self.experts = experts
        expert_params = {getattr(m, name.rpartition(".")[2]) for name, m in self.experts.items()}
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard
            if not isinstance(model, Transformer):
                raise TrainError("'parallel' = 'fsdp': sharding is implemented for nanoseek (DeepseekV3) models; "
                                 "use parallel dp for other models")
            for block in [*model.layers, *model.mtp]:
                fully_shard(block, ignored_params=expert_params or None)
            fully_shard(model, ignored_params=expert_params or None)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.experts:
            DDP._set_params_and_buffers_to_ignore_for_model(model, list(self.experts))
        device = next(model.parameters()).device
        # unused parameters (the MTP module when it is off, in GRPO) keep no gradient, as on one process; buffers
        # (the gate biases) are kept equal by the loop, so they are not broadcast every forward
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   forward_sync_buffers=False, find_unused_parameters=unused_parameters)

    @contextlib.contextmanager
    def accumulating(self, forward_model: nn.Module, last: bool):
        """Around one micro-batch's forward and backward: gradients are reduced only with the last one."""
        if not self.active:
            yield
        elif self.mode == "fsdp":
            forward_model.set_requires_gradient_sync(last)
            yield
        else:
            with contextlib.nullcontext() if last else forward_model.no_sync():
                yield

    def finish_gradients(self) -> None:
        """After backward: routed experts' gradients summed over their replicas, then divided by the world size
        (DDP and FSDP have already averaged everything else)."""
        for name, m in self.experts.items():
            g = getattr(m, name.rpartition(".")[2]).grad
            if g is None:
                continue
            if self.world > self.ep:
                dist.all_reduce(g, group=self.replica_group)
            g.div_(self.world)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (every parameter's whole gradient, once) to max_norm; returns the norm."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not self.active or (self.mode == "dp" and not self.experts):
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from torch.distributed.tensor import DTensor
        expert = {id(getattr(m, name.rpartition(".")[2])) for name, m in self.experts.items()}
        device = params[0].device if params else torch.device("cpu")
        replicated, summed = torch.zeros((), device=device), torch.zeros((), device=device)
        for p in params:
            g = p.grad
            if isinstance(g, DTensor):  # an FSDP shard: the shards' squares add up to the whole
                summed += g.to_local().float().pow(2).sum()
            elif id(p) in expert:  # this rank's experts, held by world / ep replicas
                summed += g.float().pow(2).sum() * (self.ep / self.world)
            else:  # the same on every rank
                replicated += g.float().pow(2).sum()
        dist.all_reduce(summed)
        total = (replicated + summed).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coef.to(p.grad.device))
        return total

    # ---- state ---------------------------------------------------------------------------------------------------
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0 (on CPU; None elsewhere); collective when sharded."""
        from torch.distributed.tensor import DTensor
        out = {}
        for name, t in model.state_dict().items():
            if isinstance(t, DTensor):
                t = t.full_tensor()
            elif name in self.experts:
                parts = [torch.empty_like(t) for _ in range(self.ep)]
                dist.all_gather(parts, t.detach().contiguous(), group=self.ep_group)
                t = torch.cat(parts)
            if is_main():
                out[name] = t.detach().to("cpu", copy=True)
        return out if is_main() else None

    def export(self, model: nn.Module) -> nn.Module | None:
        """A model with all of its weights, on rank 0 (None elsewhere): `model` itself unless it is sharded."""
        if not self.active:
            return model
        if self.mode == "dp" and not self.experts:
            return model if is_main() else None
        state = self.full_state_dict(model)
        if state is None:
            return None
        from .model import Transformer
        with torch.device("meta"):
            plain = Transformer(model.cfg)
        plain.load_state_dict(state, assign=True)
        if model.cfg.tie_word_embeddings:
            plain.lm_head.weight = plain.embed_tokens.weight
        plain.rope.reset_parameters("cpu")
        return plain

    def load_full_state_dict(self, model: nn.Module, full: dict[str, torch.Tensor]) -> None:
        """Load a whole model's state dict into a (possibly sharded) model: each rank keeps its part."""
        if not self.active:
            model.load_state_dict(full)
            return
        from torch.distributed.tensor import DTensor, distribute_tensor
        mine = {}
        for name, t in model.state_dict().items():
            src = full[name]
            if name in self.experts:
                m = self.experts[name]
                src = src[m.first:m.first + t.shape[0]]
            if isinstance(t, DTensor):
                src = distribute_tensor(src.to(t.device, t.dtype), t.device_mesh, t.placements, src_data_rank=None)
            mine[name] = src
        model.load_state_dict(mine)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state keyed by parameter name, as DCP saves it: FSDP shards are DTensors already; a
        routed expert's moments become DTensors sharded over the EP ranks, so a checkpoint can be resumed on any
        number of processes."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        state = get_optimizer_state_dict(model, optimizer)
        if self.experts:
            from torch.distributed.tensor import DTensor, Replicate, Shard
            for name in self.experts:
                if name in state["state"]:  # a new dict: the optimizer's own must keep plain tensors
                    state["state"][name] = {k: DTensor.from_local(v, self.mesh, [Replicate(), Shard(0)],
                                                                  run_check=False)
                                            if torch.is_tensor(v) and v.ndim > 0 else v
                                            for k, v in state["state"][name].items()}
        return state

    def save_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        dcp.save({"optimizer": self.optimizer_state(model, optimizer)}, checkpoint_id=str(path))

    def load_full_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        """Load `optimizer.state_dict()` of a single-process run (parameters by position) into this layout."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = {id(p): n for n, p in model.named_parameters()}
        fqn = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = {"state": {fqn[i]: dict(v) for i, v in saved["state"].items()},
                 "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in saved["param_groups"]]}
        for name, m in self.experts.items():
            if name in state["state"]:
                state["state"][name] = {k: v[m.first:m.first + v.shape[0] // self.ep]
                                        if torch.is_tensor(v) and v.ndim > 0 else v
                                        for k, v in state["state"][name].items()}
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
        """Read a DCP optimizer checkpoint written by any number of processes into this run's layout."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        from torch.distributed.tensor import DTensor
        state = self.optimizer_state(model, optimizer)  # the layout to fill
        with warnings.catch_warnings():  # one process reading a checkpoint is what we mean
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"optimizer": state}, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        for name in self.experts:
            if name in state["state"]:
                state["state"][name] = {k: v.to_local() if isinstance(v, DTensor) else v
                                        for k, v in state["state"][name].items()}
        set_optimizer_state_dict(model, optimizer, state)
