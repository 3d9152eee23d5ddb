"""The non-finite guard without host syncs, through the real Lightning trainer on CPU.

A non-finite loss leaves parameters and AdamW state untouched on that step (fused AdamW's
``found_inf``), is counted and logged (one step later, and at the end), and a run of them stops
training; callbacks' per-step flags reach ``step_flags`` one step after they were raised.
"""

import logging

import lightning as L
import pytest
import torch
from torch import nn

from sapiens.lit.base import NonFiniteLossError, SapiensModule


class Probe(SapiensModule):
    """A linear model whose loss is NaN at ``bad_steps`` (micro-batch index within the step
    ``bad_micro`` when accumulating); records the parameters before every step."""

    def __init__(self, bad_steps=(), bad_micro=0, flag_step=None, **kwargs):
        super().__init__(optimizer={"lr": 0.1, "weight_decay": 0.1}, schedule={"kind": "constant"}, **kwargs)
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.bad_steps, self.bad_micro, self.flag_step = set(bad_steps), bad_micro, flag_step
        self.before: dict[int, torch.Tensor] = {}
        self.seen_flags: dict[int, bool] = {}
        self.step_flag_sources["probe"] = lambda: self.global_step == self.flag_step

    def training_step(self, batch, batch_idx):
        self.before.setdefault(self.global_step, self.net.weight.detach().clone())
        loss = self.net(batch).pow(2).mean()
        micro = batch_idx % self.trainer.accumulate_grad_batches
        if self.global_step in self.bad_steps and micro == self.bad_micro:
            loss = loss * float("nan")
        return self.guard_loss(loss)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.seen_flags[batch_idx] = self.step_flags.pop("probe", False)  # like the Slurm callback


def fit(
    module: Probe, steps: int, accumulate: int = 1, callbacks=(), precision="32-true", clip=1.0
) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        precision=precision,
        gradient_clip_val=clip,  # clipping a NaN gradient must not leak into the weights either
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    data = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(steps * accumulate)]
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return trainer


@pytest.mark.parametrize(("accumulate", "bad_micro"), [(1, 0), (2, 0), (2, 1)])
def test_nonfinite_step_changes_nothing_and_is_counted(accumulate, bad_micro, caplog):
    """With gradient accumulation, one bad micro-batch (first or last) skips the whole update."""
    module = Probe(bad_steps={2, 4}, bad_micro=bad_micro)
    with caplog.at_level(logging.WARNING, logger="sapiens.lit.base"):
        trainer = fit(module, steps=6, accumulate=accumulate)
    opt = trainer.optimizers[0]
    assert opt.defaults["fused"]
    for step in range(5):
        changed = not torch.equal(module.before[step], module.before[step + 1])
        assert changed == (step not in {2, 4}), f"step {step}: update {'applied' if changed else 'skipped'}"
    state = opt.state[module.net.weight]
    assert int(state["step"]) == 4  # AdamW's step count (bias correction) skips the bad steps too
    assert module.nonfinite_total == 2
    assert "non-finite loss at step 2: update skipped (1 in a row, 1 in total)" in caplog.text
    assert "non-finite loss at step 4: update skipped (1 in a row, 2 in total)" in caplog.text


def test_bf16_mixed_clips_gradients_before_the_fused_step():
    """bf16-mixed keeps fused AdamW and clips the gradients itself: Lightning's mixed-precision plugin
    refuses clipping with any fused optimizer (it assumes fp16 loss scaling), which stopped every bf16
    run (the GPU trainer configs) at its first step. The gradients the optimizer applies have norm <=
    the clip value, and a non-finite step is still skipped. (fp16 AMP, whose scaler turns fusing off in
    ``use_fused_adamw``, needs a GPU: Lightning swaps it for bf16 on the CPU.)"""
    module = Probe(bad_steps={2})
    norms: list[float] = []

    class Record(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            def pre_step(optimizer, args, kwargs):
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norms.append(float(torch.nn.utils.get_total_norm(grads)))

            trainer.optimizers[0].register_step_pre_hook(pre_step)

    trainer = fit(module, steps=5, precision="bf16-mixed", clip=1e-3, callbacks=[Record()])
    assert trainer.optimizers[0].defaults["fused"]
    finite = [n for n in norms if n == n]
    assert len(finite) >= 4 and max(finite) <= 1e-3 * 1.001, norms
    assert torch.equal(module.before[2], module.before[3])  # the NaN step changed nothing
    assert not torch.equal(module.before[3], module.before[4])
    assert module.nonfinite_total == 1


def test_a_run_of_nonfinite_losses_stops_training():
    module = Probe(bad_steps=set(range(2, 20)), max_consecutive_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive non-finite losses \(last at step 4\)"):
        fit(module, steps=20)
    assert max(module.before) <= 6  # stopped within a step of the third bad one, not at the end


def test_the_last_step_is_counted_at_the_end():
    module = Probe(bad_steps={3})
    fit(module, steps=4)
    assert module.nonfinite_total == 1


def test_callback_flags_arrive_one_step_later_and_once():
    module = Probe(flag_step=2)
    fit(module, steps=6)
    # raised while step 2 ran, read by the callbacks at the end of step 3 (the next one), once
    assert module.seen_flags == {0: False, 1: False, 2: False, 3: True, 4: False, 5: False}


def test_slurm_requeue_runs_once_a_step_after_the_signal():
    """The requeue flag is sampled again in the step that requeues (before it is reset): that stale
    sample must not requeue a second time (it did, under load, before the callback ignored it)."""
    from sapiens.callbacks.slurm_requeue import SlurmRequeueAtStepBoundary

    requeued_after_batch: list[int] = []

    class Requeue(SlurmRequeueAtStepBoundary):
        def setup(self, trainer, pl_module, stage):  # what the real setup does under Slurm
            self._active = True
            pl_module.step_flag_sources["slurm_requeue"] = lambda: self.requested
            trainer._signal_connector._slurm_sigusr_handler_fn = lambda *a: requeued_after_batch.append(
                self._batch
            )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._batch = batch_idx
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    requeue = Requeue()

    class Signal(L.Callback):  # USR1 arrives while batch 2 runs, before its flags are sampled
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                requeue.requested = True

    fit(Probe(), steps=8, callbacks=[Signal(), requeue])
    assert requeued_after_batch == [3]
