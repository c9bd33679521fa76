"""Run a 2-rank (or N-rank) gloo test on CPU processes: the scaffolding the distributed tests share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file


def run_ranks(target: Callable[[int, str, str], None], tmp_path: Path, world: int, timeout: float) -> list[dict]:
    """Spawn ``world`` processes running ``target(rank, init_file, out_dir)``; each must exit 0
    and write ``out_dir/rank<r>.safetensors``, returned as one dict of tensors per rank."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, str(tmp_path / "init"), str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode} (see the captured stderr)"
    results: list[dict[str, torch.Tensor]] = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]
    return results
