"""ZeRO-3 models built partitioned from the start (``deepspeed.zero.Init``; pinned deepspeed==0.19.8).

Built whole, an 8B model is 32 GB of fp32 on every rank before DeepSpeed partitions it, and a 70B
one does not fit a host at all. Under ``zero.Init`` each parameter is partitioned as its module is
created, so a rank holds its 1/world slice plus, briefly, one parameter whole. The values are the same as the whole-model
path, bit for bit: the model draws each parameter's full initial value from the seeded generator
(one parameter at a time, on the CPU) and every rank keeps its own slice; Hugging Face weights are
assembled one parameter at a time the same way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.config import ModelConfig
from seqpar.models import Transformer
from seqpar.models.transformer import Rotary


def write_partition(param: Any, value: Tensor) -> None:
    """Keep this rank's slice of ``value`` (the full tensor) in a ZeRO-3 parameter's partition.

    Rank r of the parameter's group holds elements ``[r * n, (r + 1) * n)`` of the flattened
    tensor, ``n = ds_tensor.ds_numel``; the last partition is zero-padded.
    """
    part = param.ds_tensor
    n = part.ds_numel
    start = dist.get_rank(group=param.ds_process_group) * n
    mine = value.reshape(-1)[start : start + n]
    with torch.no_grad():
        part.zero_()
        part.narrow(0, 0, mine.numel()).copy_(mine.to(part.dtype))


def _undo_float_casts(model: Transformer, cfg: ModelConfig) -> None:
    """zero.Init turns every floating tensor created inside it into the training dtype (bf16), not
    just parameters: rebuild the RoPE tables and give buffers back the dtypes the model class
    chose (the MoE router keeps fp32 state; its buffers are zeros at construction, so exact)."""
    model.rotary = Rotary(cfg)
    with torch.device("meta"):
        intended = {name: b.dtype for name, b in Transformer(cfg).named_buffers()}
    for module_name, module in model.named_modules():
        for key, buf in module._buffers.items():
            name = f"{module_name}.{key}" if module_name else key
            if buf is not None and buf.dtype != intended[name]:
                module._buffers[key] = buf.to(intended[name])


def build_partitioned_model(cfg: ModelConfig, ds_config: dict[str, Any], seed: int,
                            device: torch.device) -> Transformer:
    """``build_model`` for ZeRO-3: random init from ``seed``, then HF weights when configured."""
    import deepspeed

    # zero.Init reads the world size from DeepSpeed's comm layer: wrap our process group in it
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(cfg)
    _undo_float_casts(model, cfg)
    params = dict(model.named_parameters())
    shapes = {name: p.ds_shape for name, p in params.items()}

    def write(name: str, value: Tensor) -> None:
        if name in params:
            write_partition(params[name], value)
        else:  # buffers (MoE expert bias) are not partitioned
            with torch.no_grad():
                model.get_buffer(name).copy_(value)

    model.init_weights(torch.Generator().manual_seed(seed), write=write, shapes=shapes)
    if cfg.hf_path is not None and cfg.load_weights:
        from seqpar.models.hf import load_hf_checkpoint

        load_hf_checkpoint(model, cfg.hf_path, write=write, shapes=shapes)
    for module in model.modules():  # parameters are already placed; move only the buffers
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(device)
    return model
