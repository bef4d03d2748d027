"""--fsdp: the loop's models sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`), and what that needs.

Each model is sharded per decoder layer (the classes its Hugging Face `_no_split_modules` names) and then at the
module whose `forward` does all of its work: the policy's and the reference's `LogProbModel`, the critic's
`ValueModel`, the reward model. Outside those forwards every parameter is a DTensor shard (dim 0 over the
processes); inside, FSDP2 has gathered it. So the fused ops, which read `lm_head.weight` themselves, are called
inside the owning module's forward, except one: the full-vocabulary KL term reads the reference's head while the
policy's forward runs, so the update holds the reference's root group (embedding, final norm, head) gathered
(`gathered_root`, once per step). Generation gathers the policy's layers once per rollout and frees them after it
(`gathered`), rather than once per decoded token.

Equal shapes shard alike (dim 0 of each parameter over the same processes), so copying a model's weights into
another of the same architecture is a copy of the local shards (`copy_weights`): the reference and the critic's
trunk take the warmed-up policy's weights that way, without gathering them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

TRAINABLE_ROOT = "_rlhf_fast_trainable_root"  # set on each root `shard` makes


def layer_classes(root: nn.Module) -> set[str]:
    """The class names of the decoder layers under `root`: the `_no_split_modules` of its Hugging Face models."""
    names: set[str] = set()
    for module in root.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard(
    root: nn.Module, *, trainable: bool, param_dtype: torch.dtype | None = None, forward_methods: tuple[str, ...] = ()
) -> nn.Module:
    """fully_shard on every decoder layer of `root`, then on `root` (in place; returns it). Trainable models keep
    their root group gathered from the forward to the backward (as FSDP2 does for a root by default); frozen
    ones free everything after each forward. param_dtype (trainable only): MixedPrecisionPolicy(param_dtype,
    reduce_dtype float32) — float32 shards and optimiser state, the forward on gathered `param_dtype` weights.
    forward_methods: other methods of `root` that run its submodules and so must gather like `forward`."""
    classes = layer_classes(root)
    layers = [m for m in root.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(
            f"--fsdp: {type(root).__name__} has no decoder layers to shard (no Hugging Face model "
            f"with _no_split_modules inside it)"
        )
    mixed = trainable and param_dtype is not None and param_dtype != torch.float32
    policy = (
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    )
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, mp_policy=policy)
    fully_shard(root, reshard_after_forward=not trainable, mp_policy=policy)
    setattr(root, TRAINABLE_ROOT, trainable)  # a trainable root stays gathered from its forward to its backward
    for name in forward_methods:
        register_fsdp_forward_method(root, name)
    return root


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered(root: nn.Module | None):
    """While active, every parameter of the sharded `root` is gathered (one all-gather per group on entry, on every
    process at once) and stays so through any number of forwards: a generation then costs no collective per
    decoded token, and processes that stop decoding at different steps cannot wait on each other. Afterwards the
    groups are freed again. A no-op for None or a model that is not sharded."""
    if not isinstance(root, FSDPModule):
        yield
        return
    groups = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for group in groups:
        group.set_reshard_after_forward(False, recurse=False)
        group.unshard()
    try:
        yield
    finally:
        for group in groups:
            group.set_reshard_after_forward(group is not root or not getattr(root, TRAINABLE_ROOT), recurse=False)
            group.reshard()


@contextlib.contextmanager
def gathered_root(root: nn.Module | None):
    """While active, the root group of the sharded `root` (the parameters outside its decoder layers: embeddings,
    final norm, lm head) is gathered, so that code outside its forward can read them; a no-op otherwise."""
    if not isinstance(root, FSDPModule):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """dst's parameters <- src's of the same name (cast to dst's dtype). Both unsharded, or both sharded alike
    (the same shapes over the same processes): then each process copies its own shards, nothing is gathered."""
    source = dict(src.named_parameters(remove_duplicate=False))
    for name, param in dst.named_parameters(remove_duplicate=False):
        if name not in source:
            raise KeyError(f"copy_weights: {type(src).__name__} has no parameter {name!r}")
        theirs = source[name]
        if isinstance(param, DTensor) != isinstance(theirs, DTensor):
            raise ValueError(f"copy_weights: {name!r} is sharded on one side only")
        if isinstance(param, DTensor) and isinstance(theirs, DTensor):
            if param.placements != theirs.placements or param.shape != theirs.shape:
                raise ValueError(f"copy_weights: {name!r} is sharded differently on the two sides")
            param.to_local().copy_(theirs.to_local())
        else:
            param.copy_(theirs)


def local_bytes(modules, optimizers) -> tuple[int, int]:
    """(parameter bytes, optimiser-state bytes) this process holds for `modules` and `optimizers`: local shards
    of DTensors, each storage counted once (a shared or tied table is one)."""
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        key = t.untyped_storage().data_ptr()
        if key in seen or t.numel() == 0:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    params = sum(size(p) for m in modules if m is not None for p in m.parameters())
    buffers = sum(size(b) for m in modules if m is not None for b in m.buffers())
    state = sum(
        size(v)
        for o in optimizers
        if o is not None
        for s in o.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return params + buffers, state


# ---------------------------------------------------------------- checkpoints


def save_sharded(folder: Path, models: dict, optimizers: dict, step: int) -> str:
    """Every process writes its shards of `models` (name -> module) and `optimizers` (name -> (module, optimizer))
    with torch.distributed.checkpoint into folder/sharded-<step>; returns that folder's name. Older sharded
    folders are removed once every process has written (the caller's state.pt names the valid one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    name = f"sharded-{step}"
    state = {key: get_model_state_dict(model) for key, model in models.items() if model is not None}
    state.update(
        {key: get_optimizer_state_dict(model, opt) for key, (model, opt) in optimizers.items() if opt is not None}
    )
    dcp.save(state, checkpoint_id=str(folder / name))
    dist.barrier()
    return name


def remove_old_sharded(folder: Path, keep: str) -> None:
    """Deletes the sharded-* folders other than `keep` (main process, after state.pt names `keep`)."""
    for old in folder.glob("sharded-*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_sharded(folder: Path, models: dict, optimizers: dict) -> None:
    """Reads what save_sharded wrote into the (already sharded) models and optimisers, each process its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    models = {k: m for k, m in models.items() if m is not None}
    optimizers = {k: v for k, v in optimizers.items() if v[1] is not None}
    state: dict[str, Any] = {key: get_model_state_dict(model) for key, model in models.items()}
    state.update({key: get_optimizer_state_dict(model, opt) for key, (model, opt) in optimizers.items()})
    dcp.load(state, checkpoint_id=str(folder))
    for key, model in models.items():
        set_model_state_dict(model, state[key])
    for key, (model, opt) in optimizers.items():
        set_optimizer_state_dict(model, opt, state[key])


def full_state_dict(model: nn.Module, prefix: str = "") -> dict:
    """The whole unsharded state dict of `model` on the main process, in CPU memory (empty on the others);
    every process must call it. Keys under `prefix` only, with it stripped."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def init_single_process(backend: str) -> None:
    """A one-process group on this machine, for --fsdp without torchrun (FSDP2 needs a process group)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    dist.init_process_group(backend, rank=0, world_size=1)
