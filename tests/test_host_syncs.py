"""No host-device sync in training steps between logging steps (what a GPU run would wait for).

``experiments.benchmarks.step_syncs`` records every call that blocks the host on a CUDA tensor
(``item``, ``tolist``, ``bool()``, ``.cpu()``, ``torch.tensor(..., device=...)``, ...) while the real
trainer runs; on CPU it tracks which tensors would live on the GPU. GPU-only syncs are checked by
``experiments.benchmarks.gpu_checks`` (``torch.cuda.set_sync_debug_mode``).
"""

import pytest
import torch

from experiments.benchmarks import step_syncs


def test_recorder_tells_device_reads_from_host_reads():
    recorder = step_syncs.SyncRecorder()
    device_tensor = torch.randn(3)  # made before recording: a parameter or a batch, on the GPU
    with recorder:
        device_tensor.sum().item()  # a sync on a GPU
        host = torch.tensor([1.0, 2.0])  # made on the host
        (host * 2).tolist()  # host arithmetic: no sync
        device_tensor.detach().cpu().tolist()  # the .cpu() is the sync, reading its copy is not
        torch.tensor(1.0, device=device_tensor.device)  # a copy from pageable host memory: a sync
    assert [name for _, _, name, _ in recorder.calls] == ["item", "cpu", "tensor"]
    assert all("test_host_syncs.py" in where for *_, where in recorder.calls)


@pytest.mark.slow
def test_training_steps_between_logging_steps_do_not_sync(pretrain_data_root, tmp_path):
    report = step_syncs.main(
        [
            "--steps",
            "10",
            "--log-every",
            "4",
            "--data-root",
            str(pretrain_data_root),
            "--work-dir",
            str(tmp_path),
        ]
    )
    assert report["other_steps"] == [], report["other_steps"]
    # logging steps do read values (the loss for the log and the progress bar): the recorder sees them
    assert any("log_train_loss" in where for _, (_, where) in report["logging_steps"])
