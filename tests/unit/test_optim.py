"""Optimizer construction and the lr schedules: registry keys, param groups, shapes, exact resume."""
from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

from mltrack import config
from mltrack.config import OptimizerConfig, SchedulerConfig
from mltrack.errors import CheckpointError, ConfigError
from mltrack.optim import OPTIMIZERS, SCHEDULERS, LRSchedule, build_optimizer, build_scheduler


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5), nn.LayerNorm(5))


def _built_net() -> nn.Module:
    net = _net()
    net(torch.zeros(1, 3, 5, 5))  # materialise the lazy layer
    return net


def _opt(name: str = "sgd", lr: float = 1.0) -> torch.optim.Optimizer:
    return build_optimizer(OptimizerConfig(name=name, lr=lr, weight_decay=0.0), _built_net())


def _lrs(schedule: LRSchedule, steps: int) -> list[float]:
    """lr used by each of ``steps`` optimizer steps."""
    out = []
    for _ in range(steps):
        out.append(schedule.current_lr())
        schedule.step_batch()
    return out


def test_registry_keys_are_exactly_the_config_literals() -> None:
    assert set(OPTIMIZERS) == set(typing.get_args(config.OptimizerName))
    assert set(SCHEDULERS) == set(typing.get_args(config.SchedulerName))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_no_weight_decay_on_biases_and_norm_parameters(name: str) -> None:
    net = _built_net()
    net[0].bias.requires_grad_(False)  # frozen: must be left out
    cfg = OptimizerConfig(name=name, lr=0.1, weight_decay=0.5, momentum=0.8, nesterov=True, betas=(0.8, 0.9))
    opt = build_optimizer(cfg, net)
    assert type(opt).__name__ == {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[name]
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in (net[1].weight, net[1].bias, net[3].bias, net[4].weight, net[4].bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.5, 0.0)
    assert all(g["lr"] == 0.1 for g in opt.param_groups)
    if name == "sgd":
        assert decay["momentum"] == 0.8 and decay["nesterov"] is True
    else:
        assert decay["betas"] == (0.8, 0.9)


def test_adamw_step_decays_weights_but_leaves_biases_and_norms() -> None:
    net = _built_net()
    opt = build_optimizer(OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.5), net.parameters())
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only decoupled weight decay can move a parameter
    opt.step()
    for n, p in net.named_parameters():
        if p.ndim >= 2:
            assert torch.allclose(p, before[n] * (1 - 0.1 * 0.5)), n
        else:
            assert torch.equal(p, before[n]), n


def test_nesterov_without_momentum_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="optimizer.nesterov needs optimizer.momentum > 0"):
        build_optimizer(OptimizerConfig(name="sgd", momentum=0.0, nesterov=True), _built_net())


def test_cosine_warms_up_linearly_then_decays_to_min_lr() -> None:
    sched = build_scheduler(SchedulerConfig(name="cosine", warmup_epochs=1, min_lr=0.01), _opt(), 10, 5, max_lr=1.0)
    assert sched.interval == "step"
    lrs = _lrs(sched, 50)
    assert lrs[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert max(lrs) == pytest.approx(1.0) and lrs.count(max(lrs)) == 1
    decay = lrs[5:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lrs[5 + 22] == pytest.approx(0.01 + 0.99 * 0.5)  # halfway through the 44-step decay
    assert lrs[-1] == pytest.approx(0.01)
    sched.step_batch()
    assert sched.current_lr() == pytest.approx(0.01)  # held at the floor past the end
    sched.step_epoch(None)  # epoch ticks do not move a per-step schedule
    assert sched.current_lr() == pytest.approx(0.01)


def test_onecycle_rises_to_max_lr_then_anneals() -> None:
    opt = _opt(lr=123.0)  # the optimizer's own lr is replaced by the schedule's
    sched = build_scheduler(SchedulerConfig(name="onecycle"), opt, 4, 25, max_lr=0.4)
    lrs = _lrs(sched, 100)
    assert lrs[0] == pytest.approx(0.4 / 25)
    assert max(lrs) == pytest.approx(0.4)
    assert lrs.index(max(lrs)) == round(0.3 * 99)
    assert lrs[-1] == pytest.approx(0.4 / 25 / 1e4)
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_step_and_none_change_only_on_epochs() -> None:
    step = build_scheduler(SchedulerConfig(name="step", step_size=2, gamma=0.5), _opt(), 6, 3, max_lr=0.8)
    none = build_scheduler(SchedulerConfig(name="none"), _opt(), 6, 3, max_lr=0.8)
    seen_step, seen_none = [], []
    for _ in range(6):
        _lrs(step, 3)
        seen_none += _lrs(none, 3)
        seen_step.append(step.current_lr())
        step.step_epoch(None)
        none.step_epoch(0.5)
    assert seen_step == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.2])
    assert seen_none == [0.8] * 18 and none.current_lr() == 0.8


def test_plateau_reduces_after_patience_epochs_without_improvement() -> None:
    cfg = SchedulerConfig(name="plateau", patience=2, factor=0.5)
    sched = build_scheduler(cfg, _opt(), 10, 4, max_lr=1.0)  # mode "min": a loss
    after = []
    for loss in (1.0, 0.9, 0.9, 0.95, 0.9, 0.8, 0.8, float("nan"), 0.8, 0.8):
        _lrs(sched, 4)
        sched.step_epoch(loss)
        after.append(sched.current_lr())
    # Bad epochs 3, 4, 5 (> patience 2) -> halve at epoch 5; improvement at 6; bad 7, 8 (NaN), 9 -> halve at 9.
    assert after == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    # Same decisions as torch's ReduceLROnPlateau (default relative threshold 1e-4).
    ref_opt = _opt()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, mode="min", factor=0.5, patience=2)
    ref_after = []
    for loss in (1.0, 0.9, 0.9, 0.95, 0.9, 0.8, 0.8, float("nan"), 0.8, 0.8):
        ref.step(loss)
        ref_after.append(ref_opt.param_groups[0]["lr"])
    assert after == ref_after
    up = build_scheduler(cfg, _opt(), 10, 4, max_lr=1.0, mode="max")  # an accuracy
    for acc in (0.5, 0.6, 0.6, 0.6, 0.6):
        up.step_epoch(acc)
    assert up.current_lr() == 0.5
    with pytest.raises(ValueError, match="needs the monitored metric"):
        up.step_epoch(None)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_state_dict_round_trip_reproduces_the_lr_sequence(name: str, tmp_path: Path) -> None:
    cfg = SchedulerConfig(name=name, warmup_epochs=1, min_lr=0.001, step_size=1, gamma=0.7, patience=0)
    metrics = [1.0, 0.8, 0.9, 0.9, 0.7, 0.95]

    def run(sched: LRSchedule, epochs: range) -> list[float]:
        seen = []
        for epoch in epochs:
            seen += _lrs(sched, 4)
            sched.step_epoch(metrics[epoch])
        return seen + [sched.current_lr()]

    full = run(build_scheduler(cfg, _opt(), 6, 4, max_lr=0.3, mode="min"), range(6))
    first = build_scheduler(cfg, _opt(), 6, 4, max_lr=0.3, mode="min")
    head = run(first, range(3))[:-1]
    torch.save({"scheduler": first.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["scheduler"]
    resumed = build_scheduler(cfg, _opt(lr=9.9), 6, 4, max_lr=0.3, mode="min")
    resumed.load_state_dict(state)
    assert head + run(resumed, range(3, 6)) == full
    assert len(set(full)) > 1 or name == "none"


def test_loading_another_schedule_kind_is_refused() -> None:
    state = build_scheduler(SchedulerConfig(name="cosine"), _opt(), 2, 2, max_lr=0.1).state_dict()
    other = build_scheduler(SchedulerConfig(name="onecycle"), _opt(), 2, 2, max_lr=0.1)
    with pytest.raises(CheckpointError, match="lr schedule is 'cosine' but scheduler.name is 'onecycle'"):
        other.load_state_dict(state)


def test_param_groups_keep_their_lr_ratio() -> None:
    a, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}], lr=1.0)
    sched = build_scheduler(SchedulerConfig(name="cosine", warmup_epochs=0), opt, 2, 2, max_lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])
    sched.step_batch()
    assert opt.param_groups[1]["lr"] == pytest.approx(opt.param_groups[0]["lr"] / 10)
    assert 0 < opt.param_groups[0]["lr"] < 0.5 and not math.isnan(opt.param_groups[0]["lr"])
