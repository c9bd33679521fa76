"""View-parallel training: all 32 target views of an object, without view dropout.

The ranks are split into groups of ``parallel.view_group_size`` = N consecutive ranks. Every
rank of a group loads the same objects (the data is sharded over groups, not ranks), and
rank j of the group keeps the j-th near-equal share of each object's t + k views in layout
order (targets first, then the condition views, so the condition views land on the last
ranks): with 32 + 10 views over 8 ranks the shares are 5, 5, 5, 6, 5, 5, 5, 6
(``view_shares``). Global self-attention all-gathers keys and values over the group
(``mvdpp_core.attention.ViewShards``), so every query still sees all t + k views, and the
gather's backward returns each view's key/value gradients to the rank that owns the view.

Everything random is drawn for the whole object from its sample seed and then sliced (the
posterior sample, the training noise, the condition dropout), so a split run computes the
same numbers as one process holding every view. Each rank's loss is its views' part of the
object loss times N: DDP averages gradients over all W ranks, which is then the sum over a
group's ranks (the object's gradient) averaged over the W / N groups, i.e. data parallelism
over objects; the rank-mean of the logged loss is the object loss.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from mvdpp_core.attention import ViewShards

from .config import ParallelConfig


def view_shares(num_views: int, group_size: int) -> list[slice]:
    """Contiguous near-equal shares of ``num_views`` views over ``group_size`` ranks."""
    bounds = [num_views * j // group_size for j in range(group_size + 1)]
    return [slice(bounds[j], bounds[j + 1]) for j in range(group_size)]


def check_parallel(parallel: ParallelConfig, world_size: int, num_target_views: int) -> None:
    """Refuse a view group size that does not tile the ranks or leaves a rank without views."""
    n = parallel.view_group_size
    if n < 1 or world_size % n:
        raise ValueError(
            f"parallel.view_group_size={n} must be >= 1 and divide the number of processes ({world_size}); "
            f"use a divisor of {world_size} (e.g. 8 on one 8-GPU node), or 1 to turn view parallelism off."
        )
    if n > num_target_views:
        raise ValueError(
            f"parallel.view_group_size={n} exceeds data.num_target_views={num_target_views}: some ranks would "
            "hold no view. Raise data.num_target_views (32 = all views) or lower the group size."
        )


class ViewGroups:
    """This rank's place in the view-parallel layout: its group, and its data-parallel rank."""

    def __init__(self, parallel: ParallelConfig, rank: int, world_size: int):
        self.size = parallel.view_group_size
        self.rank_in_group = rank % self.size
        self.data_rank, self.data_world = rank // self.size, world_size // self.size
        self.group = None
        if self.size > 1:
            # new_group is collective: every rank creates every group, in the same order.
            groups = [dist.new_group(list(range(g * self.size, (g + 1) * self.size))) for g in range(self.data_world)]
            self.group = groups[self.data_rank]

    def shards(self, num_views: int) -> tuple[slice, ViewShards]:
        """This rank's views of an object with ``num_views`` views, and the gather spec."""
        shares = view_shares(num_views, self.size)
        return shares[self.rank_in_group], ViewShards(self.group, tuple(s.stop - s.start for s in shares))

    def batches(self, batches: Iterator[dict]) -> Iterator[dict]:
        """The group's shared batches; skipped objects counted on one rank of the group only."""
        for batch in batches:
            if self.rank_in_group:
                batch = {**batch, "skipped": torch.zeros_like(batch["skipped"])}
            yield batch
