"""``compile=true`` through train.py on CPU (inductor): trains, logs compile time, saves the eager model's
keys, resumes, and runs under 2-process DDP.

Compilation on 2 CPU cores is slow (about a minute for the first process on a cold inductor cache,
seconds afterwards: the kernels are cached on disk), so the runs are a few steps of the tiny model
without validation. The DDP run compiles with ``aot_eager`` (dynamo and AOTAutograd, no code
generation): what meets DDP's gradient hooks is the same, and two processes compiling C++ kernels on
two cores would take minutes.
"""

import pytest
import torch

from sapiens.lit.pretrain import MAEPretrainModule
from tests.conftest import TINY, overridden, run_train
from tests.test_train_e2e import column, read_metrics

pytestmark = pytest.mark.slow

COMPILED = overridden(
    TINY, "compile=true", "validate_after_fit=false", "trainer.limit_val_batches=0", "logger=csv"
)


def test_compiled_training_saves_plain_keys_and_resumes(pretrain_data_root, tmp_path):
    common = [*COMPILED, f"data.root={pretrain_data_root}", f"paths.output_dir={tmp_path}", "run_name=c"]
    run_train([*common, "trainer.max_steps=3"], timeout=600)
    run_train([*common, "trainer.max_steps=6"], timeout=600)  # same run directory: resumes at step 3
    run_dir = tmp_path / "pretrain" / "c"
    log = (run_dir / "train.rank0.log").read_text()
    assert log.count("torch.compile (torch") == 2 and "3 regions" in log
    assert log.count("compile: first 2 steps took") == 2  # both processes log their compile time
    assert "restoring the training state of global step 3" in log
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert not any("_orig_mod" in key for key in ckpt["state_dict"])
    MAEPretrainModule.load_from_checkpoint(last, map_location="cpu")  # strict: the eager module's keys
    rows = read_metrics(run_dir)
    losses = column(rows, "train/loss")
    assert len(losses) >= 5 and all(torch.isfinite(torch.tensor(losses)))
    assert column(rows, "perf/compile_s")[0] > 0


def test_compiled_training_under_ddp(pretrain_data_root, tmp_path):
    args = overridden(
        COMPILED,
        f"data.root={pretrain_data_root}",
        f"paths.output_dir={tmp_path}",
        "run_name=ddp",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_steps=3",
        "compile={backend: aot_eager}",
    )
    run_train(args, timeout=600)
    run_dir = tmp_path / "pretrain" / "ddp"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert not any("_orig_mod" in key for key in ckpt["state_dict"])
    assert "compile: first 2 steps took" in (run_dir / "train.rank0.log").read_text()
