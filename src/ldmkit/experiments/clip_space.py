"""clip-space: CLIP's two towers put a picture and its caption at the same place.

The bundled CLIP stage embeds 200 test images of each class and the captions of every class (the training
templates and held-out ones). Measured: zero-shot accuracy with either template set, retrieval both ways, the
cosine of matched and mismatched image-caption pairs, the modality gap (the distance between the mean image and
the mean caption embedding: contrastive training aligns directions, not the two clouds), and what rewording a
caption does: how close a paraphrase stays to its class's caption, and whether its nearest class caption is still
its own. Figures: both clouds in one 2-D PCA projection, and the top images retrieved for a few captions.
"""

from __future__ import annotations

import numpy as np
import torch

from ldmkit.experiments.common import Context, pyplot, result, save_figure, save_grid

NAME = "clip-space"
TITLE = "one space for text and images"
# other words for each class, none of them in the training captions: rewording the class itself, not the template
SYNONYMS = ("tee", "pants", "sweater", "gown", "jacket", "flip-flop", "blouse", "running shoe", "handbag", "boot")
CLAIM = "CLIP trains a text tower and an image tower so that an image and its caption land close together"


def run(ctx: Context) -> dict:
    from ldmkit.data import FASHION_CLASSES, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, fill_template, load_split
    from ldmkit.eval.clip_cli import fashion_zero_shot, image_features, text_features
    from ldmkit.stages import load_clip
    clip = load_clip(ctx.pipeline / "clip")
    ds = load_split("fashion-mnist", "test", None, ctx.data_dir)
    per = ctx.n(200, 10)
    y_all = ds.labels["class"].numpy()
    idx = np.concatenate([np.flatnonzero(y_all == c)[:per] for c in range(10)])
    y = torch.as_tensor(y_all[idx])
    img = image_features(clip, ds.images[idx])  # (N, E) unit
    canon = text_features(clip, [fill_template("a photo of a {}", c) for c in FASHION_CLASSES])  # (10, E)
    para = {t: text_features(clip, [fill_template(t, c) for c in FASHION_CLASSES]) for t in HELDOUT_TEMPLATES}
    trained = {t: text_features(clip, [fill_template(t, c) for c in FASHION_CLASSES]) for t in TRAIN_TEMPLATES}

    sim = img @ canon.T  # (N, 10)
    numbers = dict(fashion_zero_shot(clip, img, y))
    numbers["images"] = len(idx)
    numbers["cos_matched"] = float(sim.gather(1, y[:, None]).mean())
    numbers["cos_mismatched"] = float(sim.masked_fill(torch.nn.functional.one_hot(y, 10).bool(), float("nan"))
                                      .nanmean())
    numbers["i2t_r1"] = float((sim.argmax(1) == y).float().mean())
    t2i_top = sim.T.topk(per, dim=1).indices  # (10, per): the best `per` images for each class caption
    numbers["t2i_precision_at_per_class"] = float((y[t2i_top] == torch.arange(10)[:, None]).float().mean())
    numbers["modality_gap"] = float((img.mean(0) - canon.mean(0)).norm())
    # rewording: the held-out templates never seen in training, against the canonical caption of each class
    same, other, right = [], [], []
    for emb in para.values():
        s = emb @ canon.T  # (10, 10): paraphrase of class i against canonical caption of class j
        same.append(float(s.diag().mean()))
        other.append(float(s.masked_fill(torch.eye(10, dtype=torch.bool), float("nan")).nanmean()))
        right.append(float((s.argmax(1) == torch.arange(10)).float().mean()))
    numbers["paraphrase_cos_same_class"] = float(np.mean(same))
    numbers["paraphrase_cos_other_class"] = float(np.mean(other))
    numbers["paraphrase_nearest_is_own_class"] = float(np.mean(right))
    numbers["paraphrase_templates"] = len(para)
    syn = text_features(clip, [fill_template("a photo of a {}", w) for w in SYNONYMS]) @ canon.T  # (10, 10)
    numbers["synonym_cos_same_class"] = float(syn.diag().mean())
    numbers["synonym_cos_other_class"] = float(syn.masked_fill(torch.eye(10, dtype=torch.bool), float("nan"))
                                               .nanmean())
    numbers["synonym_nearest_is_own_class"] = float((syn.argmax(1) == torch.arange(10)).float().mean())
    numbers = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in numbers.items()}

    figures = [_projection(ctx, img, y, canon, trained, para), _retrieval(ctx, ds, idx, t2i_top)]
    holds = numbers["zero_shot_top1"] > 0.5 and numbers["paraphrase_nearest_is_own_class"] >= 0.9
    verdict = (f"holds: zero-shot accuracy {numbers['zero_shot_top1']:.1%} (chance 10%), held-out wording "
               f"{numbers['zero_shot_top1_heldout']:.1%}; a reworded caption's nearest class caption is its own "
               f"{numbers['paraphrase_nearest_is_own_class']:.0%} of the time; the two clouds still sit apart "
               f"(modality gap {numbers['modality_gap']:.2f}); a class word it never read lands on its class only "
               f"{numbers['synonym_nearest_is_own_class']:.0%} of the time: the shared space is as wide as the "
               "training captions" if holds else
               f"does not hold here: zero-shot accuracy {numbers['zero_shot_top1']:.1%}, paraphrases land on their "
               f"own class {numbers['paraphrase_nearest_is_own_class']:.0%} of the time")
    return result(ctx, numbers, verdict, figures)


def _projection(ctx: Context, img, y, canon, trained, para):
    """Images (dots) and captions (stars: training templates; crosses: held-out ones) in one PCA plane."""
    from ldmkit.data import FASHION_CLASSES
    texts = torch.cat([canon, *trained.values(), *para.values()])
    allv = torch.cat([img, texts])
    mean = allv.mean(0)
    _, _, v = torch.pca_lowrank(allv - mean, q=2, center=False)
    p_img, p_txt = ((img - mean) @ v).numpy(), ((texts - mean) @ v).numpy()
    n_train = 10 * (1 + len(trained))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10")
    for c in range(10):
        m = (y == c).numpy()
        ax.scatter(p_img[m, 0], p_img[m, 1], s=4, alpha=0.35, color=cmap(c), label=FASHION_CLASSES[c])
    cls = np.tile(np.arange(10), len(texts) // 10)
    ax.scatter(p_txt[:n_train, 0], p_txt[:n_train, 1], marker="*", s=90, c=[cmap(c) for c in cls[:n_train]],
               edgecolors="black", linewidths=0.5)
    ax.scatter(p_txt[n_train:, 0], p_txt[n_train:, 1], marker="X", s=50, c=[cmap(c) for c in cls[n_train:]],
               edgecolors="black", linewidths=0.5)
    ax.set_title("CLIP embeddings, PCA: test images (dots), training-template captions (stars),\n"
                 "held-out paraphrases (crosses)", fontsize=10)
    ax.legend(fontsize=7, markerscale=3, loc="best")
    return save_figure(ctx, fig, "pca")


def _retrieval(ctx: Context, ds, idx, t2i_top, k: int = 8):
    """For each class caption (a row), the k test images CLIP ranks highest."""
    top = t2i_top[:, :k].reshape(-1).numpy()
    images = ds.crop(ds.images[idx[top]]).permute(0, 2, 3, 1).numpy()
    return save_grid(images, ctx.figure("retrieval"), nrow=k)


def section(res: dict, rel) -> str:
    n = res["numbers"]
    rows = [("zero-shot accuracy, training templates", f"{n['zero_shot_top1']:.1%}"),
            ("zero-shot accuracy, held-out templates", f"{n['zero_shot_top1_heldout']:.1%}"),
            ("image -> caption top-1 (canonical captions)", f"{n['i2t_r1']:.1%}"),
            ("caption -> images: precision of the top images per class", f"{n['t2i_precision_at_per_class']:.1%}"),
            ("cosine, image and its class caption", f"{n['cos_matched']:.3f}"),
            ("cosine, image and another class's caption", f"{n['cos_mismatched']:.3f}"),
            ("modality gap: distance between the mean image and mean caption", f"{n['modality_gap']:.3f}"),
            ("paraphrase vs its class caption (cosine)", f"{n['paraphrase_cos_same_class']:.3f}"),
            ("paraphrase vs other classes' captions (cosine)", f"{n['paraphrase_cos_other_class']:.3f}"),
            ("paraphrase's nearest class caption is its own", f"{n['paraphrase_nearest_is_own_class']:.0%}"),
            ("unseen synonym of the class word vs its class caption (cosine)", f"{n['synonym_cos_same_class']:.3f}"),
            ("unseen synonym vs other classes' captions (cosine)", f"{n['synonym_cos_other_class']:.3f}"),
            ("unseen synonym's nearest class caption is its own", f"{n['synonym_nearest_is_own_class']:.0%}")]
    table = "| measure | value |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    return (f"{n['images']} test images, the bundled CLIP stage, {n['paraphrase_templates']} held-out "
            f"paraphrase templates; the synonyms ({', '.join(SYNONYMS)}) never occur in the training "
            f"captions.\n\n{table}\n\n![PCA of image and text embeddings]({rel}/{res['figures'][0]})\n\n"
            f"Top images for each class caption (one row per class, best first):\n\n"
            f"![retrieval]({rel}/{res['figures'][1]})")
