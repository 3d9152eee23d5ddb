"""Regional compilation of Sapiens2 models: its blocks (plain and grouped-query attention, RoPE) and its
heads are regions, and the compiled model keeps its keys, outputs and gradients (torch.compile's ``eager``
backend: dynamo tracing in seconds; tests/test_compile_e2e.py covers inductor through train.py)."""

import torch

from sapiens.models.regional_compile import compile_regions, find_regions, is_compiled
from tests.checkpoint_factory import SAPIENS2_SIZE, make_sapiens2_module


def test_sapiens2_blocks_and_pointmap_head_compile_with_the_same_numbers():
    eager = make_sapiens2_module("pointmap").train()
    compiled = make_sapiens2_module("pointmap").train()
    compiled.backbone.set_grad_checkpointing(True)  # per-block checkpointing around compiled blocks
    regions = compile_regions(compiled, backend="eager")
    assert regions == find_regions(eager) == [*(f"backbone.blocks.{i}" for i in range(4)), "task.head"]
    assert is_compiled(compiled) and list(compiled.state_dict()) == list(eager.state_dict())
    images = torch.randn(2, 3, *SAPIENS2_SIZE, generator=torch.Generator().manual_seed(0))
    outputs = []
    for module in (eager, compiled):
        out = module.task(module.backbone(images))  # PointmapOutput(points, scale)
        (out.points.square().mean() + out.scale.square().mean()).backward()
        outputs.append(out)
    for a, b in zip(outputs[0], outputs[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    grouped = "backbone.blocks.1.attn.wk.weight"  # a GQA block (2 KV heads)
    torch.testing.assert_close(
        dict(compiled.named_parameters())[grouped].grad,
        dict(eager.named_parameters())[grouped].grad,
        atol=1e-5,
        rtol=0,
    )
