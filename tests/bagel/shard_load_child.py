"""One process of a 2-rank FSDP2 run (gloo) for tests/bagel/test_shard_load.py, launched as torchrun would (env
MASTER_ADDR/MASTER_PORT/WORLD_SIZE/NODE_RANK/LOCAL_RANK).

    python tests/bagel/shard_load_child.py SPEC.json

SPEC (JSON): out (a path prefix), folder (a BAGEL folder). The model of the folder is built on the meta device
(`mogao.bagel.load.meta_bagel_model`), sharded as `MoTFSDP2Strategy` shards it (one unit per MoT decoder layer
and per ViT layer, then the root) and filled by `mogao.training.shard_load.load_weights`. Writes
<out>.rank<r>.json (the rows read per BAGEL tensor, the tensors read whole, this rank's parameter bytes and the
whole model's) and, on rank 0, <out>.state.pt (the full state dict gathered from the shards).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(spec_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    from mogao.bagel.load import meta_bagel_model
    from mogao.model.backbone import MoTDecoderLayer
    from mogao.training.shard_load import load_weights, plan_bagel_weights

    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, info = meta_bagel_model(spec["folder"])
        mesh = init_device_mesh("cpu", (world,))
        for sub in list(model.modules()):
            if isinstance(sub, (MoTDecoderLayer, SiglipEncoderLayer)):
                fully_shard(sub, mesh=mesh)
        fully_shard(model, mesh=mesh)
        report = load_weights(model, plan_bagel_weights(model, info), "cpu")
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, spec["out"] + ".state.pt")
        Path(spec["out"] + f".rank{rank}.json").write_text(json.dumps({
            "reads": report.reads, "whole": report.whole, "local_bytes": report.local_param_bytes,
            "total_bytes": total}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
