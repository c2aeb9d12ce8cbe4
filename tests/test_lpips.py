"""LPIPS: torchvision-layout VGG16 and official heads from files, the formula, and the self-trained featnet."""

import math

import pytest
import torch
import torch.nn.functional as F

from ldmkit.autoencoder.featnet import (
    FeatNetConfig,
    gaussian_blur,
    load_featnet,
    random_translate,
    save_featnet,
    train_featnet,
)
from ldmkit.autoencoder.lpips import LPIPS, load_lpips_heads, load_vgg16, lpips_vgg16

# torchvision vgg16.features: conv layers at these indices, ReLU after each, max pools at 4, 9, 16, 23
TV_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
            14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
            28: (512, 512)}
TV_POOLS = {4, 9, 16, 23}
TAP_AFTER_CONV = {2: 0, 7: 1, 14: 2, 21: 3, 28: 4}  # relu1_2 ... relu5_3 follow these convs
CHANNELS = (64, 128, 256, 512, 512)


def random_vgg_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (cin, cout) in TV_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (9 * cin))
        state[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.1
    state["classifier.6.bias"] = torch.zeros(1000)  # a torchvision file has classifier keys; they are ignored
    return state


def random_heads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(CHANNELS)}


def reference_lpips(state, heads, x, y):
    """LPIPS written out from torchvision's layer indices and the paper's eq. 1."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(h):
        h, out = (h - shift) / scale, []
        for i in range(29):
            if i in TV_CONVS:
                h = F.relu(F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
                if i in TAP_AFTER_CONV:
                    out.append(h)
            elif i in TV_POOLS:
                h = F.max_pool2d(h, 2)
        return out

    d = 0
    for layer, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        d = d + F.conv2d((a - b) ** 2, heads[f"lin{layer}.model.1.weight"]).mean(dim=(1, 2, 3))
    return d


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("vgg")
    state, heads = random_vgg_state(), random_heads()
    save_file(state, str(d / "vgg16.safetensors"))
    torch.save(state, d / "vgg16.pth")
    torch.save(heads, d / "heads.pth")
    save_file(heads, str(d / "heads.safetensors"))
    return d, state, heads


def test_vgg16_lpips_matches_reference_formula(vgg_files):
    d, state, heads = vgg_files
    lp = lpips_vgg16(d / "vgg16.safetensors", d / "heads.pth")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(lp(x, y), reference_lpips(state, heads, x, y), atol=1e-5, rtol=1e-4)
        grey = x[:, :1]  # one-channel images are repeated to RGB
        torch.testing.assert_close(lp(grey, y[:, :1]), reference_lpips(state, heads, grey.expand(-1, 3, -1, -1),
                                                                       y[:, :1].expand(-1, 3, -1, -1)),
                                   atol=1e-5, rtol=1e-4)


def test_vgg16_from_pth_equals_safetensors_and_metric_properties(vgg_files):
    d, _, _ = vgg_files
    a = lpips_vgg16(d / "vgg16.pth", d / "heads.safetensors")
    b = lpips_vgg16(d / "vgg16.safetensors", d / "heads.pth")
    x, y = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a(x, y), b(x, y))
        assert torch.equal(a(x, x), torch.zeros(3))
        torch.testing.assert_close(a(x, y), a(y, x))
        assert (a(x, y) > 0).all()
    y.requires_grad_(True)
    a(x, y).sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in a.parameters())
    assert not any(p.requires_grad for p in a.parameters())


def test_bad_weight_files_raise(vgg_files, tmp_path):
    d, state, heads = vgg_files
    broken = dict(state)
    del broken["features.28.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="features.28.weight"):
        load_vgg16(tmp_path / "broken.pth")
    torch.save({**heads, "lin2.model.1.weight": torch.rand(1, 7, 1, 1)}, tmp_path / "h.pth")
    with pytest.raises(ValueError, match=r"lin2.model.1.weight has shape \(1, 7, 1, 1\)"):
        load_lpips_heads(tmp_path / "h.pth", CHANNELS)
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="lin1.model.1.weight"):
        load_lpips_heads(tmp_path / "short.pth", CHANNELS)
    with pytest.raises(ValueError, match="negative"):
        LPIPS(load_vgg16(d / "vgg16.safetensors"), [-torch.ones(c) for c in CHANNELS])
    with pytest.raises(FileNotFoundError):
        load_vgg16(tmp_path / "nope.safetensors")


# ---- featnet -----------------------------------------------------------------------------------------------------

def test_pretext_ops_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=g)
    k1 = torch.exp(-0.5 * torch.arange(-4.0, 5.0) ** 2)
    k2 = (k1[:, None] * k1[None, :]) / k1.sum() ** 2  # 2-D Gaussian, sigma 1
    want = F.conv2d(F.pad(x, (4,) * 4, mode="replicate"), k2[None, None])
    torch.testing.assert_close(gaussian_blur(x, torch.ones(2)), want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 8, 8), 0.3), torch.tensor([1.3])), torch.tensor(0.3))
    moved = random_translate(x, 2, torch.Generator().manual_seed(1))
    matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if torch.equal(moved[0, :, 4:12, 4:12], x[0, :, 4 + dy:12 + dy, 4 + dx:12 + dx])]
    assert len(matches) == 1  # the centre moved by one integer offset


def test_featnet_training_is_seeded_and_round_trips(tmp_path, one_thread):
    imgs = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8)
    cfg = FeatNetConfig(in_channels=1, widths=(8, 16))
    a = train_featnet(imgs, steps=3, seed=0, batch_size=8, cfg=cfg)
    b = train_featnet(imgs, steps=3, seed=0, batch_size=8, cfg=cfg)
    c = train_featnet(imgs, steps=3, seed=1, batch_size=8, cfg=cfg)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
    save_featnet(a, tmp_path / "featnet.safetensors")
    loaded = load_featnet(tmp_path / "featnet.safetensors")
    assert loaded.train_info["seed"] == 0 and loaded.cfg == cfg
    x, y = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    la, lb = LPIPS(a), LPIPS(loaded)
    with torch.no_grad():
        assert torch.equal(la(x, y), lb(x, y)) and torch.equal(la(x, x), torch.zeros(2))
        torch.testing.assert_close(la(x, y), la(y, x))
    with pytest.raises(ValueError, match="3 channels"):
        train_featnet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), steps=1, cfg=cfg)


def _blur_sigma1(x):  # an independent blur: 2-D Gaussian kernel, radius 3
    t = torch.arange(-3.0, 4.0)
    k = torch.exp(-0.5 * (t[:, None] ** 2 + t[None, :] ** 2))
    return F.conv2d(F.pad(x, (3,) * 4, mode="replicate"), (k / k.sum())[None, None])


def test_featnet_lpips_ranks_blur_farther_than_a_one_pixel_shift(fashion_dir, one_thread):
    from ldmkit.data import load_dataset
    train = load_dataset("fashion-mnist", split="train", data_dir=fashion_dir, num=10000).images
    test = load_dataset("fashion-mnist", split="test", data_dir=fashion_dir, num=100).images.float() / 127.5 - 1
    blur, shift = _blur_sigma1(test), torch.roll(test, 1, dims=3)
    pix_blur, pix_shift = (test - blur).square().flatten(1).sum(1), (test - shift).square().flatten(1).sum(1)
    assert (pix_blur > pix_shift).float().mean() < 0.5  # pixel L2 calls the shift the bigger change
    untrained = LPIPS(train_featnet(train, steps=0, seed=0))
    trained = LPIPS(train_featnet(train, steps=100, seed=0))
    with torch.no_grad():
        before = (untrained(test, blur) > untrained(test, shift)).float().mean()
        after = (trained(test, blur) > trained(test, shift)).float().mean()
    assert after >= 0.9, f"trained featnet ranks blur farther for only {after:.0%} of images"
    assert before < 0.5  # it is the training objective, not the architecture, that gives the ranking
