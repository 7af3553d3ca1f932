"""A torchrun worker: each rank evaluates its share of classification and segmentation batches
with medfunc.metrics and writes the metrics it gets to $MEDFUNC_TEST_OUT/metrics_rank{R}.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared pieces
from conftest import end_worker  # noqa: E402
from test_metrics_distributed import evaluate_share  # noqa: E402

from medfunc import distributed as dist  # noqa: E402


def main() -> None:
    info = dist.init(timeout_s=60)
    torch.set_num_threads(1)
    results = evaluate_share(info.rank, info.world_size)
    out = Path(os.environ["MEDFUNC_TEST_OUT"])
    (out / f"metrics_rank{info.rank}.json").write_text(json.dumps(results))
    dist.shutdown()


if __name__ == "__main__":
    main()
    end_worker()
