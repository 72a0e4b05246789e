"""Train one MLSAE across processes: `torchrun --nproc_per_node N -m mlsae_pipeline.ddp_train`.

Launched by the `mlsae` asset through Dagster Pipes (`PipesSubprocessClient`) when the sweep
sets `train.nproc_per_node > 1`. Every rank runs `mlsae_core.train.train`, which joins the
process group from torchrun's WORLD_SIZE/RANK (gloo on CPU, NCCL on GPUs), reads its own
shard of each step's micro-batches and all-reduces the gradients. Rank 0 writes the
checkpoint and reports the result to Dagster with `dagster_pipes`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", required=True, type=Path, help="JSON: spec, out_dir, model, root")
    args = parser.parse_args(argv)
    job = json.loads(args.job.read_text())

    from mlsae_core.config import spec_from_dict
    from mlsae_core.layout import StorageLayout
    from mlsae_core.runs import train_stored

    spec = spec_from_dict(job["spec"])
    layout, out_dir = StorageLayout(Path(job["root"])), Path(job["out_dir"])
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        train_stored(spec, layout, job["model"], out_dir)
        return 0

    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        pipes.log.info(f"rank 0 of {os.environ.get('WORLD_SIZE', '1')}: training {job['out_dir']}")

        def on_step(row: dict) -> None:
            if row["step"] % 10 == 0:
                pipes.log.info(f"step {row['step']}: {row['tokens']} tokens, fvu {row['fvu']:.4f}")

        meta = train_stored(spec, layout, job["model"], out_dir, on_step=on_step)
        pipes.report_asset_materialization(metadata=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
