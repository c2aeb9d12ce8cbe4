"""The training toolkit: data order, schedules, EMA, exact resume, NaN stop, distributed-free defaults."""

import json
from dataclasses import dataclass, field, replace

import pytest
import torch
from torch import nn

from ldmkit.checkpoint import load_safetensors, load_state, read_json
from ldmkit.nn import bf16_is_fast
from ldmkit.train import common
from ldmkit.train.common import TrainConfig, TrainingDiverged


@dataclass(frozen=True)
class ToyConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=24, batch_size=8, lr=1e-2, warmup_steps=4, ckpt_every=6, log_every=3, ema_halflife_steps=2.0))
    width: int = 16


class Stop(Exception):
    pass


def toy_train(out, cfg=ToyConfig(), resume=False, stop_after=None, poison_at=None, clock=None, lrs=None):
    """A miniature stage loop written the way every ldmkit stage is (dropout makes it consume RNG)."""
    tc = cfg.train
    run = common.start_run(out, cfg, tc, "toy", data="synthetic", resume=resume, progress=False)
    x = torch.linspace(-1, 1, 40)[:, None]
    y = torch.sin(3 * x)
    model = nn.Sequential(nn.Linear(1, cfg.width), nn.Tanh(), nn.Dropout(0.2), nn.Linear(cfg.width, 1))
    ema = nn.Sequential(nn.Linear(1, cfg.width), nn.Tanh(), nn.Dropout(0.2), nn.Linear(cfg.width, 1))
    ema.load_state_dict(model.state_dict())
    opt = common.make_adamw(model.parameters(), tc)
    start = run.restore({"model": model, "ema": ema}, {"opt": opt})
    step = start
    for step in run.steps(start, tc.steps):
        idx, _ = common.batch_indices(len(x), tc.batch_size, step, tc.seed)
        common.set_lr(opt, common.lr_at(step, tc))
        if lrs is not None:
            lrs.append(opt.param_groups[0]["lr"])
        if clock is not None:
            clock.t += 1.0  # a step takes one second of the fake clock
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        if poison_at is not None and step == poison_at:
            loss = loss * float("nan")
        loss.backward()
        common.clip_grad(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.ema_update(ema, model, tc.ema_halflife_steps)
        run.log(step, loss=loss.item())
        if run.should(tc.ckpt_every, step):
            run.save(step + 1, {"model": model, "ema": ema}, {"opt": opt}, ema.state_dict())
            if stop_after is not None and step + 1 >= stop_after:
                raise Stop
        step += 1
    run.finish(ema.state_dict(), {"final_loss": loss.item()}, step)
    return model, ema


def test_resume_equals_uninterrupted(tmp_path):
    full_model, full_ema = toy_train(tmp_path / "a")
    with pytest.raises(Stop):
        toy_train(tmp_path / "b", stop_after=12)
    assert load_state(tmp_path / "b" / "state.pt")["step"] == 12
    res_model, res_ema = toy_train(tmp_path / "b", resume=True)
    for p, q in zip(full_model.state_dict().values(), res_model.state_dict().values()):
        assert torch.equal(p, q)
    for p, q in zip(full_ema.state_dict().values(), res_ema.state_dict().values()):
        assert torch.equal(p, q)
    a = [r for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [r for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    def strip(rows):
        return [{k: v for k, v in json.loads(r).items() if k in ("step", "loss")} for r in rows]
    assert strip(a) == strip(b)
    assert torch.equal(load_safetensors(tmp_path / "a" / "model.safetensors")["3.weight"], full_ema[3].weight)
    m = read_json(tmp_path / "a" / "metrics.json")
    assert m["steps_done"] == 24 and m["torch"] == torch.__version__ and m["data"] == "synthetic"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_minutes_budget_stops_saves_and_is_opt_in(tmp_path, monkeypatch):
    """Presets are fixed step counts; `--minutes` (train.max_minutes) only stops the loop early and saves."""
    clock = FakeClock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    tc = replace(ToyConfig().train, steps=100, warmup_steps=10, max_minutes=0.5)
    lrs = []
    _, ema = toy_train(tmp_path / "a", ToyConfig(train=tc), clock=clock, lrs=lrs)
    m = read_json(tmp_path / "a" / "metrics.json")
    # steps take 1 s: after 30 steps 30 s are spent and a 31st would end past 30 s
    assert m["stopped_early"] and m["steps_done"] == 30 and m["train_seconds"] == 30.0
    assert lrs == [pytest.approx(common.lr_at(k, tc)) for k in range(30)]  # the schedule is not compressed
    assert torch.equal(load_safetensors(tmp_path / "a" / "model.safetensors")["3.weight"], ema[3].weight)
    # without a budget the same config runs every step, and its first 30 steps are the same steps
    clock.t = 0.0
    lrs_full = []
    toy_train(tmp_path / "b", ToyConfig(train=replace(tc, max_minutes=0.0)), clock=clock, lrs=lrs_full)
    m = read_json(tmp_path / "b" / "metrics.json")
    assert not m["stopped_early"] and m["steps_done"] == 100 and lrs_full[:30] == lrs


def test_existing_run_and_resume_errors(tmp_path):
    toy_train(tmp_path / "a")
    with pytest.raises(FileExistsError, match="--resume"):
        toy_train(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="state.pt"):
        toy_train(tmp_path / "new", resume=True)
    with pytest.raises(ValueError, match="width"):
        toy_train(tmp_path / "a", cfg=ToyConfig(width=8), resume=True)


def test_nan_stops_and_keeps_last_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="step 14") as e:
        toy_train(tmp_path / "n", poison_at=14)
    assert "intact" in str(e.value)
    assert load_state(tmp_path / "n" / "state.pt")["step"] == 12
    w = load_safetensors(tmp_path / "n" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in w.values())


def test_batch_indices_cover_each_epoch_and_split_by_rank():
    n, bs = 10, 4
    seen = torch.cat([common.batch_indices(n, bs, s, seed=3)[0] for s in range(5)])  # 20 samples = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    whole, gidx = common.batch_indices(n, bs, 2, seed=3)
    parts = [common.batch_indices(n, bs, 2, seed=3, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole) and gidx.tolist() == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="divisible"):
        common.batch_indices(n, 5, 0, seed=0, world=2)


def test_lr_schedule_shape():
    tc = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert common.lr_at(0, tc) == pytest.approx(0.1) and common.lr_at(9, tc) == pytest.approx(1.0)
    assert common.lr_at(10, tc) == pytest.approx(1.0) and common.lr_at(100, tc) == pytest.approx(0.1)
    lrs = [common.lr_at(s, tc) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_ema_half_life():
    ema, model = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    nn.init.zeros_(ema.weight), nn.init.ones_(model.weight)
    for _ in range(5):
        common.ema_update(ema, model, halflife_steps=5)
    assert ema.weight.item() == pytest.approx(0.5, abs=1e-6)  # after one half-life, halfway there


def test_autocast_choices():
    dev = torch.device("cpu")
    with common.autocast(dev, "bf16"):  # bf16 only where the CPU has bf16 units; emulated bf16 is 10-20x slower
        expected = torch.bfloat16 if bf16_is_fast(dev) else torch.float32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == expected
    assert common.effective_precision(dev, "bf16") == ("bf16" if bf16_is_fast(dev) else "fp32")
    assert common.effective_precision(dev, "fp32") == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        common.autocast(dev, "fp16")
    with pytest.raises(ValueError, match="device"):
        common.resolve_device("tpu")


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_state_takes_the_parameter_layout_on_resume(fused):
    # A channels-last parameter resumed with contiguous AdamW moments (a checkpoint written before the UNet's
    # kernels went channels-last): after match_param_layout the next step equals the uninterrupted run's.
    g = torch.Generator().manual_seed(0)
    w0, g1, g2 = (torch.randn(8, 4, 3, 3, generator=g) for _ in range(3))

    def param():
        return nn.Parameter(w0.clone().contiguous(memory_format=torch.channels_last))

    def opt_for(p):
        return torch.optim.AdamW([p], lr=0.1, fused=fused)

    ref = param()
    opt = opt_for(ref)
    for grad in (g1, g2):
        ref.grad = grad.clone()
        opt.step()
    p = param()
    opt = opt_for(p)
    p.grad = g1.clone()
    opt.step()
    sd = opt.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):
        sd["state"][0][key] = sd["state"][0][key].contiguous()
    opt = opt_for(p)
    opt.load_state_dict(sd)
    common.match_param_layout(opt)
    assert all(opt.state[p][k].stride() == p.stride() for k in ("exp_avg", "exp_avg_sq"))
    p.grad = g2.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=1e-6)


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import os
    import subprocess
    import sys

    from ldmkit.checkpoint import LOCK_FILE
    out = tmp_path / "a"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / LOCK_FILE).write_text(f"{other.pid}\n")  # another live process is writing here
        with pytest.raises(FileExistsError, match=f"PID {other.pid}"):
            toy_train(out)
    finally:
        other.kill()
        other.wait()
    (out / ".model.safetensors.abc123.tmp").write_bytes(b"half a file")  # what a kill mid-write leaves
    toy_train(out)  # the lock's writer is gone: taken over; the orphaned temporary is removed
    assert not (out / LOCK_FILE).exists() and not list(out.glob(".*.tmp"))
    assert read_json(out / "metrics.json")["steps_done"] == 24
    with pytest.raises(FileExistsError, match="--overwrite"):  # a finished stage is never silently replaced
        os.remove(out / "state.pt")
        toy_train(out)


def test_resume_survives_a_cut_off_log_line(tmp_path):
    full_model, _ = toy_train(tmp_path / "a")
    with pytest.raises(Stop):
        toy_train(tmp_path / "b", stop_after=12)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 15, "loss": 0.1')  # a crash mid-append
    _, _ = toy_train(tmp_path / "b", resume=True)
    rows = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl")
                                                                 .read_text().splitlines())]


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, signum):
    """A signal mid-run: the step finishes, a checkpoint is written there, the run stops without metrics.json;
    --resume then ends bit-identical to an uninterrupted run, log rows included."""
    import os
    import signal as sig
    full_model, full_ema = toy_train(tmp_path / "a")
    log = common.Run.log
    sent = []
    before = sig.getsignal(getattr(sig, signum))

    def log_and_signal(self, step, **scalars):
        log(self, step, **scalars)
        if step == 8 and not sent:  # mid-way between the checkpoints at 6 and 12
            sent.append(True)
            os.kill(os.getpid(), getattr(sig, signum))
    monkeypatch.setattr(common.Run, "log", log_and_signal)
    with pytest.raises(common.TrainingInterrupted, match="--resume"):
        toy_train(tmp_path / "b")
    assert load_state(tmp_path / "b" / "state.pt")["step"] == 9  # step 8 finished, then saved and stopped
    assert not (tmp_path / "b" / "metrics.json").exists()
    monkeypatch.setattr(common.Run, "log", log)
    res_model, res_ema = toy_train(tmp_path / "b", resume=True)
    for p, q in zip(full_ema.state_dict().values(), res_ema.state_dict().values()):
        assert torch.equal(p, q)
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == \
        (tmp_path / "b" / "metrics.jsonl").read_text().count("\n")
    strip = [[{k: v for k, v in json.loads(r).items() if k in ("step", "loss")} for r in
              (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("a", "b")]
    assert strip[0] == strip[1]
    assert sig.getsignal(getattr(sig, signum)) is before  # the handler is restored after the loop
