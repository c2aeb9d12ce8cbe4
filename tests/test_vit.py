"""Vision Transformer: token grids, the convolutional stem, the 2-D sine-cosine position start."""

import math

import pytest
import torch

from ldmkit.conditioning import ViT, ViTConfig


@pytest.mark.parametrize("channels,pool", [(1, "cls"), (3, "mean")])
def test_vit_shapes(channels, pool):
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, channels=channels, patch_size=4, width=32, layers=2, heads=2, pool=pool)
    pooled, tokens = ViT(cfg)(torch.randn(2, channels, 32, 32))
    assert pooled.shape == (2, 32) and tokens.shape == (2, 64 + (pool == "cls"), 32)
    assert torch.isfinite(pooled).all()
    with pytest.raises(ValueError, match="channels"):
        ViT(cfg)(torch.randn(2, 4 - channels, 32, 32))
    with pytest.raises(ValueError, match="patch_size=5"):
        ViTConfig(patch_size=5)


def test_vit_conv_stem():
    """stem="conv": log2(patch_size) stride-2 3x3 convolutions make the same token grid as the patch stem."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, channels=3, patch_size=8, width=32, layers=1, heads=2, pool="mean", stem="conv")
    vit = ViT(cfg)
    convs = [m for m in vit.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride, c.kernel_size) for c in convs] == [
        (3, 8, (2, 2), (3, 3)), (8, 16, (2, 2), (3, 3)), (16, 32, (2, 2), (3, 3))]
    x = torch.randn(2, 3, 32, 32)
    pooled, tokens = vit(x)
    assert pooled.shape == (2, 32) and tokens.shape == (2, 16, 32)
    # token (r, c) sees only pixels near its own patch: changing the far corner leaves token 0's embedding alone
    y = x.clone()
    y[:, :, 24:, 24:] += 1
    grid = vit.patch_embed(x).flatten(2).transpose(1, 2)
    assert torch.equal(vit.patch_embed(y).flatten(2).transpose(1, 2)[:, 0], grid[:, 0])
    with pytest.raises(ValueError, match="power of 2"):
        ViTConfig(image_size=24, patch_size=6, stem="conv")
    with pytest.raises(ValueError, match="stem"):
        ViTConfig(stem="resnet")


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_sincos_position_init(pool):
    from ldmkit.conditioning.vit import sincos_2d
    table = sincos_2d(4, 8)  # 16 patches, 2 frequencies (1 and 1/100) per quarter
    assert table.shape == (16, 8)
    patch = 1 * 4 + 2  # row 1, column 2
    expected = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
                math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    torch.testing.assert_close(table[patch], torch.tensor(expected))
    assert len({tuple(r) for r in table.tolist()}) == 16  # every patch gets its own code
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, channels=3, patch_size=4, width=8, layers=1, heads=2, pool=pool,
                        pos_init="sincos"))
    pos = vit.position_embedding.detach()[0]
    torch.testing.assert_close(pos[-16:], table)  # the patches; a class token keeps its small random start
    if pool == "cls":
        assert pos[0].abs().max() < 0.1
    assert vit.position_embedding.requires_grad  # a starting point, still learned
    with pytest.raises(ValueError, match="pos_init"):
        ViTConfig(pos_init="rope")
    with pytest.raises(ValueError, match="divisible by 4"):
        ViTConfig(width=6, heads=2, pos_init="sincos")
