"""The training toolkit: data order, schedules, EMA, exact resume, NaN stop, distributed-free defaults."""

from dataclasses import dataclass, field, replace

import pytest
import torch
from torch import nn

from ldmkit.checkpoint import load_safetensors, load_state, read_json
from ldmkit.nn import bf16_is_fast
from ldmkit.train import budget, common
from ldmkit.train.common import TrainConfig, TrainingDiverged


@dataclass(frozen=True)
class ToyConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=24, batch_size=8, lr=1e-2, warmup_steps=4, ckpt_every=6, log_every=3, ema_halflife_steps=2.0))
    width: int = 16


class Stop(Exception):
    pass


def toy_train(out, cfg=ToyConfig(), resume=False, stop_after=None, poison_at=None, clock=None, lrs=None,
              costly_from=None, replan=True, stalls=None):
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
        common.set_lr(opt, common.lr_at(run.nominal(step), tc))
        if lrs is not None:
            lrs.append(opt.param_groups[0]["lr"])
        costly = costly_from is not None and run.nominal(step) >= costly_from
        if replan and costly_from is not None:
            run.replan_at(step, costly_from)  # as CLIP does when its text tower unlocks
        if clock is not None:
            clock.t += 1.5 if costly else 1.0  # a step takes one second of the fake clock (1.5 s once costly)
            clock.t += (stalls or {}).get(step, 0.0)  # the machine stalls (another process, the VM)
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        if poison_at is not None and step == poison_at:
            loss = loss * float("nan")
        loss.backward()
        common.clip_grad(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.ema_update(ema, model, run.halflife(tc.ema_halflife_steps))
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
    strip = lambda rows: [{k: v for k, v in __import__("json").loads(r).items() if k in ("step", "loss")} for r in rows]
    assert strip(a) == strip(b)
    assert torch.equal(load_safetensors(tmp_path / "a" / "model.safetensors")["3.weight"], full_ema[3].weight)
    m = read_json(tmp_path / "a" / "metrics.json")
    assert m["steps_done"] == 24 and m["torch"] == torch.__version__ and m["data"] == "synthetic"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_fit_budget_compresses_the_schedule_and_resumes_exactly(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    tc = replace(ToyConfig().train, steps=100, warmup_steps=10, max_minutes=0.5, fit_budget=True,
                 ema_halflife_steps=20.0)
    cfg = ToyConfig(train=tc)
    lrs = []
    model, ema = toy_train(tmp_path / "a", cfg, clock=clock, lrs=lrs)
    # 15 steps at 1 s (3 untimed + 12 timed), then 0.94 * 30 s - 15 s = 13.2 s left: 13 more steps
    plan = read_json(tmp_path / "a" / "plan.json")
    assert plan["steps"] == 28 and plan["nominal_steps"] == 100 and plan["step_seconds"] == pytest.approx(1.0)
    m = read_json(tmp_path / "a" / "metrics.json")
    assert m["steps_done"] == 28 and m["planned_steps"] == 28 and not m["stopped_early"]
    assert m["train_seconds"] == 28.0 <= 30  # the loop ended inside the budget
    assert len(lrs) == 28
    ratio = 100 / 28
    assert lrs[20] == pytest.approx(common.lr_at(20 * ratio, tc))  # the whole schedule, compressed
    assert lrs[-1] == pytest.approx(common.lr_at(27 * ratio, tc)) and lrs[-1] < 0.12 * tc.lr
    # a run stopped after the plan resumes on the same plan and ends with the same weights
    clock.t = 0.0
    with pytest.raises(Stop):
        toy_train(tmp_path / "b", cfg, stop_after=18, clock=clock)
    clock.t = 0.0
    res_model, res_ema = toy_train(tmp_path / "b", cfg, resume=True, clock=clock)
    for p, q in zip(ema.state_dict().values(), res_ema.state_dict().values()):
        assert torch.equal(p, q)
    assert read_json(tmp_path / "b" / "metrics.json")["steps_done"] == 28


def test_replan_fits_the_rest_of_the_schedule_when_steps_cost_more(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    tc = replace(ToyConfig().train, steps=100, warmup_steps=10, max_minutes=1.0, fit_budget=True)
    cfg = ToyConfig(train=tc)
    lrs = []
    _, ema = toy_train(tmp_path / "a", cfg, clock=clock, lrs=lrs, costly_from=30)
    # first plan at 1 s/step: 15 + int(0.94 * 60 - 15) = 56 steps (ratio 100/56). Nominal step 30 is reached at
    # step 17; steps 20-31 are timed at 1.5 s; at step 32, 17 + 15 * 1.5 = 39.5 s are spent and 56.4 - 39.5 s
    # buy 11 more steps for the nominal steps 32 * 100/56 .. 100
    r0 = 100 / 56
    plan = read_json(tmp_path / "a" / "plan.json")
    assert plan["steps"] == 43 and plan["first_ratio"] == pytest.approx(r0)
    (a, n, r), = plan["segments"]
    assert a == 32 and n == pytest.approx(32 * r0) and r == pytest.approx((100 - 32 * r0) / 11)
    m = read_json(tmp_path / "a" / "metrics.json")
    assert m["steps_done"] == 43 and not m["stopped_early"] and m["train_seconds"] == 56.0 <= 60
    assert lrs[31] == pytest.approx(common.lr_at(31 * r0, tc))  # before the re-plan: the first ratio
    assert lrs[42] == pytest.approx(common.lr_at(n + 10 * r, tc)) and lrs[42] < 0.12 * tc.lr  # the schedule's end
    # without the stage's call the periodic re-timing catches the change: it is due at a quarter of the first plan
    # (step 15 + 10) and times every step since the first plan (steps 15-26 once 12 are done): their median is
    # 1.5 s (steps 15 and 16 took 1 s); 32 s spent at step 27, 24.4 s buy 16 more steps. The half-way re-timing
    # (due at step 35, steps 27-38) finds the same cost and keeps the end
    clock.t = 0.0
    toy_train(tmp_path / "c", cfg, clock=clock, costly_from=30, replan=False)
    m = read_json(tmp_path / "c" / "metrics.json")
    (a2, n2, r2), (a3, _, r3) = read_json(tmp_path / "c" / "plan.json")["segments"]
    assert not m["stopped_early"] and m["steps_done"] == 43 and m["train_seconds"] == 56.0
    assert a2 == 27 and n2 == pytest.approx(27 * r0) and r2 == pytest.approx((100 - 27 * r0) / 16)
    assert a3 == 39 and r3 == pytest.approx(r2)
    # with neither, the guard stops the run before step 45 (59 s spent, a 1.5 s step would end past 60 s), at
    # nominal step ~80, its schedule unfinished
    monkeypatch.setattr(budget, "REPLAN_FRACTIONS", ())
    clock.t = 0.0
    toy_train(tmp_path / "d", cfg, clock=clock, costly_from=30, replan=False)
    m = read_json(tmp_path / "d" / "metrics.json")
    assert m["stopped_early"] and m["steps_done"] == 45 and m["train_seconds"] == 59.0
    assert read_json(tmp_path / "d" / "plan.json")["segments"] == []
    # resumed after the re-plan: same plan, same weights
    clock.t = 0.0
    with pytest.raises(Stop):
        toy_train(tmp_path / "b", cfg, stop_after=36, clock=clock, costly_from=30)
    clock.t = 0.0
    _, res_ema = toy_train(tmp_path / "b", cfg, resume=True, clock=clock, costly_from=30)
    assert read_json(tmp_path / "b" / "plan.json")["segments"] == plan["segments"]
    for p, q in zip(ema.state_dict().values(), res_ema.state_dict().values()):
        assert torch.equal(p, q)


def test_a_stall_at_a_replan_does_not_shrink_the_run(tmp_path, monkeypatch):
    """Steps 20-22 take 5 s instead of 1 (a stall of 12 s) just before the periodic re-timing (due at step 25).
    The re-plan at step 27 reads the median of steps 15-26 (1 s), not their mean (2 s), and the run uses its
    budget: 27 + 12 = 39 s spent, 17.4 s left, 17 more steps (the mean would have planned 8 and ended at 47 s)."""
    clock = FakeClock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    tc = replace(ToyConfig().train, steps=100, warmup_steps=10, max_minutes=1.0, fit_budget=True)
    toy_train(tmp_path / "a", ToyConfig(train=tc), clock=clock, stalls={20: 4.0, 21: 4.0, 22: 4.0})
    plan = read_json(tmp_path / "a" / "plan.json")
    (a, n, r), (a2, _, r2) = plan["segments"]
    assert a == 27 and r == pytest.approx((100 - 27 * 100 / 56) / 17) and plan["steps"] == 44
    assert a2 == 39 and r2 == pytest.approx(r) and plan["step_seconds"] == pytest.approx(1.0)
    m = read_json(tmp_path / "a" / "metrics.json")
    assert m["steps_done"] == 44 and not m["stopped_early"] and m["train_seconds"] == 56.0


def test_fit_to_budget_counts():
    assert budget.fit_to_budget(100, 15, 2.0, 41.0) == 35
    assert budget.fit_to_budget(100, 15, 0.01, 1e6) == 100  # never more than configured
    assert budget.fit_to_budget(100, 15, 5.0, -3.0) == 16   # over budget already: at least one more step


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
