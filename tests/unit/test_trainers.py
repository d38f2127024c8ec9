"""Trainers: every registered trainer trains through ``mltrack.run.train``; dp and accelerate specifics
(privacy accounting, layer fixes, empty Poisson batches, accumulation semantics) through the one loop."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mltrack.config import RunConfig, load_config
from mltrack.errors import CheckpointError, ConfigError
from mltrack.trainers import TRAINERS, build_trainer
from mltrack.trainers.loop import FitContext, train_epoch

CPU = torch.device("cpu")

# What each trainer keeps in the checkpoint's "trainer" entry. mixed_precision runs bf16 on CPU, which
# needs no GradScaler (fp16 + scaler is GPU-only), so its state is empty here.
TRAINER_STATE_KEYS: dict[str, set[str]] = {
    "standard": set(),
    "mixed_precision": set(),
    "accelerate": {"world_size", "mixed_precision"},
    "dp": {"accountant", "noise_multiplier", "sample_rate", "grad_sample_mode", "replaced_modules"},
}
TRAINER_SETS: dict[str, list[str]] = {"mixed_precision": ["training.amp_dtype=bfloat16"]}
CHECKPOINT_KEYS = {"schema", "model", "optimizer", "scheduler", "trainer", "progress", "rng", "config",
                   "config_hash", "class_map", "split_digest", "dataset_fingerprint", "mlflow_run_id"}


def _cfg(*sets: str) -> RunConfig:
    return load_config(None, ["training.device=cpu", "tracking.progress='off'", *sets])


def _run_cfg(data_dir: Path, trainer: str, *sets: str) -> RunConfig:
    return _cfg(f"data.data_dir={data_dir}", "data.dataset_name=tiny", "data.image_size=16", "data.num_workers=0",
                "data.transforms=none", f"training.trainer_type={trainer}", "training.num_epochs=1",
                "training.batch_size=8", "tracking.tensorboard=false", "tracking.confusion_every_epoch=false",
                *TRAINER_SETS.get(trainer, []), *sets)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp, MLflow in a sqlite store there, no run inherited from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _weights_only(path: Path) -> dict[str, Any]:
    torch.serialization.clear_safe_globals()  # nothing allow-listed: plain data only
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- every trainer, end to end


def test_every_trainer_has_expectations() -> None:
    assert set(TRAINER_STATE_KEYS) == set(TRAINERS)


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_trainer_trains_one_epoch_through_run_train(trainer: str, tiny_dataset: Callable[..., Path],
                                                     in_tmp: Path) -> None:
    import mlflow

    from mltrack.models import build_model
    from mltrack.run import train

    data_dir = tiny_dataset(n_classes=3, per_class=10, size=16, folds=2)
    result = train(_run_cfg(data_dir, trainer))

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mltrack.trainer_type"] == trainer
    losses = client.get_metric_history(result.run_id, "train/loss")
    assert [m.step for m in losses] == [0] and math.isfinite(losses[0].value)
    assert 0.0 <= run.data.metrics["val/acc"] <= 1.0 and "test/acc" in run.data.metrics

    state = _weights_only(result.run_dir / "weights" / "last.pt")
    assert CHECKPOINT_KEYS <= set(state)
    assert set(state["trainer"]) == TRAINER_STATE_KEYS[trainer]
    assert state["progress"]["epoch"] == 1 and state["progress"]["global_step"] >= 1
    assert {"torch", "python", "numpy", "loader"} <= set(state["rng"])
    assert state["optimizer"]["state"], "the optimizer state must hold the step it took"
    model = build_model(_run_cfg(data_dir, trainer).model, 3)
    if trainer == "dp":
        from mltrack.trainers.dp import fix_model

        model, _ = fix_model(model)
        history = state["trainer"]["accountant"]["history"]
        assert history and sum(n for _, _, n in history) == state["progress"]["global_step"]
        assert math.isfinite(run.data.metrics["dp/epsilon"]) and run.data.metrics["dp/epsilon"] > 0
        assert run.data.params["dp.poisson_sampling"] == "True"
    model.load_state_dict(state["model"])  # strict: ordinary keys, no wrapper prefixes
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


# ---------------------------------------------------------------- loop-level helpers


class TinyConv(nn.Module):
    """No BatchNorm, no dropout: its training is a pure function of the data order (for exact comparisons)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _tensor_loader(n: int, batch: int, seed: int = 1, size: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, size, size, generator=gen), torch.arange(n) % 3
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def _context(cfg: RunConfig, model: nn.Module, train: DataLoader, optimizer: torch.optim.Optimizer | None = None,
             device: torch.device = CPU) -> FitContext:
    from mltrack.optim import build_optimizer, build_scheduler

    trainer = build_trainer(cfg.training, device)
    optimizer = optimizer if optimizer is not None else build_optimizer(cfg.optimizer, model)
    model, optimizer, loaders = trainer.prepare(model, optimizer, {"train": train, "val": None, "test": None})
    schedule = build_scheduler(cfg.scheduler, optimizer, cfg.training.num_epochs, len(loaders["train"]),
                               cfg.optimizer.lr)
    return FitContext(cfg, model, optimizer, schedule, trainer, loaders, nn.CrossEntropyLoss(), ["a", "b", "c"])


def _dp_cfg(*sets: str) -> RunConfig:
    return _cfg("training.trainer_type=dp", "training.num_epochs=2", "optimizer.name=sgd", "optimizer.lr=0.05",
                "scheduler.name=none", *sets)


# ---------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("trainer", ["standard", "accelerate"])
def test_accumulation_matches_larger_batch(trainer: str) -> None:
    """batch 8 x accumulation 2 == batch 16 x 1 after one epoch (48 samples: every group is full).

    Same shuffle (the sampler's permutation does not depend on the batch size), SGD without momentum,
    no BatchNorm. Tolerance 1e-6 absolute: only the float summation order differs.
    """
    params = []
    for batch, accum in ((16, 1), (8, 2)):
        torch.manual_seed(3)
        cfg = _cfg(f"training.trainer_type={trainer}", "training.num_epochs=1", f"training.batch_size={batch}",
                   f"training.gradient_accumulation_steps={accum}", "scheduler.name=none")
        model = TinyConv()
        initial = [p.detach().clone() for p in model.parameters()]
        ctx = _context(cfg, model, _tensor_loader(48, batch), torch.optim.SGD(model.parameters(), lr=0.5))
        train_epoch(ctx)
        assert ctx.state.global_step == 3
        params.append([p.detach().clone() for p in ctx.trainer.unwrap(ctx.model).parameters()])
        ctx.trainer.end()
    assert all(not torch.equal(a, b) for a, b in zip(initial, params[1]))
    for big, small in zip(*params):
        torch.testing.assert_close(small, big, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- mixed precision


def test_mixed_precision_bf16_on_cpu_trains_finite() -> None:
    cfg = _cfg("training.trainer_type=mixed_precision", "training.amp_dtype=bfloat16", "training.num_epochs=1",
               "training.batch_size=8", "scheduler.name=none")
    ctx = _context(cfg, TinyConv(), _tensor_loader(32, 8))
    metrics, _ = train_epoch(ctx)
    assert math.isfinite(metrics["train/loss"]) and ctx.state.global_step == 4
    assert ctx.trainer.state_dict() == {}  # bf16 needs no GradScaler


# ---------------------------------------------------------------- accelerate specifics


def test_accelerate_precision_follows_amp_dtype_only_when_set() -> None:
    plain = build_trainer(_cfg("training.trainer_type=accelerate").training, CPU)
    assert plain.accelerator.mixed_precision == "no" and plain.is_main_process and plain.world_size == 1
    plain.end()
    bf16 = build_trainer(_cfg("training.trainer_type=accelerate", "training.amp_dtype=bfloat16").training, CPU)
    assert bf16.accelerator.mixed_precision == "bf16"  # a second Accelerator in one process (cv folds, trials)
    with bf16.autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    bf16.end()
    with pytest.raises(ConfigError, match="float16 needs a CUDA GPU"):
        build_trainer(_cfg("training.trainer_type=accelerate", "training.amp_dtype=float16").training, CPU)


def test_accelerate_gather_counts_every_sample_once() -> None:
    """Prepared eval loaders go through gather_for_metrics; an unprepared loader is left as it is."""
    cfg = _cfg("training.trainer_type=accelerate")
    trainer = build_trainer(cfg.training, CPU)
    val = DataLoader(TensorDataset(torch.arange(7.0), torch.arange(7)), batch_size=4)
    train = _tensor_loader(8, 4)
    model = TinyConv()
    _, _, loaders = trainer.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    {"train": train, "val": val, "test": None})
    seen = [trainer.gather(x, y)[1] for x, y in loaders["val"]]
    assert torch.cat(seen).tolist() == list(range(7))
    plain = [trainer.gather(x, y)[1] for x, y in val]
    assert torch.cat(plain).tolist() == list(range(7))
    # The seeded generator survives prepare: checkpoints save, and resume restores, the one that shuffles.
    assert loaders["train"].generator is train.generator
    trainer.end()


# ---------------------------------------------------------------- dp


def test_dp_fixes_batchnorm_and_trains() -> None:
    """small_cnn has BatchNorm: it is replaced by GroupNorm, logged, the optimizer follows, training works."""
    from mltrack.models import build_model
    from mltrack.optim import build_optimizer

    cfg = _dp_cfg("training.num_epochs=1")
    model = build_model(cfg.model, 3)
    optimizer = build_optimizer(cfg.optimizer, model)
    ctx = _context(cfg, model, _tensor_loader(24, 4, size=16), optimizer)
    plain = ctx.trainer.unwrap(ctx.model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in plain.modules())
    assert ctx.trainer.replaced and "BatchNorm2d -> GroupNorm" in ctx.trainer.extra_params()["dp.replaced_modules"]
    before = [p.detach().clone() for p in plain.parameters()]
    metrics, _ = train_epoch(ctx)
    assert math.isfinite(metrics["train/loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, plain.parameters()))  # every param was updated
    from mltrack.trainers.dp import fix_model

    assert set(plain.state_dict()) == set(fix_model(build_model(cfg.model, 3))[0].state_dict())


def test_dp_epsilon_never_exceeds_target() -> None:
    """75 samples, batch 1, 3 epochs = 225 steps: the noise is solved for exactly those steps.

    (Opacus' make_private_with_epsilon would account int(3 / (1/75)) = 224 steps for this case.)
    """
    assert int(3 / (1 / 75)) == 224
    target = 2.0
    cfg = _dp_cfg("training.num_epochs=3", "training.batch_size=1", f"training.dp.target_epsilon={target}",
                  "training.dp.target_delta=0.001")
    ctx = _context(cfg, TinyConv(), _tensor_loader(75, 1))
    assert ctx.trainer.planned_steps == 225
    epsilons = []
    for _ in range(3):
        train_epoch(ctx)
        epsilons.append(ctx.trainer.extra_metrics()["dp/epsilon"])
    assert epsilons == sorted(epsilons) and ctx.trainer.steps() == 225
    assert epsilons[-1] <= target
    assert epsilons[-1] > target - 0.1  # the budget is used, not wasted on needless noise


def test_dp_empty_poisson_batches_complete_without_nan() -> None:
    """N=20, batch 1: about a third of the Poisson batches are empty; each is still one noised, accounted step."""
    cfg = _dp_cfg("training.batch_size=1")
    ctx = _context(cfg, TinyConv(), _tensor_loader(20, 1))
    empties = sum(int(y.numel() == 0) for _, y in ctx.loaders["train"])
    assert empties > 0, "seeded Poisson sampling of 20 x q=0.05 yields empty batches"
    for epoch in range(2):
        metrics, _ = train_epoch(ctx)
        assert math.isfinite(metrics["train/loss"])
    assert ctx.state.nonfinite_steps == 0
    assert ctx.state.global_step == 40 and ctx.trainer.steps() == 40
    assert all(torch.isfinite(p).all() for p in ctx.model.parameters())


def test_dp_step_on_an_empty_batch_adds_noise_and_is_accounted() -> None:
    ctx = _context(_dp_cfg("training.batch_size=4"), TinyConv(), _tensor_loader(20, 4))
    before = [p.detach().clone() for p in ctx.model.parameters()]
    ctx.trainer.zero_grad(ctx.optimizer)
    assert ctx.trainer.optimizer_step(ctx.model, ctx.optimizer)  # no forward/backward: an empty batch
    assert ctx.trainer.steps() == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, ctx.model.parameters()))


def test_dp_accountant_survives_weights_only_checkpoint(tmp_path: Path) -> None:
    """2 epochs straight == 1 epoch, checkpoint (weights-only), fresh trainer, 1 more epoch: same epsilon."""
    cfg = _dp_cfg("training.batch_size=4")
    straight = _context(cfg, TinyConv(), _tensor_loader(20, 4))
    for _ in range(2):
        train_epoch(straight)

    first = _context(cfg, TinyConv(), _tensor_loader(20, 4))
    train_epoch(first)
    torch.save({"trainer": first.trainer.state_dict()}, tmp_path / "ckpt.pt")
    state = _weights_only(tmp_path / "ckpt.pt")["trainer"]
    resumed = _context(cfg, TinyConv(), _tensor_loader(20, 4))
    resumed.trainer.load_state_dict(state)
    assert resumed.trainer.epsilon() == first.trainer.epsilon() > 0
    train_epoch(resumed)
    assert resumed.trainer.state_dict()["accountant"] == straight.trainer.state_dict()["accountant"]
    assert resumed.trainer.epsilon() == straight.trainer.epsilon()


def test_dp_refuses_wrong_accountant_on_resume() -> None:
    ctx = _context(_dp_cfg(), TinyConv(), _tensor_loader(8, 4))
    state = ctx.trainer.state_dict()
    state["accountant"]["mechanism"] = "rdp"
    with pytest.raises(CheckpointError, match="accountant"):
        ctx.trainer.load_state_dict(state)


def test_dp_refuses_delta_of_one_over_n_or_more() -> None:
    with pytest.raises(ConfigError, match=r"N = 20 .*target_delta: 5\.0e-03"):
        _context(_dp_cfg("training.dp.target_delta=0.05"), TinyConv(), _tensor_loader(20, 4))


def test_dp_refuses_model_in_eval_mode() -> None:
    with pytest.raises(ConfigError, match="training mode"):
        _context(_dp_cfg(), TinyConv().eval(), _tensor_loader(8, 4))


def test_dp_refuses_balanced_sampler(tiny_dataset: Callable[..., Path]) -> None:
    from mltrack.data.loaders import build_loaders

    data_dir = tiny_dataset(n_classes=3, per_class=6, size=8, folds=2)
    cfg = _dp_cfg(f"data.data_dir={data_dir}", "data.sampler=balanced", "data.num_workers=0",
                  "data.image_size=8", "data.transforms=none")
    loaders = build_loaders(cfg.data, 4, 0, False, "cpu", splits=("train",))
    with pytest.raises(ConfigError, match="WeightedRandomSampler.*data.sampler: shuffle"):
        _context(cfg, TinyConv(), loaders.train)


def test_dp_refuses_gradient_accumulation_and_class_weights() -> None:
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_trainer(_dp_cfg("training.gradient_accumulation_steps=2").training, CPU)
    with pytest.raises(ConfigError, match="class_weights"):
        build_trainer(_dp_cfg("training.class_weights=auto").training, CPU)


def test_dp_torchvision_model_gets_ew_mode_and_steps() -> None:
    """resnet18: 20 BatchNorms replaced; "ew" chosen (Opacus' default "hooks" fails on its in-place ops)."""
    from mltrack.models import build_model

    cfg = _dp_cfg("model.architecture=resnet18", "training.batch_size=2")
    ctx = _context(cfg, build_model(cfg.model, 3), _tensor_loader(4, 2, size=16))
    assert ctx.trainer.grad_sample_mode == "ew" and len(ctx.trainer.replaced) == 20
    images, targets = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    with ctx.trainer.autocast():
        loss = nn.functional.cross_entropy(ctx.model(images), targets)
    ctx.trainer.backward(loss)
    fc = ctx.trainer.unwrap(ctx.model).fc.weight.detach().clone()
    assert ctx.trainer.optimizer_step(ctx.model, ctx.optimizer) and ctx.trainer.steps() == 1
    assert not torch.equal(fc, ctx.trainer.unwrap(ctx.model).fc.weight)


def test_dp_hooks_mode_on_in_place_ops_is_a_config_error() -> None:
    def model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 3))

    with pytest.raises(ConfigError, match="grad_sample_mode: ew"):
        train_epoch(_context(_dp_cfg("training.batch_size=4"), model(), _tensor_loader(16, 4)))
    metrics, _ = train_epoch(_context(_dp_cfg("training.batch_size=4", "training.dp.grad_sample_mode=ew"), model(),
                                      _tensor_loader(16, 4)))
    assert math.isfinite(metrics["train/loss"])


# ---------------------------------------------------------------- non-finite guard


def _nan_loader(n: int, batch: int, bad_batches: set[int]) -> DataLoader:
    """Unshuffled: batch i holds NaN images when i is in ``bad_batches`` (so its loss is NaN)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=gen), torch.arange(n) % 3
    for i in bad_batches:
        x[i * batch:(i + 1) * batch] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


@pytest.mark.parametrize("fused", [True, False], ids=["device_skip", "host_skip"])
def test_nonfinite_step_is_skipped_and_leaves_weights_and_moments(fused: bool) -> None:
    """A NaN batch between good ones: weights, AdamW moments and step count are those of a run that never
    saw it (fused: skipped on the device via found_inf; unfused: skipped after reading the loss back)."""
    from mltrack.optim import build_optimizer

    cfg = _cfg("training.num_epochs=1", "training.batch_size=4", "scheduler.name=none", "training.max_nonfinite_steps=2")
    results = []
    for bad in (set(), {1}):
        torch.manual_seed(5)
        model = TinyConv()
        loader = _nan_loader(12, 4, bad)
        if not bad:  # the reference sees only the two good batches, in the same order
            loader = DataLoader(torch.utils.data.Subset(loader.dataset, [*range(4), *range(8, 12)]), batch_size=4)
        ctx = _context(cfg, model, loader, build_optimizer(cfg.optimizer, model, fused=fused))
        assert ctx.trainer.skips_on_device(ctx.optimizer) is fused
        metrics, _ = train_epoch(ctx)
        state = ctx.optimizer.state[next(ctx.model.parameters())]
        results.append((ctx, [p.detach().clone() for p in ctx.model.parameters()], float(state["step"])))
    (_, clean, clean_steps), (ctx, guarded, guarded_steps) = results
    assert ctx.state.nonfinite_steps == 1 and clean_steps == guarded_steps == 2.0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(clean, guarded))
    assert ctx.state.global_step == (3 if fused else 2)  # device path: a skipped step still counts as a step


@pytest.mark.parametrize("fused", [True, False], ids=["device_skip", "host_skip"])
def test_nonfinite_streak_fails_the_run_at_the_limit(fused: bool) -> None:
    from mltrack.optim import build_optimizer
    from mltrack.trainers.loop import NonFiniteLossError

    cfg = _cfg("training.num_epochs=1", "training.batch_size=4", "training.max_nonfinite_steps=2")
    model = TinyConv()
    ctx = _context(cfg, model, _nan_loader(20, 4, {1, 3, 4}), build_optimizer(cfg.optimizer, model, fused=fused))
    before = [p.detach().clone() for p in ctx.model.parameters()]
    with pytest.raises(NonFiniteLossError, match="2 consecutive optimizer steps.*batch 4"):
        train_epoch(ctx)
    assert all(torch.isfinite(p).all() for p in ctx.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, ctx.model.parameters()))  # good batches stepped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("trainer", ["standard", "mixed_precision"])
def test_nonfinite_guard_on_cuda_skips_without_sync_and_fails_by_epoch_end(trainer: str) -> None:
    """On CUDA the streak is read back lazily: the error comes at the latest at the end of the epoch, and
    no NaN ever reaches the weights (the fused optimizer skipped those steps on the device)."""
    from mltrack.optim import build_optimizer
    from mltrack.trainers.loop import NonFiniteLossError

    cuda = torch.device("cuda")
    cfg = _cfg(f"training.trainer_type={trainer}", "training.num_epochs=1", "training.batch_size=4",
               "training.max_nonfinite_steps=2", "training.channels_last=true")
    model = TinyConv()
    ctx = _context(cfg, model, _nan_loader(24, 4, {1, 3, 4}), build_optimizer(cfg.optimizer, model, fused=True), cuda)
    assert ctx.trainer.skips_on_device(ctx.optimizer)
    with pytest.raises(NonFiniteLossError, match="2 consecutive"):
        train_epoch(ctx)
    assert all(torch.isfinite(p).all() for p in ctx.model.parameters())
    ok = _context(cfg, TinyConv(), _nan_loader(24, 4, {2}), None, cuda)
    metrics, _ = train_epoch(ok)
    assert ok.state.nonfinite_steps == 1 and math.isfinite(metrics["train/loss"])
