"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``), and the checkpoint's one format.

``train.distributed.strategy: fsdp`` shards every parameter, its gradient and its optimizer state
across the ranks (each holds 1/N; the full layer is gathered for its forward and backward only):
``fully_shard`` on each top-level child that holds parameters, then on the root, over a one-dimension
``DeviceMesh`` of all ranks. Never FSDP1 (``FullyShardedDataParallel``). It works on the CPU with gloo.

The checkpoint stays the plain nnctl checkpoint a one-process run writes: the full ``state_dict`` of
the unwrapped model and the optimizer's ``state_dict`` in PyTorch's own format (state keyed by the
parameter's index in the optimizer's groups), gathered from the shards (``full_model_state``,
``full_optimizer_state``: collectives, every rank calls them; rank 0 gets the tensors, on the CPU).
So ``eval``, ``predict``, ``export-weights`` and a resume under DDP or one process read it as any
other; and a resume under FSDP loads the full weights into the model before it is sharded, and the
optimizer state through ``set_optimizer_state_dict`` (``load_optimizer_state``), whatever strategy and
process count wrote it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from nnctl.training.distributed import Dist


def shard(model: nn.Module, dist: Dist, device: torch.device, *, reshard_after_forward: bool = True,
          cpu_offload: bool = False) -> nn.Module:
    """The model sharded in place over every rank (its parameters become DTensor shards); returned."""
    from torch.distributed.device_mesh import init_device_mesh  # FSDP2's modules: 0.9 s, only when sharding
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.world_size,))
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
                               "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether fully_shard has been applied to the model (its parameters are DTensors). No DTensor exists
    before torch.distributed.tensor is imported (0.7 s: it is left to shard() to import it)."""
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and any(isinstance(p, tensor.DTensor) for p in model.parameters())


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's full state_dict on the CPU, on rank 0 (a collective: every rank calls it; the
    others get {}: only rank 0 writes checkpoints, and no rank holds the whole model on its device)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state in PyTorch's own ``state_dict`` format (state and groups keyed by the
    parameter's index), as a one-process run's optimizer returns it (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    return _by_index(by_name, _names_in_order(model, optimizer)) if by_name else {}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A plain optimizer ``state_dict`` (index-keyed, from any strategy or process count) into the
    sharded model's optimizer: each rank keeps its shard."""
    by_name = _by_name(state, _names_in_order(model, optimizer))
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, by_name, options=_options(full_state_dict=True))


def _names_in_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameters' names in the order the optimizer numbers them (group by group)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_index(state: dict, names: list[str]) -> dict:
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def _by_name(state: dict, names: list[str]) -> dict:
    return {"state": {names[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


def per_rank_bytes(model: nn.Module, world_size: int, strategy: str, optimizer_slots: int = 2) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state (``optimizer_slots`` tensors a parameter: 2 for
    Adam's moments) that one rank holds under ``strategy`` (ddp: all of it; fsdp: 1/N, rounded up a tensor)."""
    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]

    def size(ps):
        if strategy != "fsdp" or world_size <= 1:
            return sum(p.numel() * p.element_size() for p in ps)
        return sum(-(-p.shape[0] // world_size) * (p.numel() // max(p.shape[0], 1)) * p.element_size()
                   if p.dim() else p.element_size() for p in ps)

    return {"parameters": size(params), "gradients": size(trainable),
            "optimizer": optimizer_slots * size(trainable)}


# --- the trainer's one way to read and write its state, sharded or not ----------------------------

def model_state(model: nn.Module, copy: bool = False) -> dict[str, torch.Tensor]:
    """The model's full state_dict: gathered from the shards (a collective) when sharded, else its own
    (``copy``: tensors that later steps do not change, as best.pt's weights need)."""
    if is_sharded(model):
        return full_model_state(model)
    state = model.state_dict()
    return {k: v.detach().clone() for k, v in state.items()} if copy else state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict in PyTorch's own format, gathered when the model is sharded."""
    return full_optimizer_state(model, optimizer) if is_sharded(model) else optimizer.state_dict()


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A full state_dict into the model, into each rank's shards when it is sharded (strict)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(full_state_dict=True))


def optimizer_loader(model: nn.Module, optimizer: torch.optim.Optimizer):
    """How the optimizer takes a saved state_dict (``optim.optimizers._resume_optimizer``'s ``load``)."""
    if not is_sharded(model):
        return optimizer.load_state_dict
    return lambda state: load_optimizer_state(model, optimizer, state)
