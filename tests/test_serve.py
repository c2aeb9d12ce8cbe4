"""`ldmkit serve`: the web UI driven in Debian's headless Chromium (Playwright with executable_path, never a
downloaded browser), its limits, its privacy (no request leaves 127.0.0.1) and a bounded load test over loopback."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmkit import serve, webui

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "pretrained" / "fashion-mnist"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


def need(what: str, ok: bool) -> None:
    """A missing browser or package skips here and fails under CI=true (CI installs them)."""
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} is required under CI=true (scripts/setup.sh test installs it)")
        pytest.skip(f"{what} not installed")


@pytest.fixture(scope="module")
def server():
    try:
        import gradio  # noqa: F401
    except ImportError:
        need("gradio", False)
    with serve.background_server([str(FASHION), "--max-steps", "50", "--max-images", "8", "--queue", "8"],
                                 cwd=ROOT) as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def browser():
    need("Debian's chromium", CHROMIUM is not None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("playwright (Python package)", False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


@pytest.mark.slow
def test_browser_generates_the_cli_pixels_and_shows_limits(server, browser, tmp_path):
    url, _ = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    page.wait_for_selector("#generate")
    page.fill("#prompt textarea", "a photo of a bag")
    page.fill("#seed input", "7")
    page.fill("#num input", "2")
    page.fill("#steps input", "8")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#images img').length >= 2", timeout=120_000)
    srcs = page.eval_on_selector_all("#images img", "els => els.map(e => e.src)")
    shown = np.stack([png_pixels(page.request.get(s).body()) for s in srcs[:2]])

    out = tmp_path / "cli.npz"
    subprocess.run([sys.executable, "-m", "ldmkit", "sample", str(FASHION), "--prompt", "a photo of a bag",
                    "--num", "2", "--seed", "7", "--steps", "8", "--out", str(out), "--no-progress"],
                   check=True, cwd=ROOT, capture_output=True)
    cli = np.load(out)["images"]
    assert shown.shape == cli.shape, (shown.shape, cli.shape)
    assert np.array_equal(shown, cli), "the page's images differ from `ldmkit sample` with the same settings"

    page.fill("#steps input", "5000")
    page.click("#generate")
    page.wait_for_selector("text=steps 5000 is outside 1..50", timeout=30_000)

    page.fill("#steps input", "8")
    page.fill("#prompt textarea", "x" * 400)
    page.click("#generate")
    page.wait_for_selector("text=this server takes at most 300", timeout=30_000)
    page.close()

    outside = [u for u in requests if not u.startswith(("data:", "blob:", url.rstrip("/")))]
    assert requests and not outside, f"the page requested outside 127.0.0.1: {outside[:5]}"


@pytest.mark.slow
def test_load_100_concurrent_requests_answered_or_refused(server):
    """100 concurrent generate calls: each completes or is refused as "queue full"; the server answers after."""
    url, proc = server
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_serve_load import load_test
    r = load_test(url, n=100, steps=4, num=1, timeout=300, pid=proc.pid)
    assert r["answered"] + r["refused"] == 100, r
    assert r["answered"] >= 1 and r["other_errors"] == 0, r
    assert set(r["refused_messages"]) <= {"queue_full"}, r
    print(r)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
    assert r["server_peak_rss_mib"] is None or r["server_peak_rss_mib"] < 4096


@pytest.mark.slow
def test_an_upload_over_the_size_limit_is_refused(server):
    """Uploads above --max-upload-mb (5 MB by default) are refused by the server with a message, not stored."""
    url, _ = server
    boundary = "ldmkitboundary"
    big = b"\x89PNG" + b"\0" * (6 * 1024 * 1024)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{url}gradio_api/upload", body,
                                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code in (400, 413), e.value.code
    assert "size" in e.value.read().decode(errors="replace").lower()


def test_limits_name_the_value_and_the_limit():
    lim = serve.Limits(max_steps=50, max_images=8, max_prompt_chars=10)
    with pytest.raises(ValueError, match="steps 51 is outside 1..50"):
        lim.check(steps=51)
    with pytest.raises(ValueError, match="number of images 9 is outside 1..8"):
        lim.check(num=9)
    with pytest.raises(ValueError, match="11 characters long"):
        lim.check(prompts=["x" * 11])
    lim.check(steps=50, num=8, prompts=["x" * 10])


def test_form_fields_become_the_cli_command_line(tmp_path):
    argv = serve.sample_argv(FASHION, tmp_path / "s.npz", prompt="a photo of a bag", negative="", guidance=3.0,
                             rescale=0.7, interval="", mode="cfg", classifier_scale=0.0, class_label=None,
                             sampler="pipeline default", steps=8, seed=7, num=2, variant="full denoiser")
    from ldmkit.sample import parse_args
    args = parse_args(argv)
    assert (args.prompt, args.num, args.seed, args.steps, args.guidance, args.guidance_rescale) == \
        (["a photo of a bag"], 2, 7, 8, 3.0, 0.7)
    assert args.classifier_scale == 0.0 and args.class_label is None and args.sampler is None
    assert not args.distilled and not args.one_step and args.decoder == "full"
    one = serve.sample_argv(FASHION, tmp_path / "s.npz", prompt="", negative="a shirt", guidance=None, rescale=None,
                            interval="0.3,5", mode="apg", classifier_scale=2.0, class_label=3, sampler="euler",
                            steps=None, seed=0, num=1, variant="one-step student")
    a1 = parse_args(one)
    assert a1.one_step and a1.negative_prompt == "a shirt" and a1.guidance_interval == (0.3, 5.0)
    assert a1.guidance_mode == "apg" and a1.classifier_scale == 2.0 and a1.class_label == 3 and a1.sampler == "euler"
    with pytest.raises(ValueError, match="model"):
        serve.sample_argv(FASHION, tmp_path / "s.npz", prompt="", negative="", guidance=None, rescale=None,
                          interval="", mode="cfg", classifier_scale=None, class_label=None, sampler="euler",
                          steps=None, seed=0, num=1, variant="turbo")


def test_class_choice_maps_to_the_pipeline_class_index():
    spec = {"data": "fashion-mnist"}
    assert serve.class_index(spec, serve.FROM_PROMPT) is None
    assert serve.class_index(spec, "bag") == 8  # Fashion-MNIST's label of "bag"
    with pytest.raises(ValueError, match="not one of this pipeline's classes"):
        serve.class_index(spec, "dog")
    assert serve.class_index({"classes": ["cat", "dog"]}, "dog") == 1


def test_serve_refuses_bad_options_in_one_line():
    for argv, msg in ((["--port", "0"], "--port 0"), (["--max-steps", "0"], "--max-steps 0"),
                      (["--queue", "0"], "--queue 0"), (["no-such-pipeline"], "no pipeline 'no-such-pipeline'")):
        r = subprocess.run([sys.executable, "-m", "ldmkit", "serve", *argv], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 2, (argv, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return webui.App(serve.Pipelines({"fashion-mnist": FASHION}), serve.Limits(), tmp_path_factory.mktemp("serve"))


def test_edit_tab_equals_cli_sdedit_and_inpaint(app, tmp_path):
    """The Edit tab's images equal `ldmkit sample --init-image [--mask]` on the same files and settings."""
    from ldmkit.sample import main as sample_main
    test = app.test_image("fashion-mnist")
    with Image.open(test) as im:
        img = np.asarray(im.convert("RGBA"))
    layer = np.zeros_like(img)
    layer[:, :10, 3] = 255  # drawn over the left columns: inpaint there
    for layers, extra in (([], []), ([layer], ["--mask"])):
        files, downloads, info = app.edit("fashion-mnist", {"background": img, "layers": layers}, "a photo of a bag",
                                          0.6, 3.0, 6, 3, 2)
        shown = np.stack([png_pixels(Path(f).read_bytes()) for f, _ in files[1:]])
        folder = Path(files[0][0]).parent
        cmd = [str(FASHION), "--prompt", "a photo of a bag", "--num", "2", "--seed", "3", "--steps", "6",
               "--guidance", "3.0", "--strength", "0.6", "--init-image", str(folder / "input.png"),
               "--out", str(tmp_path / "cli.npz"), "--no-progress"]
        if extra:
            cmd += ["--mask", str(folder / "mask.png")]
            assert "inpainted" in info
        else:
            assert "SDEdit" in info
        sample_main(cmd)
        assert np.array_equal(shown, np.load(tmp_path / "cli.npz")["images"])
        assert np.array_equal(np.load(downloads[1])["images"], shown)


def test_look_inside_reconstruction_interpolation_and_captions(app):
    a, b = app.test_image("fashion-mnist"), app.test_image("fashion-mnist")
    pair, latent_png, info = app.reconstruct("fashion-mnist", a)
    assert "latent 4 x 8 x 8" in info and "PSNR" in info and Path(latent_png).is_file()
    recon = png_pixels(Path(pair[1][0]).read_bytes())
    frames = app.interpolate("fashion-mnist", a, b, 4)
    assert len(frames) == 4
    # t = 0 decodes the first image's own latent: its reconstruction
    assert np.array_equal(png_pixels(Path(frames[0][0]).read_bytes()), recon)
    ranked = app.closest_captions("fashion-mnist", a)
    assert len(ranked) == 5 and all(0 <= p <= 1 for p in ranked.values())
    with pytest.raises(ValueError, match="frames 11 is outside 2..10"):
        app.interpolate("fashion-mnist", a, b, 11)
    with pytest.raises(ValueError, match="choose an image first"):
        app.reconstruct("fashion-mnist", None)
