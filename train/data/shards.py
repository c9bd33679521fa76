"""Pack rendered object folders into webdataset tar shards, and stream them back.

One object = one webdataset sample: key = the folder name (uid), members
``<uid>.cameras.json``, ``<uid>.target_00.png``, ... exactly the folder's files, so a shard
sample reads with the same ``format.read_views`` as a folder.

    python -m train.data.shards --folders renders --out shards/objects-%06d.tar --per-shard 1000

Shards are read from local paths or any URL webdataset's ``gopen`` opens (``pipe:aws s3
cp s3://bucket/objects-000001.tar -``, ``http://...``).
"""

from __future__ import annotations

import argparse
import logging
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import format as fmt

logger = logging.getLogger(__name__)


def object_folders(root: str | Path) -> list[Path]:
    """The object folders under ``root`` (sorted; complete or not: readers skip broken ones).
    ``root`` may join several data folders with '::' (as shard lists do), e.g. two renders of
    the procedural objects with and without ``--upright``: their folders, root by root."""
    found: list[Path] = []
    for part in str(root).split("::"):
        folder = Path(part)
        if not part or not folder.is_dir():
            among = f" (one of the '::'-joined {str(root)!r})" if "::" in str(root) else ""
            raise ValueError(
                f"data folder {part or repr(part)}{among} does not exist; render objects there first "
                "(train/render/launch.py)."
            )
        found += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    return found


def pack_shards(folders: Iterable[Path], pattern: str, per_shard: int = 1000) -> dict[str, int]:
    """Write complete folders into shards named by ``pattern % shard_index``; skip incomplete ones."""
    import webdataset as wds

    if "%" not in pattern:
        raise ValueError(f"shard pattern {pattern!r} needs a %-field for the shard number, e.g. 'objects-%06d.tar'.")
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    counts = {"packed": 0, "skipped": 0}
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for folder in folders:
            if "." in folder.name or not fmt.is_complete(folder):
                logger.warning("not packing %s: incomplete folder or a '.' in its name", folder)
                counts["skipped"] += 1
                continue
            sink.write({"__key__": folder.name, **fmt.folder_files(folder)})
            counts["packed"] += 1
        counts["shards"] = sink.shard
    return counts


def expand_urls(spec: str) -> list[str]:
    """Brace-expand a shard spec ('a-{000000..000009}.tar', several joined by '::')."""
    from webdataset.shardlists import expand_urls as _expand

    urls = _expand(spec)
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards.")
    return urls


def iter_shard(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(uid, files) per sample of one shard; a truncated or unreadable shard ends early (logged)."""
    from webdataset.gopen import gopen

    key, files = None, {}
    try:
        with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = Path(member.name).name
                uid, _, field = name.partition(".")
                if uid != key and files:
                    yield key, files
                    files = {}
                key = uid
                files[field] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, ValueError) as err:
        logger.warning("shard %s is unreadable after %s: %s", url, key, err)
        return
    if files:
        yield key, files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Pack rendered object folders into webdataset shards.")
    p.add_argument("--folders", required=True, type=Path, help="folder of rendered object folders")
    p.add_argument("--out", required=True, help="shard pattern, e.g. shards/objects-%%06d.tar")
    p.add_argument("--per-shard", type=int, default=1000)
    args = p.parse_args(argv)
    try:
        folders = object_folders(args.folders)
    except ValueError as err:
        p.error(f"--folders: {err}")
    print(pack_shards(folders, args.out, args.per_shard))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
