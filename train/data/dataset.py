"""The training dataset: per object, k condition views and a random subset of the 32 targets.

Determinism is the design constraint (DDP equivalence and exact resume are tested):

* Each rank reads its own stream of samples, indexed by its local position ``s``. With
  object folders (random access) position ``s`` of rank ``r`` is the global sample
  ``g = s * world_size + r``: object ``perm_epoch[g % N]``, epoch ``g // N``. So a global
  batch holds the same samples for any split over ranks.
* All randomness of a sample (which targets survive view dropout, which condition views,
  and the training noise: ``sample_seed``) derives from the base seed and ``g``; the number
  of condition views ``k`` derives from the batch index, so a batch stacks and every rank
  agrees.
* DataLoader workers each produce whole batches in round-robin order (batch ``b`` comes from
  worker ``(b - start_batch) % num_workers``), so the order does not depend on the worker count,
  and resuming at batch ``start_batch`` continues exactly.
* A missing or corrupt file never crashes: that object is skipped, logged and counted; the
  item that replaces it reports ``skipped`` so the trainer can sum and log them.

Shards stream sequentially: rank ``r`` reads shards ``r, r + W, ...`` (every shard, taking
every W-th sample, when there are fewer shards than ranks), epoch-shuffled by shard;
resume skips the consumed samples without decoding them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from mvdpp_core.common import composite_on_white

from ..config import ConfigError, DataConfig
from . import format as fmt
from .shards import expand_urls, iter_shard, object_folders

logger = logging.getLogger(__name__)
_MASK64 = 2**64 - 1


def mix_seed(*values: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64 chain): stable across runs and ranks."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & (2**63 - 1)


@dataclass(frozen=True)
class ViewSampling:
    """How many views an item holds. ``k`` is 1 with ``single_view_prob``, else uniform in
    2..max_cond_views (the paper's stage 3: 0.5 and 10)."""

    num_targets: int = 8
    single_view_prob: float = 1.0
    max_cond_views: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.num_targets <= fmt.NUM_TARGETS:
            raise ValueError(
                f"num_targets={self.num_targets}; allowed 1..{fmt.NUM_TARGETS} (8 = the paper's view dropout)."
            )
        if not 1 <= self.max_cond_views <= 10:
            raise ValueError(f"max_cond_views={self.max_cond_views}; allowed 1..10.")
        if not 0.0 <= self.single_view_prob <= 1.0:
            raise ValueError(f"single_view_prob={self.single_view_prob}; allowed 0..1.")

    def cond_count(self, seed: int, batch_index: int) -> int:
        g = torch.Generator().manual_seed(mix_seed(seed, 1, batch_index))
        if self.max_cond_views < 2 or torch.rand((), generator=g) < self.single_view_prob:
            return 1
        return int(torch.randint(2, self.max_cond_views + 1, (), generator=g))


def choose_views(doc: dict, num_targets: int, k: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Random surviving targets (sorted rig indices) and k condition views, cond_00 first
    (it defines azimuth 0); with fewer rendered views than k, the rest repeat at random."""
    targets = sorted(torch.randperm(fmt.NUM_TARGETS, generator=generator)[:num_targets].tolist())
    others = len(doc["conditions"]) - 1
    if k - 1 <= others:
        extra = (torch.randperm(others, generator=generator)[: k - 1] + 1).tolist()
    else:
        extra = torch.randint(1, others + 1, (k - 1,), generator=generator).tolist() if others else [0] * (k - 1)
    return targets, [0] + extra


def to_tensors(rgba: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, H, W, 4) uint8 -> RGB on white (v, 3, size, size) and mask (v, 1, size, size), in [0, 1]."""
    x = torch.from_numpy(np.array(rgba)).permute(0, 3, 1, 2).float() / 255  # v 4 H W (a writable copy)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    rgb, alpha = x[:, :3], x[:, 3:].clamp(0, 1)
    return composite_on_white(rgb, alpha).clamp(0, 1), alpha


def data_source(folders: str, shards: str) -> tuple[list[Path], list[str]]:
    """The object folders or the shard URLs of a data config: exactly one source, and not empty."""
    if bool(folders) == bool(shards):
        raise ValueError(f"give exactly one data source: folders={folders!r}, shards={shards!r}.")
    found = object_folders(folders) if folders else []
    if folders and not found:
        raise ValueError(f"data folder {folders} holds no object folders; render objects there first "
                         "(train/render/launch.py, or python -m train.procedural.generate).")
    return found, expand_urls(shards) if shards else []


def check_data(data: DataConfig) -> None:
    """A trainer's data config, checked before anything is built: a missing or empty source is a
    config error (one line naming the key), not a traceback from the first batch."""
    key, value = ("data.shards", data.shards) if data.shards else ("data.folders", data.folders)
    try:
        data_source(data.folders, data.shards)
    except ValueError as err:
        raise ConfigError(f"{key}={value!r}: {err}") from None


class MultiViewDataset(IterableDataset):
    """Endless stream of training items from object folders or webdataset shards.

    Each item: ``target_rgb`` (t, 3, S, S), ``target_mask`` (t, 1, S, S), ``target_ids`` (t,),
    ``cond_rgb`` (k, 3, S, S), ``cond_mask`` (k, 1, S, S), ``sample_seed``, ``skipped``.
    """

    def __init__(
        self,
        *,
        folders: str = "",
        shards: str = "",
        image_size: int,
        sampling: ViewSampling,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        self.folders, self.urls = data_source(folders, shards)
        self.image_size, self.sampling, self.batch_size = image_size, sampling, batch_size
        self.seed, self.rank, self.world_size, self.start_batch = seed, rank, world_size, start_batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        stream = self._folder_stream() if self.folders else self._shard_stream()
        for batch_index in itertools.count(self.start_batch):
            mine = (batch_index - self.start_batch) % workers == worker
            k = self.sampling.cond_count(self.seed, batch_index)
            for j in range(self.batch_size):
                item = stream(batch_index * self.batch_size + j, k, decode=mine)
                if mine:
                    yield item

    def _item(self, views: fmt.ObjectViews, sample_seed: int, skipped: int) -> dict:
        target_rgb, target_mask = to_tensors(views.target_rgba, self.image_size)
        cond_rgb, cond_mask = to_tensors(views.cond_rgba, self.image_size)
        return {
            "target_rgb": target_rgb,
            "target_mask": target_mask,
            "target_ids": torch.tensor(views.target_ids),
            "cond_rgb": cond_rgb,
            "cond_mask": cond_mask,
            "sample_seed": sample_seed,
            "skipped": skipped,
        }

    def _selector(self, sample_seed: int, k: int) -> fmt.Selector:
        generator = torch.Generator().manual_seed(mix_seed(sample_seed, 2))
        return lambda doc: choose_views(doc, self.sampling.num_targets, k, generator)

    def _folder_stream(self):
        n = len(self.folders)
        perms: dict[int, list[int]] = {}

        def object_at(epoch: int, position: int) -> Path:
            if epoch not in perms:
                perms.clear()
                perms[epoch] = torch.randperm(
                    n, generator=torch.Generator().manual_seed(mix_seed(self.seed, 3, epoch))
                ).tolist()
            return self.folders[perms[epoch][position]]

        def read(s: int, k: int, decode: bool) -> dict | None:
            if not decode:
                return None
            g = s * self.world_size + self.rank
            sample_seed = mix_seed(self.seed, 4, g)
            # A broken object is replaced by the next one in the same epoch's order, wrapping
            # around: the n attempts visit every object once, so a readable one is always found.
            for attempt in range(n):
                folder = object_at(g // n, (g + attempt) % n)
                try:
                    views = fmt.read_object_folder(folder, select=self._selector(sample_seed, k))
                    return self._item(views, sample_seed, attempt)
                except fmt.ObjectReadError as err:
                    logger.warning("skipping object %s: %s", folder.name, err)
            raise RuntimeError(
                f"none of the {n} object folders is readable; check the data folder and the warnings above."
            )

        return read

    def _shard_stream(self):
        samples = self._rank_samples()
        for _ in range(self.start_batch * self.batch_size):  # resume: skip consumed samples undecoded
            next(samples)

        def read(s: int, k: int, decode: bool) -> dict | None:
            skipped = 0
            while True:
                uid, files = next(samples)
                if not decode:
                    return None
                sample_seed = mix_seed(self.seed, 5, self.rank, s)
                try:
                    views = fmt.read_views(uid, files.__getitem__, select=self._selector(sample_seed, k))
                    return self._item(views, sample_seed, skipped)
                except fmt.ObjectReadError as err:
                    logger.warning("skipping shard sample %s: %s", uid, err)
                    skipped += 1

        return read

    def _rank_samples(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        """This rank's endless sample stream: its shards in a per-epoch shuffled order.

        With fewer shards than ranks every rank reads every shard and keeps every W-th sample.
        """
        few = len(self.urls) < self.world_size
        mine = list(range(len(self.urls))) if few else list(range(self.rank, len(self.urls), self.world_size))
        counter = 0
        for epoch in itertools.count():
            order = torch.randperm(len(mine), generator=torch.Generator().manual_seed(mix_seed(self.seed, 6, epoch)))
            yielded = False
            for i in order.tolist():
                for sample in iter_shard(self.urls[mine[i]]):
                    counter += 1
                    if few and (counter - 1) % self.world_size != self.rank:
                        continue
                    yielded = True
                    yield sample
            if not yielded:
                raise RuntimeError(f"rank {self.rank}: its shards {[self.urls[i] for i in mine]} hold no samples.")


def make_batches(dataset: MultiViewDataset, *, num_workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
    """Endless batches of ``dataset.batch_size`` items (workers keep the batch order)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset,
        batch_size=dataset.batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)


def first_object(*, folders: str = "", shards: str = "") -> fmt.ObjectViews:
    """All targets and the first condition view of the first readable object (validation)."""
    if folders:
        for folder in object_folders(folders):
            try:
                return fmt.read_object_folder(folder, cond_ids=[0])
            except fmt.ObjectReadError as err:
                logger.warning("validation: skipping %s: %s", folder.name, err)
    else:
        for url in expand_urls(shards):
            for uid, files in iter_shard(url):
                try:
                    return fmt.read_views(uid, files.__getitem__, cond_ids=[0])
                except fmt.ObjectReadError as err:
                    logger.warning("validation: skipping %s: %s", uid, err)
    raise RuntimeError("no readable object for validation in the configured data.")
