"""`make demo`'s data step: only the shards the demo reads, and a one-line error when the disk is short."""

import argparse

from experiments.demo import build_data


def _args(train_images: int, tasks: list[str]) -> argparse.Namespace:
    return argparse.Namespace(
        train_images=train_images, val_images=2, style="simple", max_people=1, tasks=tasks
    )


def test_writes_the_pretraining_and_the_chosen_tasks_shards_only(tmp_path):
    root = tmp_path / "synthhumans"
    assert build_data(_args(3, ["seg", "depth"]), root)
    written = sorted(p.name for p in (root / "shards").iterdir())
    assert written == ["depth", "pretrain", "seg"]
    for kind in written:
        for split in ("train", "val"):
            assert any((root / "shards" / kind / split).glob("*.tar")), (kind, split)


def test_refuses_up_front_when_the_disk_is_too_small(tmp_path, capsys):
    root = tmp_path / "synthhumans"
    assert not build_data(_args(10**9, ["seg"]), root)  # needs petabytes
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(root) in err and "--data-dir" in err
    assert not (root / "raw").exists()  # nothing rendered
