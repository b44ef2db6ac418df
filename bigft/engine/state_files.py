"""What a checkpoint holds on disk per engine: Accelerate's state (DeepSpeed, DDP), FSDP2's
distributed checkpoint, and with a frozen base only the trainable weights, checked against
the model's groups on load, plus `base_model.json` naming the base it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from bigft.errors import BigftError

BASE_FILE = "base_model.json"


def _has_frozen(accelerator: Accelerator) -> bool:
    return any(not p.requires_grad for m in accelerator._models for p in m.parameters())


def save_state(accelerator: Accelerator, out: Path) -> None:
    """Accelerate's save_state (model, optimizer, RNG states), less the frozen weights."""
    if not _has_frozen(accelerator):  # full fine-tuning: every weight is trained
        accelerator.save_state(str(out), safe_serialization=True)
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # exclude_frozen_parameters leaves out frozen parameters (and ZeRO-2/3's copies of
        # them); the hook what is no parameter either: 4-bit layers' quantization
        # constants (`.absmax`, ...), 3-12% of a 4-bit base.
        hooks = [
            accelerator.unwrap_model(m).register_state_dict_post_hook(_drop_frozen)
            for m in accelerator._models
        ]
        try:
            accelerator.save_state(
                str(out), safe_serialization=True, exclude_frozen_parameters=True
            )
        finally:
            for hook in hooks:
                hook.remove()
    elif accelerator.distributed_type == DistributedType.FSDP:
        _save_fsdp2(accelerator, out)
    else:

        def trainable_only(models: list[Any], weights: list[Any], _dir: str) -> None:
            for i, model in enumerate(models):
                plain = accelerator.unwrap_model(model)  # names without DDP's `module.`
                weights[i] = _trainable_only(plain, plain.state_dict())

        handle = accelerator.register_save_state_pre_hook(trainable_only)
        try:
            accelerator.save_state(str(out), safe_serialization=True)
        finally:
            handle.remove()
    if accelerator.is_main_process:
        (out / BASE_FILE).write_text(json.dumps(_base_fingerprint(accelerator), indent=2))


def load_state(accelerator: Accelerator, path: Path) -> None:
    if not _has_frozen(accelerator):
        accelerator.load_state(str(path))
        return
    _check_base(accelerator, path)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Our check replaces DeepSpeed's strict load, which would miss the frozen weights.
        accelerator.load_state(
            str(path), load_module_strict=False, custom_load_fn=partial(_load_module, path)
        )
    elif accelerator.distributed_type == DistributedType.FSDP:
        _load_fsdp2(accelerator, path)
    else:

        def load_trainable(models: list[Any], _dir: str) -> None:
            for i, model in enumerate(models):
                _load_weights(accelerator.unwrap_model(model), path, i)
            models.clear()  # loaded: Accelerate goes on with the optimizer and RNG states

        handle = accelerator.register_load_state_pre_hook(load_trainable)
        try:
            accelerator.load_state(str(path))
        finally:
            handle.remove()


def _trainable_only(model: Any, state: dict[str, Any]) -> OrderedDict[str, Any]:
    """The entries of `model`'s state dict that training changes: trainable parameters
    and buffers (an OrderedDict, which Accelerate de-duplicates tied tensors of)."""
    keep = {n for group in _expected_groups(model, state) for n in group}
    return OrderedDict((k, v) for k, v in state.items() if k in keep)


def _drop_frozen(module: Any, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """A state_dict post-hook: keep only the entries training changes."""
    names = [k[len(prefix) :] for k in state if k.startswith(prefix)]
    keep = {prefix + n for group in _expected_groups(module, names) for n in group}
    for key in [k for k in state if k.startswith(prefix) and k not in keep]:
        del state[key]


def _expected_groups(model: Any, names: Iterable[str]) -> list[list[str]]:
    """State-dict `names` a checkpoint must hold, grouped by tensor: names of one tied
    tensor (an lm_head sharing the embedding) form one group, and any one of them will do."""
    known = set(names)
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad and name in known:
            groups.setdefault(id(param), []).append(name)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in known:  # persistent buffers (running statistics); rarely any in an LLM
            groups.setdefault(id(buffer), []).append(name)
    return list(groups.values())


def check_keys(
    path: Path, model: Any, found: Iterable[str], shapes: dict[str, list[int]] | None = None
) -> set[str]:
    """Names in `found` to load into `model`; BigftError when a trained tensor is missing,
    a name is one the model lacks, or (given `shapes`) a shape differs. Frozen weights in
    a checkpoint (written before bigft left them out) are ignored."""
    names = set(model.state_dict().keys())
    found = set(found)
    groups = _expected_groups(model, names)
    missing = [min(g) for g in groups if not found.intersection(g)]
    unexpected = sorted(found - names)
    wanted = {n for g in groups for n in g} & found
    params = dict(model.named_parameters(remove_duplicate=False))
    reshaped = [
        f"{n} {shapes[n]} (model {list(params[n].shape)})"
        for n in sorted(wanted)
        if shapes is not None and n in params and list(params[n].shape) != shapes[n]
    ]
    problems = []
    if missing:
        problems.append(f"it lacks {len(missing)} trained tensor(s): {_first(sorted(missing))}")
    if unexpected:
        problems.append(f"it holds {len(unexpected)} the model lacks: {_first(unexpected)}")
    if reshaped:
        problems.append(f"{len(reshaped)} differ in shape: {_first(reshaped)}")
    if problems:
        raise BigftError(
            f"checkpoint {path} does not fit this model ({'; '.join(problems)}); resume with "
            "the method and adapter settings it was written with, or start afresh "
            "(train.resume=never)"
        )
    return wanted


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _load_weights(model: Any, path: Path, index: int) -> None:
    """Load the saved tensors of model `index` (Accelerate's file names) into `model`."""
    suffix = f"_{index}" if index else ""
    file = path / f"model{suffix}.safetensors"
    pickled = path / f"pytorch_model{suffix}.bin"
    if not file.is_file() and not pickled.is_file():
        raise BigftError(f"checkpoint {path} holds no model weights ({file.name})")
    if not file.is_file():  # a pickled checkpoint, which load_checkpoint allowed
        state = torch.load(pickled, map_location="cpu")
        state = {plain_key(model, k): v for k, v in state.items()}
        wanted = check_keys(path, model, state, {k: list(v.shape) for k, v in state.items()})
        model.load_state_dict({k: state[k] for k in wanted}, strict=False)
        return
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        saved = {plain_key(model, k): k for k in f.keys()}  # noqa: SIM118
        shapes = {k: list(f.get_slice(saved[k]).get_shape()) for k in saved}
        wanted = check_keys(path, model, saved, shapes)
        model.load_state_dict({k: f.get_tensor(saved[k]) for k in wanted}, strict=False)


def plain_key(model: Any, key: str) -> str:
    """A checkpoint key without DDP's `module.` prefix (checkpoints written before bigft
    saved the unwrapped model's names under DDP have it)."""
    if key.startswith("module.") and not hasattr(model, "module"):
        return key[len("module.") :]
    return key


def _load_module(path: Path, src: dict[str, Any], dst: Any) -> None:
    """DeepSpeed's custom_load_fn: load the module part of a DeepSpeed checkpoint."""
    wanted = check_keys(path, dst, src)
    dst.load_state_dict({k: src[k] for k in wanted}, strict=False)


def _save_fsdp2(accelerator: Accelerator, out: Path) -> None:
    """Accelerate's FSDP2 save_state, with the model's DCP shards filtered to trainable
    tensors (Accelerate writes the whole model and has no option to leave the base out)."""
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import save_accelerator_state
    from accelerate.utils import save_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    for i, model in enumerate(accelerator._models):
        state = _trainable_only(model, get_model_state_dict(model))
        dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(str(out / fsdp_dir(i))))
    plugin = accelerator.state.fsdp_plugin
    for i, optimizer in enumerate(accelerator._optimizers):
        save_fsdp_optimizer(plugin, accelerator, optimizer, accelerator._models[i], str(out), i)
    save_accelerator_state(
        str(out),
        [],
        [],
        accelerator._schedulers,
        accelerator._dataloaders,
        accelerator.process_index,
        accelerator.step,
        accelerator.scaler,
        safe_serialization=True,
    )


def _load_fsdp2(accelerator: Accelerator, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import load_accelerator_state
    from accelerate.utils import load_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    for i, model in enumerate(accelerator._models):
        reader = dcp.FileSystemReader(str(path / fsdp_dir(i)))
        saved = [k.removeprefix("model.") for k in reader.read_metadata().state_dict_metadata]
        wanted = check_keys(path, model, saved)
        state = {k: v for k, v in get_model_state_dict(model).items() if k in wanted}
        dcp.load({"model": state}, storage_reader=reader)
        set_model_state_dict(model, state, options=StateDictOptions(strict=False))
    plugin = accelerator.state.fsdp_plugin
    for i, optimizer in enumerate(accelerator._optimizers):
        load_fsdp_optimizer(plugin, accelerator, optimizer, accelerator._models[i], str(path), i)
    restored = load_accelerator_state(
        str(path),
        [],
        [],
        accelerator._schedulers,
        accelerator._dataloaders,
        accelerator.process_index,
        accelerator.scaler,
    )
    accelerator.step = restored.get("step", accelerator.step)


def fsdp_dir(index: int) -> str:
    return f"pytorch_model_fsdp_{index}"  # Accelerate's name for the model's DCP shards


def _base_fingerprint(accelerator: Accelerator) -> dict[str, Any]:
    """What identifies the frozen base: where it was loaded from, and the names, shapes
    and dtypes of its frozen tensors (cheap: no weight is read)."""
    model = accelerator.unwrap_model(accelerator._models[0])
    frozen = [
        [name, list(getattr(p, "ds_shape", p.shape)), str(p.dtype)]
        for name, p in model.named_parameters()
        if not p.requires_grad
    ]
    source = str(getattr(model, "name_or_path", ""))
    return {
        "name_or_path": os.path.realpath(source) if os.path.isdir(source) else source,
        "frozen_tensors": len(frozen),
        "frozen_layout_sha256": hashlib.sha256(json.dumps(frozen).encode()).hexdigest(),
    }


def _check_base(accelerator: Accelerator, path: Path) -> None:
    """Refuse to put a checkpoint's adapters on another base than they were trained on."""
    file = path / BASE_FILE
    if not file.is_file():  # written before bigft recorded the base
        return
    saved, now = json.loads(file.read_text()), _base_fingerprint(accelerator)
    if saved.get("name_or_path") != now["name_or_path"]:
        raise BigftError(
            f"checkpoint {path} was trained on the base '{saved.get('name_or_path')}' but this "
            f"run loads '{now['name_or_path']}'; resume with model.name_or_path set to the "
            "base it was trained on, or start afresh (train.resume=never)"
        )
    if saved.get("frozen_layout_sha256") != now["frozen_layout_sha256"]:
        raise BigftError(
            f"checkpoint {path} was trained on a base whose {saved.get('frozen_tensors')} "
            f"frozen tensors differ in names, shapes or dtypes from this run's "
            f"{now['frozen_tensors']} (another model.dtype, method or quantization?); resume "
            "with the settings it was written with, or start afresh (train.resume=never)"
        )
