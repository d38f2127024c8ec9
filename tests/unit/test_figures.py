"""mltrack.figures: one render per epoch for every sink, in a child process or on the epoch-IO thread, in
epoch order, bounded when epochs come faster than renders; and a real run with the process forced on CPU."""
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


@pytest.mark.parametrize("separate_process", [False, True])
def test_every_sink_gets_each_epoch_once_in_order(separate_process: bool) -> None:
    got: dict[str, list[tuple[int, bytes]]] = {"a": [], "b": []}
    sinks: list[Callable[[int, bytes], None]] = [lambda s, png: got["a"].append((s, png)),
                                                 lambda s, png: got["b"].append((s, png))]
    figures = EpochFigures(sinks, separate_process=separate_process)
    figures.MAX_PENDING, figures.DUTY = 10, 0.0  # this test is about order and content, not skipping
    try:
        for step in range(3):
            figures.offer(step, _matrix(step), NAMES)
            figures.deliver()  # not blocking: with a process, most renders are not done yet
        figures.deliver(block=True)
    finally:
        figures.close()
    assert [s for s, _ in got["a"]] == [0, 1, 2] and got["a"] == got["b"]  # one render shared by both sinks
    for step, png in got["a"]:
        assert png == render_png(_matrix(step), NAMES, epoch_title(step))  # the child draws what this process does
    assert figures.skipped == 0 and figures.separate_process is separate_process


def test_epochs_faster_than_renders_skip_figures_instead_of_piling_up(caplog: pytest.LogCaptureFixture) -> None:
    delivered: list[int] = []
    figures = EpochFigures([lambda s, png: delivered.append(s)], separate_process=True)
    figures.MAX_PENDING, figures.DUTY = 1, 0.0
    try:
        for step in range(4):  # microseconds apart: the child process has not even started the first render
            figures.offer(step, _matrix(step), NAMES)
        figures.deliver(block=True)
        figures.offer(4, _matrix(4), NAMES)  # nothing running any more: rendered again
        figures.deliver(block=True)
    finally:
        figures.close()
    assert delivered == [0, 4] and figures.skipped == 3 and figures.offered == 5


@pytest.mark.parametrize("separate_process", [False, True])
def test_the_duty_rule_thins_out_short_epochs_and_keeps_the_last(separate_process: bool,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    delivered: list[int] = []
    figures = EpochFigures([lambda s, png: delivered.append(s)], separate_process=separate_process)
    try:
        figures.offer(0, _matrix(0), NAMES)
        figures.deliver(block=True)  # the first render sets the pace: 10 x its ~20 ms or more
        assert figures.render_s > 0
        for step in range(1, 6):  # epochs of a few milliseconds: inside 10 renders of the last one
            figures.offer(step, _matrix(step), NAMES)
            figures.deliver()
        figures.finish()  # the fit ends: the last epoch gets its figure
        figures.deliver(block=True)
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


def test_a_real_run_renders_its_epoch_figures_in_a_child_process(
        tiny_dataset: Callable[..., Path], run_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mltrack.config import load_config
    from mltrack.run import train

    monkeypatch.setenv("MLTRACK_FIGURE_PROCESS", "1")  # on CPU the default is the epoch-IO thread
    data_dir = tiny_dataset(n_classes=3, per_class=10, size=16, folds=2)
    cfg = load_config(None, ["training.device=cpu", "tracking.progress='off'", f"data.data_dir={data_dir}",
                             "data.dataset_name=tiny", "data.image_size=16", "data.num_workers=0",
                             "training.num_epochs=2", "training.batch_size=8"])  # figures + TensorBoard: defaults
    result = train(cfg)

    client = mlflow.MlflowClient()
    assert client.get_run(result.run_id).info.status == "FINISHED"
    epochs = sorted(Path(f.path).name for f in client.list_artifacts(result.run_id, "plots/epochs"))
    assert epochs == ["confusion_matrix_val_0000.png", "confusion_matrix_val_0001.png"]
    events = EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("confusion_matrix/val")] == [0, 1]
