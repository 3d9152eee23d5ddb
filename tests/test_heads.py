"""Task heads: output shapes / strides of tiny variants and published state-dict layout."""

from __future__ import annotations

import pytest
import torch

from sapiens.models.heads import DenseHead, HeatmapHead, depth_head, normal_head, seg_head

C_TINY = 32
FEATURES = (2, C_TINY, 4, 3)  # a 64x48 input through a stride-16 backbone


def _features() -> torch.Tensor:
    return torch.randn(*FEATURES, generator=torch.Generator().manual_seed(0))


def test_heatmap_head_tiny_shape_and_upsampling() -> None:
    head = HeatmapHead(C_TINY, num_keypoints=17, deconv_channels=(16, 16), conv_channels=(16, 16))
    out = head(_features())
    assert out.shape == (2, 17, 16, 12)
    assert head.upsample_factor == 4
    assert out.shape[-2:] == (FEATURES[2] * head.upsample_factor, FEATURES[3] * head.upsample_factor)


@pytest.mark.parametrize(
    ("factory", "kwargs", "channels", "stride"),
    [
        (
            seg_head,
            {"num_classes": 28, "deconv_channels": (16,) * 3, "conv_channels": (16,) * 3},
            28,
            2,
        ),
        (normal_head, {"deconv_channels": (16,) * 3, "conv_channels": (16,) * 3}, 3, 2),
        (depth_head, {"deconv_channels": (16,) * 4, "conv_channels": (16,) * 2}, 1, 1),
    ],
)
def test_dense_heads_tiny_shape_and_stride(factory, kwargs, channels, stride) -> None:
    head = factory(C_TINY, **kwargs)
    out = head(_features())
    assert out.shape == (2, channels, 64 // stride, 48 // stride)
    assert head.upsample_factor == 16 // stride  # 16-pixel patches in this test


def test_published_pose_head_keys_and_shapes() -> None:
    c, k = 1024, 308
    with torch.device("meta"):
        head = HeatmapHead(c, k)
    shapes = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    # Reference sapiens.md section 5, pose head (prefix "head.").
    assert shapes == {
        "deconv_layers.0.weight": (c, 768, 4, 4),
        "deconv_layers.3.weight": (768, 768, 4, 4),
        "conv_layers.0.weight": (768, 768, 1, 1),
        "conv_layers.0.bias": (768,),
        "conv_layers.3.weight": (768, 768, 1, 1),
        "conv_layers.3.bias": (768,),
        "final_layer.weight": (k, 768, 1, 1),
        "final_layer.bias": (k,),
    }


@pytest.mark.parametrize(("factory", "out"), [(seg_head, 28), (normal_head, 3)])
def test_published_seg_and_normal_head_keys(factory, out) -> None:
    c = 1280
    with torch.device("meta"):
        head = factory(c)
    shapes = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    expected = {
        "deconv_layers.0.weight": (c, 768, 4, 4),
        "deconv_layers.3.weight": (768, 768, 4, 4),
        "deconv_layers.6.weight": (768, 768, 4, 4),
        "conv_seg.weight": (out, 768, 1, 1),
        "conv_seg.bias": (out,),
    }
    for i in (0, 3, 6):
        expected[f"conv_layers.{i}.weight"] = (768, 768, 1, 1)
        expected[f"conv_layers.{i}.bias"] = (768,)
    assert shapes == expected


def test_published_depth_head_keys() -> None:
    c = 1536
    with torch.device("meta"):
        head = depth_head(c)
    shapes = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    expected = {
        "deconv_layers.0.weight": (c, 384, 4, 4),
        "deconv_layers.3.weight": (384, 384, 4, 4),
        "deconv_layers.6.weight": (384, 384, 4, 4),
        "deconv_layers.9.weight": (384, 384, 4, 4),
        "conv_layers.0.weight": (384, 384, 1, 1),
        "conv_layers.0.bias": (384,),
        "conv_layers.3.weight": (384, 384, 1, 1),
        "conv_layers.3.bias": (384,),
        "conv_seg.weight": (1, 384, 1, 1),
        "conv_seg.bias": (1,),
    }
    assert shapes == expected


def test_published_checkpoint_loads_by_prefix_rename() -> None:
    """A state dict in the published layout ("decode_head." prefix) loads strictly."""
    source = seg_head(C_TINY, 28, (16,) * 3, (16,) * 3)
    published = {f"decode_head.{k}": v.clone() for k, v in source.state_dict().items()}
    published["backbone.ln1.weight"] = torch.ones(C_TINY)  # other modules' keys are skipped
    target = seg_head(C_TINY, 28, (16,) * 3, (16,) * 3)
    prefix = "decode_head."
    renamed = {k[len(prefix) :]: v for k, v in published.items() if k.startswith(prefix)}
    target.load_state_dict(renamed, strict=True)
    target.eval()
    source.eval()
    x = _features()
    torch.testing.assert_close(target(x), source(x))


def test_init_is_small_normal_with_zero_bias() -> None:
    head = HeatmapHead(64, 17, (64, 64), (64, 64))
    weight = head.deconv_layers[3].weight
    assert 0.0005 < float(weight.detach().std()) < 0.002
    assert torch.count_nonzero(head.conv_layers[0].bias) == 0
    assert torch.count_nonzero(head.final_layer.bias) == 0


def test_dropout_is_separate_and_only_active_in_train() -> None:
    head = DenseHead(C_TINY, 3, (16,), (16,), dropout=0.5)
    assert isinstance(head.dropout, torch.nn.Dropout2d)
    head.eval()
    x = _features()
    torch.testing.assert_close(head(x), head(x))


def test_gradients_reach_every_parameter() -> None:
    head = HeatmapHead(C_TINY, 5, (16, 16), (16,))
    head(_features()).square().mean().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_wrong_feature_shape_is_a_clear_error() -> None:
    head = seg_head(C_TINY, 28, (16,), (16,))
    with pytest.raises(ValueError, match="feature map"):
        head(torch.randn(2, 12, C_TINY))  # tokens instead of a feature map
    with pytest.raises(ValueError, match=f"B, {C_TINY}"):
        head(torch.randn(2, C_TINY + 1, 4, 3))
