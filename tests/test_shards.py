"""Shard writer, shard spec expansion, readers and the train / eval shard pipelines."""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg
import torch

from sapiens.data.collate import collate_dicts
from sapiens.data.readers import READERS, CorruptSampleError
from sapiens.data.shard_urls import expand_shards
from sapiens.data.shard_writer import open_shard_writer
from sapiens.data.shards import build_eval_pipeline, build_train_pipeline


def noise_jpeg(rng: np.random.Generator, h: int = 24, w: int = 32) -> bytes:
    return simplejpeg.encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), quality=90)


def make_pretrain_shards(
    out: Path,
    counts: list[int],
    prefix: str = "shard",
    seed: int = 0,
    corrupt: set[int] = frozenset(),
    key_prefix: str = "s",
) -> list[str]:
    """One shard per entry of ``counts``; sample keys ``{key_prefix}{global index:05d}``;
    indices in ``corrupt`` get garbage bytes as ``jpg``. Returns the shard paths."""
    rng = np.random.default_rng(seed)
    paths, index = [], 0
    for shard, count in enumerate(counts):
        with open_shard_writer(out, prefix=f"{prefix}{shard}", progress=False, verbose=False) as s:
            for _ in range(count):
                jpg = b"\xff\xd8\xffnot a jpeg" if index in corrupt else noise_jpeg(rng)
                s.write({"__key__": f"{key_prefix}{index:05d}", "jpg": jpg})
                index += 1
        paths.extend(s.summary.paths)
    return paths


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def tar_members(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def tar_counts(paths) -> list[int]:
    return [len(tar_members(p)) for p in paths]


# -- writer ---------------------------------------------------------------------------------
def test_writer_rolls_over_by_count_and_reports(tmp_path):
    rng = np.random.default_rng(1)
    with open_shard_writer(tmp_path, max_count=10, progress=False) as sink:
        for i in range(25):
            sink.write({"__key__": f"{i:04d}", "jpg": noise_jpeg(rng), "json": json.dumps({"i": i})})
        sink.skip("unreadable thing")
    summary = sink.summary
    assert summary.shards == 3 and summary.samples == 25 and summary.skipped == 1
    assert [Path(p).name for p in summary.paths] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert tar_counts(summary.paths) == [20, 20, 10]  # two files per sample
    assert summary.bytes == sum(m.size for p in summary.paths for m in tar_members(p))
    assert summary.samples_per_s > 0 and not list(tmp_path.glob("*.tmp"))


def test_writer_rolls_over_by_size(tmp_path):
    payload = 20_000
    limit_mb = 50_000 / 2**20
    with open_shard_writer(tmp_path, max_size_mb=limit_mb, progress=False) as sink:
        for i in range(10):
            sink.write({"__key__": f"k{i}", "bin": bytes(payload)})
    counts = tar_counts(sink.summary.paths)
    assert sum(counts) == 10 and len(counts) > 1
    for count in counts[:-1]:  # a shard closes as soon as it reaches the limit
        assert count * payload >= 50_000 > (count - 1) * payload


def test_writer_interrupted_leaves_only_complete_shards(tmp_path):
    with pytest.raises(KeyboardInterrupt), open_shard_writer(tmp_path, max_count=3) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "bin": b"x"})
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]
    assert tar_counts([tmp_path / "shard-000000.tar"]) == [3]


def test_writer_rejects_bad_keys_and_existing_shards(tmp_path):
    with pytest.raises(ValueError, match="contains '.'"), open_shard_writer(tmp_path) as sink:
        sink.write({"__key__": "img.001", "jpg": b"x"})
    make_pretrain_shards(tmp_path / "x", [2])
    with (
        pytest.raises(FileExistsError, match="already holds"),
        open_shard_writer(tmp_path / "x", prefix="shard0"),
    ):
        pass


# -- shard specs ----------------------------------------------------------------------------
def test_expand_shards_patterns_lists_and_files(tmp_path):
    paths = make_pretrain_shards(tmp_path, [1, 1, 1], prefix="p")
    names = [Path(p).name for p in paths]
    assert expand_shards(str(tmp_path / "p{0..2}-000000.tar")) == paths
    assert expand_shards(paths[:2]) == paths[:2]
    assert expand_shards(f"{paths[0]}::{paths[2]}") == [paths[0], paths[2]]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my shards\n{names[0]}\n\n{tmp_path}/p{{1..2}}-000000.tar\n")
    assert expand_shards(str(listing)) == paths
    assert expand_shards(str(tmp_path)) == sorted(paths)
    remote = ["http://host/a-{0..1}.tar", "pipe:curl -s http://host/{x}.tar"]
    assert expand_shards(remote) == ["http://host/a-0.tar", "http://host/a-1.tar", remote[1]]


def test_expand_shards_errors_name_the_problem(tmp_path):
    make_pretrain_shards(tmp_path, [1, 1], prefix="p")
    pattern = str(tmp_path / "p{0..4}-000000.tar")
    with pytest.raises(FileNotFoundError, match=r"3 of 5 shards are missing") as err:
        expand_shards(pattern)
    assert "p2-000000.tar" in str(err.value) and pattern in str(err.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="matches no shard"):
        expand_shards(str(empty))
    with pytest.raises(ValueError, match="empty"):
        expand_shards([])


# -- readers and collate ----------------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_readers_decode_every_shard_type():
    rng = np.random.default_rng(2)
    h, w = 24, 32
    jpg = noise_jpeg(rng, h, w)
    seg = rng.integers(0, 28, (h, w), dtype=np.uint8)
    depth = rng.random((h, w)).astype(np.float32)
    normal = rng.random((h, w, 3)).astype(np.float32)
    mask = (rng.random((h, w)) > 0.5).astype(np.uint8) * 255
    person = {"id": 7, "bbox": [1, 2, 10, 12], "area": 90.0, "keypoints": [[3, 4, 2]] * 17}
    meta = {"image_id": 5, "file_name": "a.jpg", "width": w, "height": h, "persons": [person]}
    base = {"__key__": "k", "jpg": jpg}
    pose = READERS["pose"]({**base, "json": json.dumps(meta).encode()})
    assert pose["image"].shape == (h, w, 3) and pose["image"].dtype == np.uint8
    assert pose["image_id"] == 5 and pose["persons"][0]["keypoints"].shape == (17, 3)
    assert pose["persons"][0]["bbox"].dtype == np.float32
    out = READERS["seg"]({**base, "seg.png": _png(seg)})
    np.testing.assert_array_equal(out["seg"], seg)
    out = READERS["depth"]({**base, "depth.npy": _npy(depth), "mask.png": _png(mask)})
    np.testing.assert_array_equal(out["depth"], depth)
    np.testing.assert_array_equal(out["mask"], mask > 0)
    out = READERS["normal"]({**base, "normal.npy": _npy(normal), "mask.png": _png(mask)})
    assert out["normal"].shape == (h, w, 3) and out["mask"].dtype == bool
    png_image = READERS["pretrain"]({"__key__": "p", "jpg": _png(seg[..., None].repeat(3, 2))})
    np.testing.assert_array_equal(png_image["image"][..., 0], seg)  # PNG content via cv2


def test_readers_raise_corrupt_sample_error_with_key():
    rng = np.random.default_rng(3)
    jpg = noise_jpeg(rng, 24, 32)
    cases = [
        ("pretrain", {"__key__": "a", "jpg": b"garbage"}, "not a decodable image"),
        ("pretrain", {"__key__": "b", "png.txt": b"x"}, "missing entry 'jpg'"),
        ("seg", {"__key__": "c", "jpg": jpg, "seg.png": _png(np.zeros((5, 5), np.uint8))}, "shape"),
        ("depth", {"__key__": "d", "jpg": jpg, "depth.npy": b"nope", "mask.png": b""}, ".npy"),
        ("pose", {"__key__": "e", "jpg": jpg, "json": b"{not json"}, "JSON"),
    ]
    for reader, sample, reason in cases:
        with pytest.raises(CorruptSampleError, match=reason) as err:
            READERS[reader](sample)
        assert err.value.key == sample["__key__"] and repr(sample["__key__"]) in str(err.value)


def test_collate_stacks_tensors_numbers_and_keeps_the_rest():
    samples = [
        {"t": torch.ones(2, 3), "a": np.zeros(4, np.uint8), "i": 3, "f": 0.5, "s": "x", "r": [1]},
        {"t": torch.zeros(2, 3), "a": np.ones(4, np.uint8), "i": 4, "f": 1.5, "s": "y", "r": []},
    ]
    batch = collate_dicts(samples)
    assert batch["t"].shape == (2, 2, 3) and batch["a"].dtype == torch.uint8
    assert batch["i"].dtype == torch.int64 and batch["i"].tolist() == [3, 4]
    assert batch["f"].dtype == torch.float32 and batch["s"] == ["x", "y"] and batch["r"] == [[1], []]
    with pytest.raises(ValueError, match="different keys"):
        collate_dicts([{"a": 1}, {"b": 1}])


# -- pipelines: errors are skipped and counted --------------------------------------------------
def _truncate_inside_member(path: str, member_index: int) -> None:
    member = tar_members(path)[member_index]
    cut = member.offset_data + member.size // 2
    data = Path(path).read_bytes()[:cut]
    Path(path).write_bytes(data)


def test_corrupt_sample_and_truncated_tar_are_skipped_and_counted(tmp_path):
    good = make_pretrain_shards(tmp_path, [6], prefix="a", corrupt={2})
    trunc = make_pretrain_shards(tmp_path, [6], prefix="b", seed=1, key_prefix="t")
    _truncate_inside_member(trunc[0], 3)  # samples 0..2 complete, 3 cut in the middle
    for workers in (0, 2):
        loader = build_eval_pipeline(good + trunc, batch_size=4, num_workers=workers)
        batches = list(loader)
        expected = [f"s{i:05d}" for i in (0, 1, 3, 4, 5)] + [f"t{i:05d}" for i in range(3)]
        assert sorted(keys_of(batches)) == expected
        assert sum(int(b["num_skipped"]) for b in batches) == 2  # 1 corrupt jpg + 1 tar error
        assert all(b["num_skipped"].dtype == torch.int64 and b["num_skipped"].ndim == 0 for b in batches)
    train = build_train_pipeline(good + trunc, 2, epoch_length=6, num_workers=2, shuffle_buffer=3)
    batches = list(train)
    assert len(batches) == 6 and sum(int(b["num_skipped"]) for b in batches) >= 1


def test_unreadable_shard_list_raises_instead_of_hanging(tmp_path):
    bad = make_pretrain_shards(tmp_path, [3, 3], corrupt=set(range(6)))
    with pytest.raises(RuntimeError, match="yielded 0 batches"):
        list(build_eval_pipeline(bad, batch_size=2, num_workers=0))
    loader = build_train_pipeline(bad, 2, epoch_length=3, num_workers=0, max_consecutive_skips=50)
    with pytest.raises(RuntimeError, match="in a row were skipped"):
        list(loader)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 10)
    loader = build_train_pipeline(str(junk), 2, epoch_length=3, num_workers=0)
    with pytest.raises(RuntimeError):
        list(loader)


def test_transform_lists_are_flattened_and_none_dropped(tmp_path):
    shards = make_pretrain_shards(tmp_path, [5])

    def two_or_none(sample):
        return None if sample["key"] == "s00000" else [{"k": sample["key"]}, {"k": "copy"}]

    batches = list(build_eval_pipeline(shards, 3, sample_transform=two_or_none, num_workers=0))
    assert [len(b["k"]) for b in batches] == [3, 3, 2]
    assert Counter(k for b in batches for k in b["k"])["copy"] == 4


# -- pipelines: epochs, seeds, ranks --------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resampled", [True, False])
def test_train_epoch_length_is_exact(tmp_path, workers, resampled):
    shards = make_pretrain_shards(tmp_path, [7, 5, 9, 3])
    loader = build_train_pipeline(
        shards, 3, epoch_length=5, resampled=resampled, num_workers=workers, shuffle_buffer=4
    )
    assert len(loader) == 5
    for _ in range(2):  # two epochs
        batches = list(loader)
        assert len(batches) == 5 and all(b["image"].shape == (3, 24, 32, 3) for b in batches)


def test_same_seed_and_epoch_repeat_the_stream(tmp_path):
    shards = make_pretrain_shards(tmp_path, [8, 8, 8])

    def first_keys(epoch, seed=0):
        loader = build_train_pipeline(shards, 4, 2, num_workers=2, seed=seed, shuffle_buffer=8)
        loader.set_epoch(epoch)
        return next(iter(loader))["key"]

    assert first_keys(3) == first_keys(3)
    assert first_keys(3) != first_keys(4)
    assert first_keys(3) != first_keys(3, seed=1)


@pytest.mark.parametrize("resampled", [True, False])
def test_simulated_ranks_get_equal_batch_counts_with_uneven_shards(tmp_path, resampled):
    shards = make_pretrain_shards(tmp_path, [2, 11, 3, 9, 1])
    per_rank = []
    for rank in range(2):
        loader = build_train_pipeline(
            shards, 2, 6, resampled=resampled, num_workers=2, rank=rank, world_size=2
        )
        per_rank.append(keys_of(list(loader)))
    assert [len(k) for k in per_rank] == [12, 12]
    if not resampled:  # shard-split: the ranks read disjoint shards within a pass
        first_pass = [set(keys) for keys in per_rank]
        assert first_pass[0] != first_pass[1]


def test_eval_covers_every_sample_once_across_ranks_and_workers(tmp_path):
    counts = [3, 5, 2, 4, 6]
    shards = make_pretrain_shards(tmp_path, counts)
    seen = []
    for rank in range(2):
        loader = build_eval_pipeline(shards, 4, num_workers=2, rank=rank, world_size=2)
        seen.extend(keys_of(list(loader)))
    assert sorted(seen) == [f"s{i:05d}" for i in range(sum(counts))]
    with pytest.raises(ValueError, match="at least one shard per rank"):
        build_eval_pipeline(shards[:1], 4, rank=0, world_size=2)


# -- remote sources -------------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_and_pipe_sources_are_read(tmp_path):
    shards = make_pretrain_shards(tmp_path, [4, 3])
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        port = server.server_address[1]
        urls = [f"http://127.0.0.1:{port}/{Path(p).name}" for p in shards]
        batches = list(build_eval_pipeline(urls, 3, num_workers=0))
        assert sorted(keys_of(batches)) == [f"s{i:05d}" for i in range(7)]
        missing = [urls[0], f"http://127.0.0.1:{port}/missing.tar"]
        batches = list(build_eval_pipeline(missing, 8, num_workers=0))
        assert len(keys_of(batches)) == 4 and sum(int(b["num_skipped"]) for b in batches) >= 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    piped = [f"pipe:cat {p}" for p in shards]
    batches = list(build_train_pipeline(piped, 2, epoch_length=5, num_workers=2))
    assert len(batches) == 5
