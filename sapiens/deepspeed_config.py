"""Lightning ``DeepSpeedStrategy`` from plain Hydra values (no separate DeepSpeed JSON).

``conf/trainer/deepspeed_stage_2.yaml`` and ``deepspeed_stage_3.yaml`` point ``trainer.strategy``
at :func:`build_deepspeed_strategy`; every knob is a config key, so ``python train.py
trainer=deepspeed_stage_3 trainer.strategy.offload_optimizer=true`` works and the composed
``config.yaml`` of a run records the exact ZeRO setup.

Which stage? ``python -m sapiens.memory_model`` prints the per-GPU memory of each model size per
stage. In short: stage 2 (optimizer states + gradients sharded) is the default for multi-GPU
training; stage 3 (parameters sharded too) when model states do not fit; offloading to CPU when
even that does not fit (slow). A ZeRO run saves checkpoints as *directories*; resume from them,
and turn one into a single fp32 file with ``python -m sapiens.zero_to_fp32 DIR OUT``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy


def build_deepspeed_strategy(
    stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    allgather_bucket_size: float = 2e8,
    reduce_bucket_size: float = 2e8,
    overlap_comm: bool = True,
    contiguous_gradients: bool = True,
    partition_activations: bool = False,
    cpu_checkpointing: bool = False,
    logging_batch_size_per_gpu: int | str = "auto",
    exclude_frozen_parameters: bool = False,
    **strategy_kwargs: Any,
) -> DeepSpeedStrategy:
    """Build a ZeRO ``DeepSpeedStrategy`` (Hydra target of ``trainer.strategy``).

    Args:
        stage: ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters.
        offload_optimizer: keep optimizer states (and the step) on the CPU (stage 1-3).
        offload_parameters: keep parameters on the CPU between uses (stage 3 only).
        allgather_bucket_size, reduce_bucket_size: elements per communication bucket; larger is
            faster but costs GPU memory (Lightning docs: the 2e8 defaults use ~3.6 GB; 5e8 suits
            80 GB GPUs).
        overlap_comm, contiguous_gradients: DeepSpeed's ZeRO communication options.
        partition_activations, cpu_checkpointing: for DeepSpeed's own activation checkpointing
            (``deepspeed.checkpointing``); our backbone checkpoints blocks with torch instead
            (``model.grad_checkpointing=true``), which needs neither.
        logging_batch_size_per_gpu: batch size DeepSpeed uses for its throughput log.
        exclude_frozen_parameters: leave frozen parameters out of checkpoints.
        **strategy_kwargs: any other ``DeepSpeedStrategy`` argument (e.g. ``nvme_path``).

    Returns:
        The strategy; its ``config`` dict is the DeepSpeed config it will run with.

    Raises:
        ValueError: a stage outside 1-3, or parameter offload below stage 3.
    """
    stage = int(stage)
    if stage not in (1, 2, 3):
        raise ValueError(
            f"trainer.strategy.stage must be 1, 2 or 3 (ZeRO stage), got {stage}; "
            "for no sharding use trainer=ddp."
        )
    if offload_parameters and stage != 3:
        raise ValueError(
            "trainer.strategy.offload_parameters=true needs stage 3 (only ZeRO-3 partitions "
            f"parameters), got stage {stage}."
        )
    if "config" in strategy_kwargs:
        raise ValueError(
            "trainer.strategy.config would replace every setting built here; set the keys "
            "of build_deepspeed_strategy (or pass extra DeepSpeedStrategy arguments) instead."
        )
    strategy = DeepSpeedStrategy(
        stage=stage,
        offload_optimizer=bool(offload_optimizer),
        offload_parameters=bool(offload_parameters),
        allgather_bucket_size=int(allgather_bucket_size),
        reduce_bucket_size=int(reduce_bucket_size),
        overlap_comm=bool(overlap_comm),
        contiguous_gradients=bool(contiguous_gradients),
        partition_activations=bool(partition_activations),
        cpu_checkpointing=bool(cpu_checkpointing),
        logging_batch_size_per_gpu=logging_batch_size_per_gpu,
        exclude_frozen_parameters=bool(exclude_frozen_parameters),
        **strategy_kwargs,
    )
    if offload_optimizer:
        # Our optimizer is torch AdamW built in configure_optimizers (param groups with layer-wise
        # decay). DeepSpeed refuses a client optimizer with offload unless told otherwise; it
        # still works, only the CPU step is slower than DeepSpeedCPUAdam.
        strategy.config["zero_force_ds_cpu_optimizer"] = False
    return strategy
