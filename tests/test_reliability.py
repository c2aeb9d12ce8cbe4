"""The hostile-input cases (docs/reliability.md), each run through the CLI as a user would: a user error is one
line on stderr naming the value, file or key, with exit code 2; what should work works. Case ids match the table."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
S = ["sample", "{pipe}", "--prompt", "a red circle", "--num", "1", "--steps", "2", "--no-progress"]


def run(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()  # drop what earlier steps (fixtures) printed
    try:
        rc = cli([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors exit with 2 after printing usage
        rc = e.code
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    return rc, err


def one_line(err: list[str]) -> str:
    """The one error line (progress lines and argparse's usage may come before it; no traceback anywhere)."""
    assert err, "expected an error line"
    assert not any("Traceback" in ln for ln in err), err
    lines = [ln for ln in err if ln.startswith("ldmkit") and ": error: " in ln]
    assert len(lines) == 1 and lines[0] == err[-1], err
    assert "\x1b" not in lines[0], lines[0]  # no terminal colour codes from libraries
    return lines[0]


# ----------------------------------------------------------------------------- section 1: sample arguments
SAMPLE_ARGS = [  # (id, extra arguments, expected rc, words in the error line; '' = success)
    ("s01", ["--prompt"], 2, "expected one argument"),
    ("s01b", ["--prompt", ""], 0, ""),
    ("s03a", ["--prompt", "a \U0001F534 red circle \u65e5\u672c\u8a9e \u200b"], 0, ""),
    ("s03b", ["--prompt", "a red \udcff\udcfe circle"], 2, "not valid UTF-8"),
    ("s03d", ["--prompt", "a red \x01\x1b[31m circle"], 0, ""),
    ("s04", ["--num", "0"], 2, "--num 0"),
    ("s05", ["--num", "-1"], 2, "--num -1"),
    ("s06", ["--num", "100000"], 2, "--num 100000"),
    ("s07", ["--steps", "0"], 2, "--steps 0"),
    ("s08", ["--steps", "-3"], 2, "--steps -3"),
    ("s09", ["--guidance", "nan"], 2, "finite"),
    ("s10b", ["--guidance", "inf"], 2, "finite"),
    ("s10", ["--guidance", "-1e9"], 2, "outside -20..50"),
    ("s10=", ["--guidance=-1e9"], 2, "outside -20..50"),
    ("s11", ["--sampler", "bogus"], 2, "invalid choice"),
    ("s12a", ["--out", "/proc/nope/s12.npz"], 2, "does not exist"),
    ("s13", ["--out", "{tmp}/s13.jpg"], 2, "must end in .npz"),
    ("s13b", ["--out", "{tmp}/s13b"], 2, "must end in .npz"),
    ("s14", ["--seed", "-1"], 0, ""),
    ("s15", ["--seed", "99999999999999999999999"], 2, "64 bits"),
    ("s16", ["--batch-size", "0"], 2, "--batch-size 0"),
    ("s17", ["--distilled"], 2, "distill"),
    ("s18", ["--classifier-scale", "1", "--class-label", "3"], 2, "classifier"),
    ("s19", ["--guidance-interval", "5"], 2, "LO,HI"),
    ("s20", ["--guidance-rescale", "nan"], 2, "finite"),
    ("s21", ["--init-image", "{tmp}/none.png"], 2, "none.png"),
    ("s22", ["--mask", "{tmp}/none.png"], 2, "--mask needs --init-image"),
    ("s23", ["--init-image", "{tmp}/text.png"], 2, "text.png"),
]


@pytest.mark.parametrize("case,extra,rc,words", SAMPLE_ARGS, ids=[c[0] for c in SAMPLE_ARGS])
def test_sample_arguments(tiny_pipeline, tmp_path, capsys, case, extra, rc, words):
    (tmp_path / "text.png").write_text("not an image")
    fill = {"pipe": tiny_pipeline, "tmp": tmp_path}
    argv = [a.format(**fill) for a in S] + [a.format(**fill) for a in extra]
    if not any(a.startswith("--out") for a in extra):
        argv += ["--out", str(tmp_path / f"{case}.npz")]
    got, err = run(argv, capsys)
    assert got == rc, err
    if rc:
        assert words in one_line(err)
    else:
        with np.load(tmp_path / f"{case}.npz", allow_pickle=False) as f:
            assert f["images"].dtype == np.uint8 and f["prompts"].dtype.kind == "U"


def test_s02_a_very_long_prompt_is_truncated_with_a_short_warning(tiny_pipeline, tmp_path, capsys):
    long = "a red circle " * 770
    rc, err = run([a.format(pipe=tiny_pipeline) for a in S] + ["--prompt", long, "--out", tmp_path / "s02.npz"],
                  capsys)
    assert rc == 0 and sum(len(ln) for ln in err) < 2000  # the warning does not echo 10 KB


@pytest.mark.parametrize("case", ["s12b", "s12c"])
def test_s12_output_is_a_directory(tiny_pipeline, tmp_path, capsys, case):
    out = tmp_path / ("dir.npz" if case == "s12c" else "adir")
    out.mkdir()
    rc, err = run([a.format(pipe=tiny_pipeline) for a in S] + ["--out", out], capsys)
    assert rc == 2 and ("is a directory" in one_line(err) or "must end in .npz" in one_line(err))


def test_c1_a_second_sample_into_the_same_file_is_refused(tiny_pipeline, tmp_path, capsys):
    """Another process holds the output's lock (as a running `ldmkit sample` does): this one is refused, naming it."""
    import fcntl
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(tmp_path / ".conc.npz.lock", "w") as f:
            f.write(str(holder.pid))
            f.flush()
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # flock locks are per open file: a second open in this process conflicts like another process would
            rc, err = run([a.format(pipe=tiny_pipeline) for a in S] + ["--out", tmp_path / "conc.npz"], capsys)
        assert rc == 2 and f"another ldmkit sample (PID {holder.pid})" in one_line(err)
        assert not (tmp_path / "conc.npz").exists()
    finally:
        holder.kill()
    rc, err = run([a.format(pipe=tiny_pipeline) for a in S] + ["--out", tmp_path / "conc.npz"], capsys)
    assert rc == 0 and not (tmp_path / ".conc.npz.lock").exists()  # released: the next one runs, and cleans up


# ----------------------------------------------------------------------------- section 1: pipeline files
def _edit_json(path: Path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _truncate(path: Path, fraction: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


PIPELINE_FILES = [  # (id, how to break a copy of the pipeline, words in the error line)
    ("p01", lambda d: shutil.rmtree(d), "not a pipeline directory"),
    ("p02", lambda d: shutil.rmtree(d / "denoiser"), "denoiser"),
    ("p02b", lambda d: (d / "clip" / "model.safetensors").unlink(), "clip"),
    ("p02c", lambda d: (d / "clip" / "tokenizer.json").unlink(), "tokenizer"),
    ("p03", lambda d: _truncate(d / "pipeline.json", 0.3), "not valid JSON"),
    ("p04", lambda d: _truncate(d / "autoencoder" / "model.safetensors"), "weights hash"),
    ("p05", lambda d: shutil.copy(d / "fast-decoder" / "model.safetensors", d / "autoencoder" / "model.safetensors"),
     "weights hash"),
    ("p06", lambda d: _edit_json(d / "autoencoder" / "config.json", lambda c: c["model"].update(bogus_key=1)),
     "config was edited"),
    ("p06b", lambda d: _edit_json(d / "autoencoder" / "config.json", lambda c: c.update(bogus_top=1)),
     "config was edited"),
    ("p06c", lambda d: _edit_json(d / "pipeline.json", lambda c: c["defaults"].update(bogus=2)), "unknown defaults"),
    ("p06d", lambda d: _edit_json(d / "autoencoder" / "config.json",
                                  lambda c: c["model"].update(block_out_channels=[8, 16, 32])), "config was edited"),
    ("p07", lambda d: _edit_json(d / "denoiser" / "config.json", lambda c: c["objective"].update(kind="eps")),
     "config was edited"),
    ("p07b", lambda d: _edit_json(d / "pipeline.json", lambda c: c["latent"].update(scale_factor=0.05)),
     "latent scale"),
    ("p09", lambda d: _edit_json(d / "pipeline.json", lambda c: c["stages"].pop("clip")), "'clip' stage"),
    ("p09b", lambda d: (d / "pipeline.json").write_text("[1, 2, 3]"), "format"),
    ("p09c", lambda d: _edit_json(d / "pipeline.json", lambda c: c["latent"].update(shape=[4, 100000, 100000])),
     "latent shape"),
    ("p09d", lambda d: _edit_json(d / "pipeline.json", lambda c: c["stages"]["clip"].update(path="../elsewhere")),
     "leaves the pipeline folder"),
    ("p09e", lambda d: _truncate(d / "clip" / "tokenizer.json"), "tokenizer.json"),
    ("p10", lambda d: _edit_json(d / "pipeline.json", lambda c: c.update(format="something-else/99")), "format"),
    ("m1", lambda d: _perturb(d / "autoencoder" / "model.safetensors"), "weights hash"),
    ("m3", lambda d: _edit_json(d / "denoiser" / "config.json",
                                lambda c: c["conditioning"].update(autoencoder_sha256="0" * 16)), "config was edited"),
]


def _perturb(path: Path):
    from safetensors.torch import load_file, save_file
    w = load_file(path)
    k = next(k for k, v in w.items() if v.is_floating_point())
    w[k] = w[k] + 1e-3
    save_file(w, path)


@pytest.mark.parametrize("case,breaker,words", PIPELINE_FILES, ids=[c[0] for c in PIPELINE_FILES])
def test_broken_pipeline_files(tiny_pipeline, tmp_path, capsys, case, breaker, words):
    d = tmp_path / "demo"
    shutil.copytree(tiny_pipeline, d)
    breaker(d)
    rc, err = run([a.format(pipe=d) for a in S] + ["--out", tmp_path / "x.npz"], capsys)
    assert rc == 2 and words in one_line(err), err
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("case,words", [("p11", "not a regular file"), ("p11b", "model.safetensors")])
def test_special_files_are_refused_not_read(tiny_pipeline, tmp_path, capsys, case, words):
    d = tmp_path / "demo"
    shutil.copytree(tiny_pipeline, d)
    target = d / "pipeline.json" if case == "p11" else d / "autoencoder" / "model.safetensors"
    target.unlink()
    if case == "p11":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    rc, err = run([a.format(pipe=d) for a in S] + ["--out", tmp_path / "x.npz"], capsys)
    assert rc == 2 and words in one_line(err)


# ----------------------------------------------------------------------------- section 2: resume state
TRAIN = ["train", "autoencoder", "--data", "shapes", "--preset", "tiny", "--no-progress", "--set", "train.steps=3",
         "--set", "train.ckpt_every=3", "--set", "train.log_every=1"]


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.fixture
def stopped_run(tmp_path):
    """A tiny autoencoder run stopped with a checkpoint at step 3 (its state.pt and the log so far)."""
    out = tmp_path / "tr"
    assert cli([*TRAIN, "--out", str(out)]) == 0
    (out / "metrics.json").unlink()  # as if killed after the checkpoint: resumable
    return out


@pytest.mark.parametrize("case", ["pk1", "pk2", "pk3", "k9"])
def test_bad_resume_state_is_refused_without_unpickling(tmp_path, capsys, case, stopped_run):
    state = stopped_run / "state.pt"
    if case == "pk1":
        torch.save({"x": Evil()}, state)
    elif case == "pk2":
        torch.save({"x": Evil()}, state, _use_new_zipfile_serialization=False)
    elif case == "pk3":
        torch.save({"step": 5}, state)
    else:
        _truncate(state)
    rc, err = run([*TRAIN, "--out", stopped_run, "--resume"], capsys)
    line = one_line(err)
    assert rc == 2 and "state.pt" in line and "unpickled!" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- section 3: image folders
def _folder(d: Path, case: str) -> Path:
    d.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 60, 0, 0)).save(d / f"ok{i}.png")
        (d / f"ok{i}.txt").write_text(f"a picture {i}")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    bad = {"d1": ("cut.png", buf.getvalue()[: len(buf.getvalue()) // 2]),
           "d2": ("hdr.png", b"\x89PNG\r\n\x1a\n" + bytes(range(200))),
           "d3": ("zero.png", b""), "d4": ("t.png", b"this is text")}
    if case in bad:
        name, data = bad[case]
        (d / name).write_bytes(data)
        (d / name).with_suffix(".txt").write_text("caption")
    if case == "d6":
        Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(d / "float.tiff")
        (d / "float.txt").write_text("caption")
    if case == "d7":
        Image.new("RGB", (8, 8)).save(d / "n.png")
    if case == "d8":
        Image.new("RGB", (8, 8)).save(d / "e.png")
        (d / "e.txt").write_text("\n \n")
    if case == "d9":
        Image.new("RGB", (8, 8)).save(d / "u.png")
        (d / "u.txt").write_bytes(b"caf\xe9 \xff\xfe")
    if case == "d10":
        for f in d.glob("*.txt"):
            f.unlink()
        (d / "captions.jsonl").write_text(json.dumps({"file": "../outside.png", "caption": "x"}) + "\n")
    if case == "d11":
        shutil.rmtree(d)
        d.mkdir()
    return d


FOLDER_CASES = [("d1", "cut.png"), ("d2", "hdr.png"), ("d3", "zero.png"), ("d4", "t.png"), ("d6", "float.tiff"),
                ("d7", "n.png"), ("d8", "e.txt"), ("d9", "u.txt"), ("d10", "outside"), ("d11", "no usable")]


@pytest.mark.parametrize("case,words", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_bad_folder_files_name_the_file(tmp_path, capsys, case, words):
    d = _folder(tmp_path / "imgs", case)
    argv = ["train", "autoencoder", "--data", f"folder:{d}", "--preset", "tiny", "--no-progress",
            "--out", tmp_path / "ae"]
    rc, err = run(argv, capsys)
    assert rc == 2 and words in one_line(err), err
    if case not in ("d10", "d11"):  # a bad file is skipped (and counted) with --skip-bad
        from ldmkit.data import load_dataset
        with pytest.warns(UserWarning, match=re.escape(words)):
            ds = load_dataset(f"folder:{d}", skip_bad=True)
        assert ds.skipped == 1 and len(ds) == 3


def test_d12_only_bad_files_with_skip_bad(tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "t.png").write_text("text")
    (d / "t.txt").write_text("caption")
    rc, err = run(["train", "autoencoder", "--data", f"folder:{d}", "--skip-bad", "--preset", "tiny",
                   "--no-progress", "--out", tmp_path / "ae"], capsys)
    assert rc == 2 and "1 skipped" in one_line(err)


@pytest.mark.parametrize("case,setting,words", [("d13", "train.bogus=1", "in 'train'"),
                                                ("d14", "train.steps=abc", "train.steps")])
def test_bad_overrides_name_the_key(tmp_path, capsys, case, setting, words):
    rc, err = run(["train", "autoencoder", "--data", "shapes", "--preset", "tiny", "--no-progress", "--set", setting,
                   "--out", tmp_path / "ae"], capsys)
    assert rc == 2 and words in one_line(err)


# ----------------------------------------------------------------------------- section 4: resume
def test_k4_a_torn_log_line_does_not_block_resume(stopped_run, capsys):
    with open(stopped_run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "rec": 0.71')
    rc, err = run([*TRAIN, "--out", stopped_run, "--resume"], capsys)
    assert rc == 0, err
    rows = [json.loads(r) for r in (stopped_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.mark.parametrize("case,setup,extra,words", [
    ("k5", lambda d: (d / "state.pt").unlink(), ["--resume"], "does not exist"),
    ("k6", lambda d: None, [], "already holds a run"),
    ("k7", lambda d: None, ["--resume", "--set", "train.lr=0.5"], "train.lr"),
    ("k8", lambda d: _truncate(d / "config.json"), ["--resume"], "config.json"),
    ("k10", lambda d: ((d / "state.pt").unlink(), (d / "metrics.json").write_text("{}")), ["--set", "train.seed=5"],
     "finished"),
])
def test_resume_mistakes(stopped_run, capsys, case, setup, extra, words):
    setup(stopped_run)
    before = {p.name: p.read_bytes() for p in stopped_run.iterdir() if p.is_file() and p.name != ".lock"}
    rc, err = run([*TRAIN, "--out", stopped_run, *extra], capsys)
    assert rc == 2 and words in one_line(err), err
    after = {p.name: p.read_bytes() for p in stopped_run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing was touched


def test_c2_a_second_training_into_the_same_folder_is_refused(tmp_path, capsys):
    """A live training process holds the folder (its PID in .lock): a second run is refused and changes nothing."""
    out = tmp_path / "tr"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{holder.pid}\n")
        rc, err = run([*TRAIN, "--set", "train.seed=1", "--out", out], capsys)
        assert rc == 2 and f"PID {holder.pid}" in one_line(err)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    rc, err = run([*TRAIN, "--out", out], capsys)  # the holder is gone: its stale lock is taken over
    assert rc == 0, err


# ----------------------------------------------------------------------------- section 7: full and read-only disks
def _private_mounts() -> list[str] | None:
    """A command prefix that runs a shell script in a private mount namespace (root only), else None."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return None if probe.returncode else ["unshare", "-m", "sh", "-c"]


def test_f2_f3_unwritable_or_full_output_fails_in_one_line_and_keeps_the_old_file(tiny_pipeline, tmp_path):
    prefix = _private_mounts()
    if prefix is None:
        pytest.skip("needs root and unshare -m (private mounts) to make a small or read-only disk")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    py = sys.executable
    sample = f"{py} -m ldmkit sample {tiny_pipeline} --prompt 'a red circle' --steps 2 --no-progress"
    script = (f"mount -t tmpfs -o size=64k tmpfs {mnt} && {py} -c \"import numpy as np; "
              f"np.savez('{mnt}/x.npz', a=np.arange(3))\" && md5sum {mnt}/x.npz && "
              f"{sample} --num 40 --out {mnt}/x.npz; echo rc=$?; md5sum {mnt}/x.npz; ls -a {mnt}; "
              f"mount -o remount,ro {mnt} && {sample} --num 1 --out {mnt}/x.npz; echo rc=$?")
    res = subprocess.run([*prefix, script], capture_output=True, text=True, timeout=600)
    out = res.stdout
    sums = re.findall(r"^([0-9a-f]{32})\s", out, re.M)
    assert len(sums) == 2 and sums[0] == sums[1], out  # the old file is byte-identical after the failure
    assert re.findall(r"rc=(\d+)", out) == ["2", "2"], (out, res.stderr)
    assert "Traceback" not in res.stderr and ".tmp" not in out
    assert "No space left" in res.stderr or "space" in res.stderr
    assert "not writable" in res.stderr or "Read-only" in res.stderr


# ----------------------------------------------------------------------------- the table
def test_every_case_is_in_the_docs_table():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    ids = {i.strip() for cell in re.findall(r"^\| ([a-z][a-z0-9=, ]*) \|", doc, re.M) for i in cell.split(",")}
    here = {c[0] for c in SAMPLE_ARGS} | {c[0] for c in PIPELINE_FILES} | {c[0] for c in FOLDER_CASES}
    here |= {"s02", "s12b", "s12c", "c1", "p11", "p11b", "pk1", "pk2", "pk3", "k9", "d12", "d13", "d14", "k4",
             "k5", "k6", "k7", "k8", "k10", "c2", "f2", "f3"}
    assert here <= ids, sorted(here - ids)
