"""Checks that need a CUDA GPU; skipped on CPU machines (CI has none) with the reason."""

import pytest
import torch

from sapiens.models.mae import MaskedAutoencoder
from sapiens.models.vit import VisionTransformer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (bf16 autocast, flash attention, resize on the device)",
    ),
]


def test_bf16_mae_step_is_finite_and_matches_fp32():
    torch.manual_seed(0)
    model = MaskedAutoencoder(
        VisionTransformer(img_size=(128, 128), embed_dim=128, depth=2, num_heads=2), 64, 1, 2
    ).cuda()
    images = torch.randn(4, 3, 128, 128, device="cuda")
    gen = torch.Generator(device="cuda")
    loss32, _, _ = model(images, generator=gen.manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss16, _, _ = model(images, generator=gen.manual_seed(0))
    loss16.backward()
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()


def test_flash_attention_runs_for_sapiens_head_dim_64():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 16, 1024, 64, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape


def test_device_resize_on_cuda_matches_cpu():
    import numpy as np

    from sapiens.data.device_resize import pack_device_crops, resize_crops
    from sapiens.data.pretrain_transform import PretrainTransform

    rng = np.random.default_rng(0)
    transform = PretrainTransform((96, 72), resize_on="device", seed=0)
    crops = [
        transform({"image": rng.integers(0, 256, (160, 120, 3), dtype=np.uint8)})["image"] for _ in range(4)
    ]
    packed, _ = pack_device_crops(crops)
    on_cpu = resize_crops(packed)
    on_gpu = resize_crops({**packed, "packed": packed["packed"].cuda()})
    assert on_gpu.is_cuda and on_gpu.shape == (4, 3, 96, 72)
    assert (on_gpu.cpu().int() - on_cpu.int()).abs().max() <= 1  # rounding of the two kernels
