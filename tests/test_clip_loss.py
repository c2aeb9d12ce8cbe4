"""The CLIP contrastive loss against per-pair loops: plain, with hard negatives, and gathered across ranks."""

import math

import pytest
import torch
import torch.nn.functional as F

from ldmkit.conditioning import clip_loss, clip_loss_gathered, gather_features


def naive_clip_loss(img, txt, scale):
    """Per-pair loops with an explicit log-softmax."""
    n = img.shape[0]
    logit = [[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    out = []
    for i in range(n):
        row_lse = math.log(sum(math.exp(logit[i][j]) for j in range(n)))
        col_lse = math.log(sum(math.exp(logit[j][i]) for j in range(n)))
        out.append(0.5 * ((row_lse - logit[i][i]) + (col_lse - logit[i][i])))
    return torch.tensor(out, dtype=torch.float64)


def test_clip_loss_matches_naive():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    loss = clip_loss(img, txt, 14.0)
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, naive_clip_loss(img, txt, 14.0))
    perfect = clip_loss(img, img, 100.0)  # diagonal pairs identical, others far -> near zero loss
    assert perfect.mean() < clip_loss(img, txt, 100.0).mean()


def test_clip_loss_hard_negatives_match_naive():
    """Image i's hard negative joins only image i's image-to-text softmax; masked rows are plain CLIP rows."""
    g = torch.Generator().manual_seed(2)
    img, txt, neg = (F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1) for _ in range(3))
    keep = torch.tensor([True, False, True, True, False])
    loss = clip_loss(img, txt, 12.0, neg, keep)
    plain = naive_clip_loss(img, txt, 12.0)
    for i in range(5):
        logits = [12.0 * float(img[i] @ txt[j]) for j in range(5)]
        logits += [12.0 * float(img[i] @ neg[i])] if keep[i] else []
        i2t = math.log(sum(math.exp(v) for v in logits)) - logits[i]
        col = [12.0 * float(img[j] @ txt[i]) for j in range(5)]
        t2i = math.log(sum(math.exp(v) for v in col)) - col[i]
        assert float(loss[i]) == pytest.approx(0.5 * (i2t + t2i), rel=1e-12)
        if keep[i]:  # a further wrong answer only adds loss
            assert float(loss[i]) > float(plain[i]) * (1 + 1e-9)
        else:  # a masked row is a plain CLIP row (equal up to float64 rounding)
            assert float(loss[i]) == pytest.approx(float(plain[i]), rel=1e-12)
    all_kept = torch.ones(5, dtype=torch.bool)
    torch.testing.assert_close(clip_loss(img, txt, 12.0, neg), clip_loss(img, txt, 12.0, neg, all_kept))
    with pytest.raises(ValueError, match="one per image"):
        clip_loss(img, txt, 12.0, neg[:3])
    # gathered over two simulated ranks: same values and the full-batch gradients of the local rows
    img.requires_grad_(), neg.requires_grad_()
    full = clip_loss(img, txt, 12.0, neg, keep)
    full.mean().backward()
    for lo, hi in ((0, 2), (2, 5)):
        li, ln = (t.detach()[lo:hi].clone().requires_grad_() for t in (img, neg))
        part = clip_loss_gathered(li, txt[lo:hi], img.detach(), txt, lo, 12.0, ln, neg.detach(), keep)
        torch.testing.assert_close(part, full.detach())
        part.mean().backward()
        torch.testing.assert_close(li.grad, img.grad[lo:hi])
        torch.testing.assert_close(ln.grad, neg.grad[lo:hi])


def test_clip_loss_k_hard_negatives_match_naive():
    """K negatives per image (B, K, E) with a (B, K) mask: each present one is a further wrong answer in its own
    image's image-to-text softmax; K = 1 equals the (B, E) form."""
    g = torch.Generator().manual_seed(3)
    img, txt = (F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    neg = F.normalize(torch.randn(4, 3, 6, generator=g, dtype=torch.float64), dim=-1)
    keep = torch.tensor([[True, True, True], [False, False, False], [True, False, True], [False, True, False]])
    loss = clip_loss(img, txt, 9.0, neg, keep)
    for i in range(4):
        logits = [9.0 * float(img[i] @ txt[j]) for j in range(4)]
        logits += [9.0 * float(img[i] @ neg[i, k]) for k in range(3) if keep[i, k]]
        i2t = math.log(sum(math.exp(v) for v in logits)) - logits[i]
        col = [9.0 * float(img[j] @ txt[i]) for j in range(4)]
        t2i = math.log(sum(math.exp(v) for v in col)) - col[i]
        assert float(loss[i]) == pytest.approx(0.5 * (i2t + t2i), rel=1e-12)
    one = torch.tensor([True, False, True, True])
    torch.testing.assert_close(clip_loss(img, txt, 9.0, neg[:, 0], one), clip_loss(img, txt, 9.0, neg[:, :1],
                                                                                    one[:, None]))
    with pytest.raises(ValueError, match="does not match"):
        clip_loss(img, txt, 9.0, neg, keep[:, :2])


def test_clip_loss_gathered_gives_full_batch_gradients():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    full = clip_loss(img, txt, 10.0)
    full.mean().backward()
    for rank in range(2):  # two simulated ranks of 4 examples each
        li = img.detach()[4 * rank:4 * rank + 4].clone().requires_grad_()
        lt = txt.detach()[4 * rank:4 * rank + 4].clone().requires_grad_()
        loss = clip_loss_gathered(li, lt, img.detach(), txt.detach(), 4 * rank, 10.0)
        torch.testing.assert_close(loss, full.detach())
        loss.mean().backward()
        torch.testing.assert_close(li.grad, img.grad[4 * rank:4 * rank + 4])
        torch.testing.assert_close(lt.grad, txt.grad[4 * rank:4 * rank + 4])
    with pytest.raises(ValueError, match="offset=6"):
        clip_loss_gathered(li, lt, img.detach(), txt.detach(), 6, 10.0)
    feats, offset = gather_features(img)
    assert offset == 0 and torch.equal(feats, img.detach()) and not feats.requires_grad
