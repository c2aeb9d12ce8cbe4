"""Self-contained HTML reports: images inline as PNG data, charts as inline SVG, no outside assets.

A report opens offline from disk and shows the same in any browser: no scripts, fonts or styles are fetched.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { padding: 3px 6px; vertical-align: middle; }
th { font-weight: 600; text-align: left; font-size: 0.9em; } .num td { text-align: right; }
.num td:first-child { text-align: left; } .metrics td, .metrics th { border-bottom: 1px solid #eee; }
img { image-rendering: pixelated; display: block; } figure { display: inline-block; margin: 4px; }
figcaption { font-size: 0.8em; color: #555; max-width: 220px; } .note { color: #555; font-size: 0.92em; }
.strip { display: flex; flex-wrap: wrap; gap: 2px; } .small { font-size: 0.85em; color: #555; }
"""


def png_data(image: np.ndarray, scale: int = 3) -> str:
    """uint8 (H, W, C) or (H, W) image -> a `data:image/png;base64,...` URI, upscaled `scale`x (nearest)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    im = Image.fromarray(a.astype(np.uint8))
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def img(image: np.ndarray, scale: int = 3, title: str = "") -> str:
    t = f' title="{html.escape(title)}" alt="{html.escape(title)}"' if title else ' alt=""'
    return f'<img src="{png_data(image, scale)}"{t}>'


def strip(images: Sequence[np.ndarray], scale: int = 3, titles: Sequence[str] | None = None) -> str:
    """Images side by side."""
    titles = titles or [""] * len(images)
    return '<div class="strip">' + "".join(img(x, scale, t) for x, t in zip(images, titles)) + "</div>"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """An HTML table; cells are HTML (escape text yourself with `esc`)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def esc(text) -> str:
    return html.escape(str(text))


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return esc(v)


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, width: int = 340,
               height: int = 200, log_y: bool = False) -> str:
    """An inline SVG line chart of named (x, y) series (x: steps)."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    pts = {k: [(float(x), float(y)) for x, y in zip(*v) if math.isfinite(y) and (y > 0 or not log_y)]
           for k, v in series.items()}
    pts = {k: v for k, v in pts.items() if v}
    if not pts:
        return ""
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    xs = [x for v in pts.values() for x, _ in v]
    ys = [ty(y) for v in pts.values() for _, y in v]
    x0, x1 = min(xs), max(xs) or 1.0
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y1 = y0 + 1.0
    left, right, top, bottom = 46, 8, 22, 24
    sx = lambda x: left + (x - x0) / max(x1 - x0, 1e-12) * (width - left - right)  # noqa: E731
    sy = lambda y: top + (1 - (ty(y) - y0) / (y1 - y0)) * (height - top - bottom)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10" '
           f'font-family="sans-serif"><text x="{left}" y="13" font-size="11" font-weight="600">{esc(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           'fill="none" stroke="#bbb"/>']
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
        ypix = top + (1 - frac) * (height - top - bottom)
        out.append(f'<text x="{left - 4}" y="{ypix + 3:.1f}" text-anchor="end">{label}</text>')
    out.append(f'<text x="{left}" y="{height - 8}">{x0:.0f}</text>'
               f'<text x="{width - right}" y="{height - 8}" text-anchor="end">step {x1:.0f}</text>')
    for i, (name, v) in enumerate(pts.items()):
        c = colors[i % len(colors)]
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in v)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.4" points="{d}"/>')
        out.append(f'<text x="{width - right - 4}" y="{top + 12 + 12 * i}" text-anchor="end" fill="{c}">'
                   f'{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def page(title: str, intro: str, sections: Sequence[tuple[str, str]]) -> str:
    """The whole document: a title, an introduction and (heading, HTML body) sections with a table of contents."""
    toc = "".join(f'<li><a href="#s{i}">{esc(h)}</a></li>' for i, (h, _) in enumerate(sections))  # numbered
    body = "".join(f'<h2 id="s{i}">{esc(h)}</h2>{b}' for i, (h, b) in enumerate(sections))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width"><style>{STYLE}</style></head><body>'
            f'<h1>{esc(title)}</h1>{intro}<ul style="list-style: none">{toc}</ul>{body}</body></html>')
