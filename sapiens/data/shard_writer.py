"""Write WebDataset shards (``{prefix}-000000.tar``, ...) with roll-over, progress and a summary.

A shard is first written as ``{name}.tar.tmp`` and renamed to ``{name}.tar`` only once it is
complete, so an interrupted run never leaves a truncated tar under a final name: the shard that
was in progress is deleted, the finished ones stay valid and usable.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import webdataset as wds
from tqdm import tqdm

TMP_SUFFIX = ".tmp"


@dataclass
class ShardWriteSummary:
    """What a writer produced: counts, total bytes of payload, throughput and finished paths."""

    shards: int = 0
    samples: int = 0
    bytes: int = 0
    skipped: int = 0
    seconds: float = 0.0
    paths: list[str] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"wrote {self.samples} samples into {self.shards} shards "
            f"({self.bytes / 2**20:.1f} MiB payload) in {self.seconds:.1f} s "
            f"= {self.samples_per_s:.1f} samples/s; skipped {self.skipped}"
        )


class ShardSink:
    """Handle returned by :func:`open_shard_writer`; write samples or record skipped inputs."""

    def __init__(self, writer: wds.ShardWriter, bar: tqdm, summary: ShardWriteSummary):
        self._writer = writer
        self._bar = bar
        self.summary = summary

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample.

        Args:
            sample: ``{"__key__": str, ext: bytes | str | ...}``; keys share one basename inside
                the tar, so ``__key__`` must be unique in the dataset and must not contain ``.``
                (WebDataset splits the file name at the first dot of the basename).
        """
        key = sample.get("__key__")
        if not isinstance(key, str) or not key:
            raise ValueError(f"sample needs a non-empty string '__key__', got {key!r}")
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(
                f"sample key {key!r} contains '.', which WebDataset would read as an extension "
                "separator; replace dots in keys (e.g. with '_')"
            )
        self._writer.write(sample)
        self.summary.samples += 1
        self.summary.bytes += sum(_payload_size(v) for k, v in sample.items() if k[0] != "_")
        self._bar.update(1)

    def skip(self, reason: str = "") -> None:
        """Count an input that was not written (e.g. an undecodable image under ``--skip-bad``)."""
        self.summary.skipped += 1
        self._bar.update(1)
        self._bar.set_postfix(skipped=self.summary.skipped, refresh=False)
        if reason:
            tqdm.write(f"skipped: {reason}")


def _payload_size(value: Any) -> int:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    return len(value.encode("utf-8")) if isinstance(value, str) else 0


@contextlib.contextmanager
def open_shard_writer(
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    max_size_mb: float = 256.0,
    max_count: int = 100_000,
    total: int | None = None,
    desc: str = "writing shards",
    progress: bool = True,
    verbose: bool = True,
    overwrite: bool = False,
) -> Iterator[ShardSink]:
    """Open a rolling shard writer: ``with open_shard_writer(out) as sink: sink.write(sample)``.

    A new shard starts when the current one holds ``max_count`` samples or at least
    ``max_size_mb`` MiB of payload (checked before each write, so a shard can exceed the size by
    one sample). Shards are named ``{out_dir}/{prefix}-{index:06d}.tar``.

    Args:
        out_dir: output folder (created if needed).
        prefix: file name prefix; must not contain ``/``.
        max_size_mb: roll-over size in MiB (> 0).
        max_count: roll-over sample count (>= 1).
        total: expected number of inputs, for the progress bar only.
        desc: progress bar label.
        progress: show a tqdm bar.
        verbose: print the summary at close.
        overwrite: delete existing ``{prefix}-NNNNNN.tar`` (and ``.tmp``) files in ``out_dir``
            first; otherwise existing shards with this prefix are an error.

    Yields:
        A :class:`ShardSink`; its ``summary`` (a :class:`ShardWriteSummary`) is complete once the
        ``with`` block exits (also returned in ``sink.summary``).
    """
    if max_size_mb <= 0:
        raise ValueError(f"max_size_mb must be > 0, got {max_size_mb}")
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if "/" in prefix or not prefix:
        raise ValueError(f"prefix must be a non-empty file name prefix without '/', got {prefix!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name_glob = f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"
    existing = sorted(out.glob(name_glob))
    if overwrite:
        for path in [*existing, *out.glob(name_glob + TMP_SUFFIX)]:
            path.unlink()
    elif existing:
        raise FileExistsError(
            f"{out} already holds shards named {prefix}-NNNNNN.tar (e.g. {existing[0].name}); "
            "choose an empty output folder, another prefix, or overwrite"
        )

    summary = ShardWriteSummary()
    open_files: dict[str, IO[bytes]] = {}

    def opener(fname: str) -> IO[bytes]:
        handle = open(fname + TMP_SUFFIX, "wb")  # noqa: SIM115 - closed in `finished`
        open_files[fname] = handle
        return handle

    def finished(fname: str) -> None:
        open_files.pop(fname).close()
        os.replace(fname + TMP_SUFFIX, fname)
        summary.paths.append(fname)

    pattern = str(out / f"{prefix}-%06d.tar")
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    writer = wds.ShardWriter(
        pattern,
        maxcount=max_count,
        maxsize=max_size_mb * 2**20,
        post=finished,
        verbose=0,
        opener=opener,
    )
    sink = ShardSink(writer, bar, summary)
    try:
        yield sink
    except BaseException:
        # Drop the shard in progress; finished shards are complete tars and stay.
        with contextlib.suppress(Exception):
            writer.tarstream.close()  # flush tarfile's buffer now, not at garbage collection
        for fname, handle in open_files.items():
            handle.close()
            Path(fname + TMP_SUFFIX).unlink(missing_ok=True)
        open_files.clear()
        bar.close()
        raise
    wrote_any = writer.total > 0
    writer.close()
    bar.close()
    if not wrote_any:
        # ShardWriter opens shard 0 eagerly; an empty tar is not a useful shard.
        for path in summary.paths:
            Path(path).unlink(missing_ok=True)
        summary.paths.clear()
    summary.shards = len(summary.paths)
    summary.seconds = time.perf_counter() - start
    if verbose:
        print(summary)
        if summary.paths:
            print(f"shards: {brace_pattern(out, prefix, summary.shards)}")


def brace_pattern(out_dir: str | os.PathLike, prefix: str, num_shards: int) -> str:
    """The brace spec ``out/prefix-{000000..00000N}.tar`` naming ``num_shards`` (>= 1) shards."""
    if num_shards == 1:
        return f"{out_dir}/{prefix}-000000.tar"
    return f"{out_dir}/{prefix}-{{000000..{num_shards - 1:06d}}}.tar"
