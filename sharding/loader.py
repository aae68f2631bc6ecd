"""Build one stage on the meta device and fill it with only this rank's slices of the checkpoint.

The loop is generic: for each of our parameters, ask the stage which checkpoint tensors feed
it, open the file that holds each one (single-file or sharded `model.safetensors.index.json`),
and let the owning module's `weight_loader` read its slice through `safe_open(...).get_slice`.
No rank materialises a tensor it does not own (row-parallel weights are read column slices:
the bytes read are this rank's, though the OS may page in the whole tensor from the mmap).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sharding.dist import ParallelGroups
from sharding.models import stage_class
from sharding.plan import ShardPlan


class CheckpointError(FileNotFoundError):
    """A checkpoint file or tensor is missing or unreadable; the message names both."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if torch_dtype is torch.float16 and device.type == "cpu":
        try:   # some CPU builds lack half-precision matmul
            torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        except RuntimeError as e:
            raise ValueError(f"dtype='float16' is not supported on this CPU ({e}); use bfloat16 or float32") from e
    return torch_dtype


def checkpoint_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, for single-file and sharded safetensors checkpoints."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are supported)")
    names: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                names[name] = f
    return names


def _resolve(name: str, index: dict[str, Path]) -> str | None:
    """Checkpoints differ in prefixes (`transformer.h.0` vs `h.0`): accept either."""
    if name in index:
        return name
    for prefix in ("transformer.", "model."):
        if name.startswith(prefix) and name[len(prefix):] in index:
            return name[len(prefix):]
    return None


def _owned_parameters(stage: nn.Module):
    """(full name, parameter, module that owns it and knows how to load it)."""
    for mname, module in stage.named_modules():
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            yield (f"{mname}.{pname}" if mname else pname), param, module


def _prequantized(model_dir: Path, quantization: str | None) -> dict | None:
    """A `shardline quantize` folder's quantization section (None for a plain folder)."""
    from sharding.quant.folder import folder_quant_config
    qcfg = folder_quant_config(model_dir)
    if qcfg is not None and qcfg["method"] != quantization:
        raise ValueError(f"{model_dir} is quantized with {qcfg['method']!r}; "
                         f"load it with quantization={qcfg['method']!r}")
    return qcfg


def _open_slice(handle, name: str, qcfg: dict | None):
    """The tensor's slice handle; for a pre-quantized weight, one that dequantizes what is read."""
    if qcfg and name.endswith(".q"):
        from sharding.quant.folder import QuantizedSlice
        return QuantizedSlice(handle, name, qcfg)
    return handle.get_slice(name)


@dataclass
class LoadReport:
    loaded_bytes: int
    tensors: int
    quant: dict | None = None    # sharding.quant.QuantReport.to_dict() when quantized at load


def load_stage(hf_config, plan: ShardPlan, groups: ParallelGroups, model_dir: str | Path,
               dtype: str = "float32", quantization: str | None = None,
               batch_size: int = 64) -> tuple[nn.Module, LoadReport]:
    """The stage for (groups.pp_rank, groups.tp_rank), with its slices loaded onto groups.device."""
    model_dir = Path(model_dir)
    torch_dtype = check_dtype(dtype, groups.device)
    with torch.device("meta"):
        stage = stage_class(plan.dims.model_type)(hf_config, plan, groups)
    stage = stage.to(torch_dtype).to_empty(device=groups.device)
    stage.materialize(groups.device)
    # a stage that both embeds and projects shares the tied weight instead of loading it twice
    shared = None
    embed = stage.tied_embedding()
    if embed is not None and hasattr(stage, "lm_head"):
        stage.lm_head.weight = embed.weight
        shared = "lm_head.weight"

    index = checkpoint_index(model_dir)
    qcfg = _prequantized(model_dir, quantization)
    loaded = tensors = 0
    with ExitStack() as files:
        handles: dict[Path, object] = {}
        for pname, param, owner in _owned_parameters(stage):
            if pname == shared:
                continue
            for ckpt_name, shard_id in stage.checkpoint_names(pname):
                found = _resolve(ckpt_name, index) or (qcfg and _resolve(ckpt_name + ".q", index))
                if found is None:
                    raise CheckpointError(f"{model_dir}: tensor {ckpt_name!r} (for parameter {pname}) is in no "
                                          "checkpoint file; is this the right model folder?")
                path = index[found]
                if not path.is_file():
                    raise CheckpointError(f"{path}: file listed in model.safetensors.index.json is missing "
                                          f"(needed for tensor {found!r})")
                if path not in handles:
                    handles[path] = files.enter_context(safe_open(str(path), framework="pt"))
                try:
                    sl = _open_slice(handles[path], found, qcfg)
                except Exception as e:   # safetensors raises its own error type
                    raise CheckpointError(f"{path}: cannot read tensor {found!r}: {e}") from e
                loaded += owner.weight_loader(param, sl, f"{path.name}:{found}", shard_id)
                tensors += 1
    report = LoadReport(loaded_bytes=loaded, tensors=tensors)
    if quantization is not None:   # this rank quantizes only the slices it just loaded
        from sharding.quant import quantize_stage
        report.quant = quantize_stage(stage, quantization, batch_size, where=f"rank {groups.rank}").to_dict()
    return stage.eval(), report
