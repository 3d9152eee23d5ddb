"""Mistakes visible before a run starts: refused in one line by the pre-flight check, before Hydra
creates the run directory; repeated overrides; console noise of a real run."""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from sapiens.config import ConfigError
from sapiens.errors import user_error
from sapiens.preflight import preflight
from sapiens.resume import CheckpointError
from tests.conftest import TINY, TINY_POSE_DEMO, overridden, run_train
from tests.faults import RunsCode
from tests.test_configs import compose_cfg


def checked(overrides: list[str], run_dir: Path) -> None:
    preflight(compose_cfg([*overrides, f"paths.run_dir={run_dir}"]))


def message(excinfo) -> str:
    """The one line train.py prints for the raised error (None would mean: a traceback)."""
    report = user_error(excinfo.value)
    assert report is not None, f"{excinfo.value!r} would print a traceback"
    assert "\n" not in report[0]
    return report[0]


def test_data_batch_size_is_reported_under_the_key_typed(pretrain_data_root, tmp_path):
    with pytest.raises(ConfigError) as err:
        checked(["data.batch_size=abc", f"data.root={pretrain_data_root}"], tmp_path / "run")
    assert message(err).startswith("config key 'data.batch_size':")


def test_pose_patch_size_that_does_not_fit_the_heatmaps_is_refused(tmp_path):
    args = ["experiment=pose_demo", "model=vit_tiny", "task.image_size=[64,48]"]  # pose_demo: one deconv
    with pytest.raises(ConfigError) as err:
        checked([*args, "model.backbone.patch_size=16"], tmp_path / "run")
    line = message(err)
    assert line.startswith("config key 'model.backbone.patch_size': 16 makes the pose head produce 8x6")
    assert "targets of 64x48 images are 16x12" in line and "use patch_size 8, or 2 deconvolutions" in line


@pytest.mark.parametrize(
    "data,hint",
    [
        (["data=synthhumans"], "python -m data.synthhumans.shards --root "),
        (
            ["data=shards", "data.train_shards='/nowhere/shard-{000000..000003}.tar'"],
            "python -m data.make_shards images",
        ),
    ],
)
def test_missing_data_says_how_to_make_it(tmp_path, data, hint):
    with pytest.raises(FileNotFoundError) as err:
        checked([*data, f"paths.data_dir={tmp_path / 'none'}"], tmp_path / "run")
    line = message(err)
    assert line.startswith("data.train_shards:") and hint in line


@pytest.mark.parametrize("kind", ["text", "pickle"])
def test_ckpt_path_and_init_from_that_are_not_checkpoints(pretrain_data_root, synth_root, tmp_path, kind):
    marker = tmp_path / "code_ran"
    bad = tmp_path / f"{kind}.ckpt"
    if kind == "text":
        bad.write_text("this is not a checkpoint\n" * 4)
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": RunsCode(marker)}, bad, pickle_protocol=2)
    expected = "a text file" if kind == "text" else "could run arbitrary code"
    with pytest.raises(CheckpointError) as err:
        checked([f"data.root={pretrain_data_root}", f"ckpt_path={bad}"], tmp_path / "a")
    line = message(err)
    assert line.startswith(f"ckpt_path={bad}: cannot read checkpoint") and expected in line
    pose = [*TINY_POSE_DEMO, "task.image_size=[64,48]", f"data.root={synth_root}"]
    with pytest.raises(ConfigError) as err:
        checked([*pose, f"task.init_from={bad}"], tmp_path / "b")
    line = message(err)
    assert line.startswith("config key 'task.init_from': cannot read checkpoint") and expected in line
    assert "weights_only=False" not in line and not marker.exists()
    with pytest.raises(pickle.UnpicklingError if kind == "pickle" else Exception):
        torch.load(bad, weights_only=True)  # the file really is what the test says


def test_unwritable_outputs_are_refused_before_training(pretrain_data_root, tmp_path):
    base = [f"data.root={pretrain_data_root}"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OSError) as err:
        checked(base, a_file / "pretrain" / "r")
    assert (
        message(err)
        == f"the run directory {a_file / 'pretrain' / 'r'} cannot be a folder: {a_file} is a file"
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("x")
    with pytest.raises(OSError) as err:
        checked(base, run_dir)
    assert "the checkpoint folder" in message(err) and f"{run_dir / 'checkpoints'} is a file" in message(err)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write in: a read-only tmpfs (root ignores permission bits), else chmod."""
    folder = tmp_path / "ro"
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True
    )
    if done.returncode != 0:
        folder.chmod(0o555)
        probe = folder / "probe"
        try:
            probe.touch()
        except PermissionError:
            pass
        else:
            pytest.skip(f"cannot make a read-only folder here (mount: {done.stderr.decode().strip()})")
    yield folder
    if done.returncode == 0:
        subprocess.run(["umount", "-l", str(folder)], check=False)
    folder.chmod(0o755)


def test_read_only_output_dir_is_refused(pretrain_data_root, read_only_dir):
    with pytest.raises(OSError) as err:
        checked([f"data.root={pretrain_data_root}"], read_only_dir / "pretrain" / "r")
    line = message(err)
    assert line.startswith(f"the run directory {read_only_dir / 'pretrain' / 'r'} is not writable")
    assert str(read_only_dir) in line


# -- through train.py ---------------------------------------------------------------------------
@pytest.mark.slow
def test_refused_run_leaves_no_run_directory_and_no_wandb_run(tmp_path):
    proc = run_train(
        [
            *TINY,
            f"data.root={tmp_path / 'nowhere'}",
            f"paths.output_dir={tmp_path / 'runs'}",
            "logger=default",
        ],
        check=False,
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "python -m data.synthhumans.shards --root" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before Hydra made the run directory


@pytest.mark.slow
def test_repeated_overrides(tmp_path):
    """What bash makes of an unquoted brace pattern: one override per shard. Shard keys take them
    all as a list; any other key given twice with different values is refused."""
    shards = [f"data.train_shards=/d/shard-00000{i}.tar" for i in range(4)]
    proc = run_train(["--cfg", "job", "data=shards", *shards, "data.val_shards=/v/a.tar"])
    listed = proc.stdout.split("train_shards:")[1].split("val_shards:")[0]
    assert [ln.strip() for ln in listed.strip().splitlines()] == [
        f"- /d/shard-00000{i}.tar" for i in range(4)
    ]
    proc = run_train(["data.batch_size=8", "data.batch_size=16", f"paths.output_dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0].startswith(
        "error: config key 'data.batch_size' is given 2 times (8, 16)"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_console_holds_what_matters(pretrain_data_root, tmp_path):
    extra = [
        f"data.root={pretrain_data_root}",
        f"paths.output_dir={tmp_path}",
        "logger=csv",
        "trainer.max_steps=2",
    ]
    proc = run_train(overridden(TINY, "trainer.enable_model_summary=true", *extra))
    out = proc.stdout + proc.stderr
    for noise in (
        "`srun` command is available",
        "litlogger",
        "on_after_batch_transfer",
        "Total Flops",
        "TPU",
    ):
        assert noise not in out, noise
    for kept in ("GPU available: False", "Total params", "effective batch 8", "max_steps="):
        assert kept in out, kept
