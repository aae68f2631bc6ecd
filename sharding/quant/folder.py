"""Pre-quantized model folders (`shardline quantize MODEL OUT --method M`), loadable per slice.

The folder is a normal HF folder whose config.json has a `quantization_config` section
({"quant_method": "shardline", "method": M, ...}) and whose single model.safetensors stores
each decoder linear weight `X.weight` as `X.weight.q` (+ `.scale`, and `.low` for int4) in the
[out, in] orientation, quantized per checkpoint tensor. Since scales are per output row and
int4 groups run along each row, quantizing q_proj alone gives the same values as quantizing a
rank's merged qkv slice: a rank reads only its rows (column-parallel) or its columns and their
groups (row-parallel) through `QuantizedSlice`, which looks like a safetensors slice to the
layers' weight loaders. The loader then quantizes at load as usual, which reproduces the stored
values (the round trip is exact up to float rounding of the scales), so outputs equal those of
quantizing the original folder at load. Embeddings and the LM head stay dense in the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sharding.quant.formats import QuantizedWeight, dequantize, quantize
from sharding.quant.spec import QuantizationError, parse_method

SUFFIX = ".q"
QUANT_METHOD = "shardline"
# 2: int4 stores fp16 `.scale` and `.low` (w = q * scale + low); 1 (fp32 `.scale`/`.zero`) is not read
FORMAT_VERSION = 2


def folder_quant_config(model_dir: str | Path) -> dict | None:
    """The folder's shardline quantization section, or None for an ordinary folder."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    if not cfg:
        return None
    if cfg.get("quant_method") != QUANT_METHOD:
        raise QuantizationError(f"{model_dir}: quantization_config.quant_method={cfg.get('quant_method')!r} is not "
                                f"supported; Shardline loads only folders written by `shardline quantize`")
    if cfg.get("format_version", 1) != FORMAT_VERSION:
        raise QuantizationError(f"{model_dir} was written by an older `shardline quantize` (format version "
                                f"{cfg.get('format_version', 1)}, this Shardline reads {FORMAT_VERSION}); "
                                f"re-run `shardline quantize ORIGINAL_MODEL {model_dir} --method {cfg.get('method')}`")
    return cfg


def folder_method(model_dir: str | Path) -> str | None:
    cfg = folder_quant_config(model_dir)
    return None if cfg is None else cfg["method"]


class QuantizedSlice:
    """A safetensors-slice look-alike over `X.weight.q/.scale/.low`: indexing dequantizes only the slice."""

    def __init__(self, handle, q_name: str, qcfg: dict):
        base = q_name[: -len(SUFFIX)]
        self.kind, self.group = qcfg["kind"], qcfg.get("group_size", 0)
        self.transposed = base in qcfg.get("transposed", [])
        self.q = handle.get_slice(q_name)
        self.scale = handle.get_slice(base + ".scale")
        self.low = handle.get_slice(base + ".low") if self.kind == "int4" else None
        out, cols = self.q.get_shape()
        self.logical = (out, cols * 2 if self.kind == "int4" else cols)   # [out, in]

    def get_shape(self) -> list[int]:
        out, inp = self.logical
        return [inp, out] if self.transposed else [out, inp]

    def __getitem__(self, key) -> torch.Tensor:
        dims = list(key) if isinstance(key, tuple) else [key]
        dims += [slice(None)] * (2 - len(dims))
        shape = self.get_shape()
        (a0, a1), (b0, b1) = ((d.start or 0, shape[i] if d.stop is None else d.stop) for i, d in enumerate(dims))
        rows, cols = ((b0, b1), (a0, a1)) if self.transposed else ((a0, a1), (b0, b1))
        w = self._read(rows, cols)
        return w.t() if self.transposed else w

    def _read(self, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        (r0, r1), (c0, c1) = rows, cols
        if self.kind != "int4":
            return dequantize(QuantizedWeight("int8", self.q[r0:r1, c0:c1], self.scale[r0:r1]))
        g = self.group
        if c0 % g or c1 % g:
            raise QuantizationError(f"int4 group size {g} does not divide this rank's input columns [{c0}, {c1}); "
                                    "re-quantize with a smaller group size (shardline quantize --method int4-g32)")
        qw = QuantizedWeight("int4", self.q[r0:r1, c0 // 2:c1 // 2], self.scale[r0:r1, c0 // g:c1 // g],
                             self.low[r0:r1, c0 // g:c1 // g], g)
        return dequantize(qw)


def quantize_folder(src: str | Path, out: str | Path, method: str) -> Path:
    """Write a pre-quantized copy of the HF folder `src` to `out`; returns `out`."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from sharding.loader import checkpoint_index

    src, out = Path(src), Path(out)
    spec = parse_method(method)
    if folder_quant_config(src) is not None:
        raise QuantizationError(f"{src} is already quantized; quantize the original folder instead")
    if out.resolve() == src.resolve():
        raise QuantizationError(f"output folder {out} must differ from the model folder")
    targets = _quantized_tensors(src, spec)   # checkpoint name -> stored transposed ([in, out])?
    index = checkpoint_index(src)
    tensors: dict[str, torch.Tensor] = {}
    for name in tqdm(sorted(index), desc=f"quantize {spec.name}"):
        with safe_open(str(index[name]), framework="pt") as f:
            t = f.get_tensor(name)
        if name not in targets:
            tensors[name] = t.contiguous()
            continue
        qw = quantize(t.t() if targets[name] else t, spec.kind, spec.group_size)
        for suffix, value in qw.tensors().items():
            tensors[f"{name}.{suffix}" if suffix != "q" else name + SUFFIX] = value.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():   # tokenizer, generation config, ...: everything but the weights
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                                  "method": spec.name, "kind": spec.kind,
                                  "group_size": spec.group_size,
                                  "transposed": sorted(n for n, tr in targets.items() if tr)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _quantized_tensors(src: Path, spec) -> dict[str, bool]:
    """Checkpoint names of the decoder linear weights (built on the meta device at tp=pp=1)."""
    from sharding.dist import ParallelGroups
    from sharding.layers.linear import LinearBase
    from sharding.loader import _resolve, checkpoint_index
    from sharding.models import stage_class
    from sharding.plan import ShardPlan, load_hf_config
    from sharding.quant.apply import check_group_size

    hf_config = load_hf_config(src)
    plan = ShardPlan.build(hf_config, 1, 1, None)
    groups = ParallelGroups(rank=0, tp_size=1, pp_size=1, device=torch.device("meta"), backend="none")
    with torch.device("meta"):
        stage = stage_class(plan.dims.model_type)(hf_config, plan, groups)
    check_group_size(stage, spec, "the whole model")
    index = checkpoint_index(src)
    targets = {}
    for mname, module in stage.named_modules():
        if isinstance(module, LinearBase):
            for ckpt, _ in stage.checkpoint_names(f"{mname}.weight"):
                found = _resolve(ckpt, index)
                if found is not None:
                    targets[found] = module.transposed
    return targets
