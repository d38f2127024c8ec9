"""Batch mixup / cutmix (mltrack.data.mix): pixels, soft targets, parameter distributions, config.

Distribution checks use a one-sample Kolmogorov-Smirnov statistic against the exact law, below the
alpha = 0.001 critical value 1.95 / sqrt(n) (a seeded run, so a pass is not luck on each rerun), and
proportions within 4.5 standard errors. Each check also states what it tells apart.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torchvision.transforms import v2

from mltrack.config import load_config
from mltrack.data.mix import NO_MIX, MixParams, Mixer, build_mixer
from mltrack.errors import ConfigError

C = 5


def _batch(n: int = 8, h: int = 12, w: int = 16, dtype: torch.dtype = torch.float32,
           channels_last: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, h, w, generator=g).to(dtype)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    targets = torch.arange(n) % C  # neighbours always have different labels
    return images, targets


def _ks_critical(n: int) -> float:
    return 1.95 / math.sqrt(n)


# ---------------------------------------------------------------- pixels and targets


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mixing_keeps_shape_dtype_and_memory_format(kind: str, dtype: torch.dtype, channels_last: bool) -> None:
    images, targets = _batch(dtype=dtype, channels_last=channels_last)
    mixer = Mixer(C, mixup_alpha=1.0 if kind == "mixup" else 0.0, cutmix_alpha=1.0 if kind == "cutmix" else 0.0)
    params = MixParams(kind, 0.7, 0.7, (2, 3, 10, 9) if kind == "cutmix" else None)  # type: ignore[arg-type]
    mixed, soft = mixer.apply(images, targets, params)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert mixed.shape == images.shape and mixed.dtype == dtype and mixed.is_contiguous(memory_format=fmt)
    assert soft.shape == (len(targets), C) and soft.dtype == torch.float32
    assert not torch.equal(mixed, images)


def test_soft_targets_sum_to_one_and_weigh_own_and_neighbour_labels() -> None:
    images, targets = _batch()
    mixer = Mixer(C, mixup_alpha=0.4, cutmix_alpha=1.0)
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        params = mixer.sample(12, 16, g)
        _, soft = mixer.apply(images, targets, params)
        torch.testing.assert_close(soft.sum(1), torch.ones(len(targets)), rtol=0, atol=1e-6)
        assert (soft >= 0).all()
        rows = torch.arange(len(targets))
        torch.testing.assert_close(soft[rows, targets], torch.full((len(targets),), params.lam), rtol=0, atol=1e-6)
        torch.testing.assert_close(soft[rows, targets.roll(1)], torch.full((len(targets),), 1 - params.lam),
                                   rtol=0, atol=1e-6)


def test_mixup_pixels_are_the_convex_combination_with_the_neighbour() -> None:
    images, targets = _batch()
    mixed, _ = Mixer(C, mixup_alpha=1.0).apply(images, targets, MixParams("mixup", 0.3, 0.3))
    torch.testing.assert_close(mixed, 0.3 * images + 0.7 * images.roll(1, 0))


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_a_batch_of_one_is_paired_with_itself(kind: str) -> None:
    images, targets = _batch(n=1)
    params = MixParams(kind, 0.6, 0.6, (2, 3, 10, 9) if kind == "cutmix" else None)  # type: ignore[arg-type]
    mixed, soft = Mixer(C, mixup_alpha=1.0, cutmix_alpha=1.0).apply(images, targets, params)
    torch.testing.assert_close(mixed, images)
    assert torch.equal(soft, torch.nn.functional.one_hot(targets, C).float())


def test_cutmix_pastes_the_box_from_the_neighbour_and_its_area_is_one_minus_lambda() -> None:
    images, targets = _batch()
    mixer = Mixer(C, cutmix_alpha=1.0)
    g = torch.Generator().manual_seed(5)
    for _ in range(100):
        params = mixer.sample(12, 16, g)
        mixed, _ = mixer.apply(images, targets, params)
        replaced = (mixed != images).any(1)  # (N, H, W); random pixels: a pasted pixel always differs
        fraction = replaced.float().mean((1, 2))
        torch.testing.assert_close(fraction, torch.full((len(images),), 1 - params.lam), rtol=0, atol=1e-6)
        x1, y1, x2, y2 = params.box  # type: ignore[misc]
        assert torch.equal(mixed[..., y1:y2, x1:x2], images.roll(1, 0)[..., y1:y2, x1:x2])
        # The corrected lambda is never below the draw: the box is the drawn area at most (truncation, clipping).
        assert params.lam >= params.drawn - 1e-12


def test_cutmix_unclipped_box_area_matches_the_drawn_lambda() -> None:
    """Away from the edges the pasted area is 1 - drawn up to the integer rounding of the half sides."""
    mixer = Mixer(C, cutmix_alpha=1.0)
    g = torch.Generator().manual_seed(6)
    h = w = 200
    checked = 0
    for _ in range(2000):
        p = mixer.sample(h, w, g)
        x1, y1, x2, y2 = p.box  # type: ignore[misc]
        r = 0.5 * math.sqrt(1 - p.drawn)
        if x1 > 0 and y1 > 0 and x2 < w and y2 < h:  # not clipped
            side = 2 * int(r * w)
            assert (x2 - x1, y2 - y1) == (side, side)
            assert abs((1 - p.lam) - (1 - p.drawn)) <= 4 / w  # two pixels per side at most
            checked += 1
    assert checked > 100


def test_mixup_lambda_follows_beta_alpha_alpha() -> None:
    """KS against Beta(0.4, 0.4) is ~0.022 here (critical 0.031); Beta(1, 1) gives 0.15, Beta(0.2, 0.2) 0.12,
    Beta(0.3, 0.3) 0.053: a wrong alpha or a uniform lambda is seen."""
    mixer = Mixer(C, mixup_alpha=0.4)
    g = torch.Generator().manual_seed(7)
    lams = [mixer.sample(8, 8, g).lam for _ in range(4000)]
    assert stats.kstest(lams, stats.beta(0.4, 0.4).cdf).statistic < _ks_critical(4000)
    assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).statistic > 2 * _ks_critical(4000)


def test_cutmix_draw_follows_beta_alpha_alpha() -> None:
    mixer = Mixer(C, cutmix_alpha=2.0)
    g = torch.Generator().manual_seed(8)
    drawn = [mixer.sample(32, 32, g).drawn for _ in range(4000)]
    assert stats.kstest(drawn, stats.beta(2.0, 2.0).cdf).statistic < _ks_critical(4000)


@pytest.mark.parametrize("mix_prob,switch_prob", [(0.3, 0.5), (1.0, 0.2), (0.8, 0.9)])
def test_mix_and_switch_probabilities(mix_prob: float, switch_prob: float) -> None:
    mixer = Mixer(C, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=mix_prob, switch_prob=switch_prob)
    g = torch.Generator().manual_seed(9)
    n = 4000
    kinds = [mixer.sample(16, 16, g).kind for _ in range(n)]
    mixed = n - kinds.count("none")
    assert abs(mixed / n - mix_prob) <= 4.5 * math.sqrt(mix_prob * (1 - mix_prob) / n) + 1e-9
    assert abs(kinds.count("cutmix") / mixed - switch_prob) <= 4.5 * math.sqrt(switch_prob * (1 - switch_prob) / mixed)


def test_only_the_configured_kind_is_drawn() -> None:
    g = torch.Generator().manual_seed(10)
    assert {Mixer(C, mixup_alpha=1.0, switch_prob=1.0).sample(8, 8, g).kind for _ in range(200)} == {"mixup"}
    assert {Mixer(C, cutmix_alpha=1.0, switch_prob=0.0).sample(8, 8, g).kind for _ in range(200)} == {"cutmix"}


def test_mix_prob_zero_returns_the_images_unchanged_with_one_hot_targets() -> None:
    images, targets = _batch()
    before = images.clone()
    mixer = Mixer(C, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0)
    for seed in range(20):
        out, soft = mixer(images, targets, torch.Generator().manual_seed(seed))
        assert out is images and torch.equal(images, before)
        assert torch.equal(soft, torch.nn.functional.one_hot(targets, C).float())
    assert mixer.apply(images, targets, NO_MIX)[0] is images


def test_deterministic_under_a_seed_and_the_global_rng() -> None:
    images, targets = _batch()
    mixer = Mixer(C, mixup_alpha=0.5, cutmix_alpha=1.0)

    def run(g: torch.Generator | None) -> list[torch.Tensor]:
        return [t for _ in range(10) for t in mixer(images, targets, g)]

    a, b = run(torch.Generator().manual_seed(1)), run(torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = run(torch.Generator().manual_seed(2))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    torch.manual_seed(11)  # generator None: torch's global RNG, which checkpoints save and restore
    d = run(None)
    torch.manual_seed(11)
    assert all(torch.equal(x, y) for x, y in zip(d, run(None)))


def test_non_float_images_are_refused() -> None:
    images, targets = _batch()
    with pytest.raises(TypeError, match="floating-point"):
        Mixer(C, mixup_alpha=1.0).apply(images.to(torch.uint8), targets, MixParams("mixup", 0.5, 0.5))


# ---------------------------------------------------------------- the same as torchvision's


def test_mixup_matches_torchvision_for_the_same_lambda() -> None:
    images, targets = _batch()
    torch.manual_seed(12)
    tv_images, tv_soft = v2.MixUp(alpha=1.0, num_classes=C)(images, targets)
    lam = float(tv_soft[0, targets[0]])
    mixed, soft = Mixer(C, mixup_alpha=1.0).apply(images, targets, MixParams("mixup", lam, lam))
    torch.testing.assert_close(mixed, tv_images)
    torch.testing.assert_close(soft, tv_soft)


def test_cutmix_matches_torchvision_for_the_same_box() -> None:
    images, targets = _batch(h=20, w=24)
    for seed in range(5):
        torch.manual_seed(seed)
        tv_images, tv_soft = v2.CutMix(alpha=1.0, num_classes=C)(images, targets)
        changed = (tv_images != images).any(0).any(0)  # (H, W)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        if len(rows) == 0:
            continue  # an empty box: nothing to compare
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        lam = float(tv_soft[0, targets[0]])
        mixed, soft = Mixer(C, cutmix_alpha=1.0).apply(images, targets, MixParams("cutmix", lam, lam, box))
        assert torch.equal(mixed, tv_images)
        torch.testing.assert_close(soft, tv_soft)
        assert abs(lam - (1 - (box[2] - box[0]) * (box[3] - box[1]) / (20 * 24))) < 1e-6


# ---------------------------------------------------------------- the loss with soft targets


def test_cross_entropy_applies_label_smoothing_to_probability_targets() -> None:
    """CrossEntropyLoss(label_smoothing=e) on soft targets t is the cross-entropy with t * (1 - e) + e / C,
    and on one-hot targets it equals the loss on the class indices (unmixed batches train as before)."""
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(8, C, generator=g)
    images, targets = _batch()
    _, soft = Mixer(C, mixup_alpha=1.0).apply(images, targets, MixParams("mixup", 0.35, 0.35))
    eps = 0.1
    loss = torch.nn.CrossEntropyLoss(label_smoothing=eps)
    expected = -((soft * (1 - eps) + eps / C) * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss(logits, soft), expected)
    unsmoothed = -(soft * logits.log_softmax(1)).sum(1).mean()
    assert abs(float(loss(logits, soft) - unsmoothed)) > 1e-3  # the smoothing is not silently dropped
    one_hot = torch.nn.functional.one_hot(targets, C).float()
    torch.testing.assert_close(loss(logits, one_hot), loss(logits, targets))


# ---------------------------------------------------------------- config


def test_build_mixer_is_none_when_both_alphas_are_zero() -> None:
    assert build_mixer(load_config().data, C) is None
    cfg = load_config(overrides=["data.cutmix_alpha=1.0", "data.mix_prob=0.5", "data.mix_switch_prob=0.25"])
    mixer = build_mixer(cfg.data, C)
    assert mixer is not None
    assert (mixer.mixup_alpha, mixer.cutmix_alpha, mixer.mix_prob, mixer.switch_prob) == (0.0, 1.0, 0.5, 0.25)


@pytest.mark.parametrize("key,value", [("data.mixup_alpha", -0.1), ("data.cutmix_alpha", -1), ("data.mix_prob", 1.5),
                                       ("data.mix_prob", -0.1), ("data.mix_switch_prob", 2)])
def test_invalid_mixing_values_name_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=[f"{key}={value}"])


@pytest.mark.parametrize("key", ["data.mixup_alpha", "data.cutmix_alpha"])
def test_mixing_is_refused_with_dp(key: str) -> None:
    with pytest.raises(ConfigError, match="trainer_type dp") as err:
        load_config(overrides=[f"{key}=0.2", "training.trainer_type=dp", "data.cache=none"])
    assert "privacy" in str(err.value)
    load_config(overrides=["training.trainer_type=dp", "data.cache=none", "data.mix_prob=0.5"])  # alphas 0: fine


# ---------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_cuda_batch_mixes_without_a_host_sync_and_keeps_channels_last(kind: str) -> None:
    images, targets = _batch(n=64, h=32, w=32, dtype=torch.bfloat16, channels_last=True)
    images, targets = images.cuda(), targets.cuda()
    mixer = Mixer(C, mixup_alpha=1.0 if kind == "mixup" else 0.0, cutmix_alpha=1.0 if kind == "cutmix" else 0.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device->host read below raises
    try:
        for _ in range(5):
            mixed, soft = mixer(images, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mixed.is_cuda and soft.is_cuda and mixed.dtype == torch.bfloat16
    assert mixed.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(soft.sum(1).cpu(), torch.ones(64), rtol=0, atol=1e-6)
