"""Worker for tests/test_config.py::test_unsupported_deepspeed_settings_are_refused (torchrun, 1 process).

Builds real DeepSpeed engines with settings that would make micro-batch checkpoints lose state and
records what ``deepspeed_state.unsupported_settings`` says about each (the config-level checks are
bypassed on purpose: this is the check that holds whatever spelling reached DeepSpeed). Also
builds a Trainer with a setting only the engine check sees. Writes ``<out>`` as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from common import tiny_model
from seqpar.config import ConfigError, validate_config
from seqpar.engine import Trainer
from seqpar.engine import deepspeed_state as dss
from seqpar.engine.trainer import param_groups
from seqpar.models import build_model
from seqpar.parallel import make_topology

CASES = {  # name: (zero stage, precision, deepspeed keys merged over seqpar's derived config)
    "supported": (2, "bf16", {}),
    "legacy cpu_offload": (2, "fp32", {"zero_optimization": {"cpu_offload": True},
                                      "zero_force_ds_cpu_optimizer": False}),
    "bfloat16 key": (2, "fp32", {"bfloat16": {"enabled": True}}),
    "fp32 accumulation spelt float": (2, "bf16", {"data_types": {"grad_accum_dtype": "float"}}),
    "elastic_checkpoint": (1, "fp32", {"zero_optimization": {"elastic_checkpoint": True}}),
    "no grad norm": (2, "fp32", {"zero_optimization": {"compute_grad_norm": False}, "gradient_clipping": 0.0}),
}


def engine_reasons(stage: int, precision: str, extra: dict, run_dir: Path) -> list[str]:
    cfg = validate_config({"model": tiny_model(False), "parallel": {"zero_stage": stage},
                           "train": {"precision": precision, "micro_batch_size": 1, "global_batch_size": 1},
                           "logging": {"run_dir": str(run_dir)}})
    ds = cfg.deepspeed_config(cfg.layout(1))
    for key, value in extra.items():
        ds[key] = {**ds.get(key, {}), **value} if isinstance(value, dict) else value
    model = build_model(cfg.model, seed=0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=ds,
                                      dist_init_required=False)
    return dss.unsupported_settings(engine, precision)


def main() -> int:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    found = {name: engine_reasons(*case, out.parent / name.replace(" ", "_")) for name, case in CASES.items()}
    cfg = validate_config({"model": tiny_model(False), "train": {"max_steps": 1, "warmup_steps": 0, "global_batch_size": 1},
                           "deepspeed": {"managed_gradient_accumulation": False},
                           "logging": {"run_dir": str(out.parent / "trainer"), "progress_bar": False,
                                       "tensorboard": "off"}})
    try:
        Trainer(cfg, make_topology(1, 1, torch.device("cpu")))
        found["trainer"] = "accepted"
    except ConfigError as e:
        found["trainer"] = str(e)
    out.write_text(json.dumps(found, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
