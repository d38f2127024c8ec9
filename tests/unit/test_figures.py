"""mltrack.figures: one render per epoch for every sink, in epoch order, bounded when epochs come faster
than renders; the TensorBoard sink stores the PNG as it is."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from mltrack.figures import _BLUES, EpochFigures, epoch_title, render_png

NAMES = ["ants", "bees", "wasps"]


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def _matrix(seed: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, 40, size=(3, 3)).tolist()


def test_render_png_colours_cells_by_recall_and_takes_lists_arrays_and_tensors() -> None:
    import torch

    counts = [[30, 0, 0], [0, 12, 0], [0, 0, 7]]  # every class recalled perfectly: a dark diagonal
    png = render_png(counts, NAMES, "val, epoch 0")
    assert png == render_png(np.array(counts), NAMES, "val, epoch 0") == render_png(torch.tensor(counts).tolist(),
                                                                                     NAMES, "val, epoch 0")
    pixels = _pixels(png)
    cell = 560 // 3 if 560 // 3 <= 56 else 56
    dark = (pixels == np.array(_BLUES[2], dtype=np.uint8)).all(axis=2).sum()
    light = (pixels == np.array(_BLUES[0], dtype=np.uint8)).all(axis=2).sum()
    assert 0.8 * 3 * cell * cell < dark <= 3 * cell * cell  # three cells, less their digits
    assert 0.8 * 6 * cell * cell < light <= 6 * cell * cell
    half = _pixels(render_png([[1, 1], [0, 2]], NAMES[:2], "t"))
    assert (half == np.array(_BLUES[1], dtype=np.uint8)).all(axis=2).sum() > 0  # recall 0.5: the middle colour
    assert not np.array_equal(pixels, _pixels(render_png(_matrix(1), NAMES, "val, epoch 0")))


def test_every_sink_gets_each_epoch_once_in_order() -> None:
    got: dict[str, list[tuple[int, bytes]]] = {"a": [], "b": []}
    sinks: list[Callable[[int, bytes], None]] = [lambda s, png: got["a"].append((s, png)),
                                                 lambda s, png: got["b"].append((s, png))]
    figures = EpochFigures(sinks)
    figures.duty = 0.0  # this test is about order and content, not skipping
    try:
        for step in range(3):
            figures.offer(step, _matrix(step), NAMES)
            figures.deliver()
    finally:
        figures.close()
    assert [s for s, _ in got["a"]] == [0, 1, 2] and got["a"] == got["b"]  # one render shared by both sinks
    for step, png in got["a"]:
        assert png == render_png(_matrix(step), NAMES, epoch_title(step))
    assert figures.skipped == 0


def test_the_duty_rule_thins_out_short_epochs_and_keeps_the_last(caplog: pytest.LogCaptureFixture) -> None:
    delivered: list[int] = []
    figures = EpochFigures([lambda s, png: delivered.append(s)])
    try:
        figures.offer(0, _matrix(0), NAMES)
        figures.deliver()  # the first render sets the pace: DUTY (100) x its few milliseconds
        assert figures.render_s > 0
        for step in range(1, 6):  # epochs of a few milliseconds: inside 100 renders of the last one
            figures.offer(step, _matrix(step), NAMES)
            figures.deliver()
        figures.finish()  # the fit ends: the last epoch gets its figure
        figures.deliver()
    finally:
        with caplog.at_level("INFO", logger="mltrack"):
            figures.close()
    assert delivered == [0, 5] and figures.skipped == 4 and figures.offered == 6
    assert "4 of 6 per-epoch confusion-matrix figures were not rendered" in caplog.text


def test_tensorboard_sink_stores_the_png_as_it_is(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from mltrack.figures import tensorboard_sink

    png = render_png(_matrix(3), NAMES, epoch_title(4))
    writer = SummaryWriter(str(tmp_path))
    tensorboard_sink(lambda: writer)(4, png)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    [image] = events.Images("confusion_matrix/val")
    height, width = _pixels(png).shape[:2]
    assert (image.step, image.width, image.height, image.encoded_image_string) == (4, width, height, png)


def test_run_picks_the_duty_rule_by_device() -> None:
    import torch

    from mltrack.config import load_config
    from mltrack.run import _figures_hook

    cfg = load_config(None, ["tracking.confusion_every_epoch=true", "tracking.tensorboard=false"])
    for device, duty in (("cpu", EpochFigures.CPU_DUTY), ("cuda", EpochFigures.DUTY)):
        hook = _figures_hook(cfg, object(), None, None, torch.device(device))
        assert hook.figures.duty == duty
    assert EpochFigures([]).duty == EpochFigures.DUTY == 100.0 and EpochFigures.CPU_DUTY == 10.0
