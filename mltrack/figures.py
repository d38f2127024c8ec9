"""Per-epoch confusion-matrix figures: drawn with PIL on the epoch-IO worker, once per epoch for every sink
(MLflow, TensorBoard), at most ~1/10 of the wall time.

Why: the figure was a matplotlib render, pure-Python work that holds the GIL for most of its duration
(measured on a 2-core CPU machine: ~0.2-0.3 s for 2 classes, ~0.5-0.7 s for 8 to 10 classes, taken from a
thread that launches small torch ops). On the epoch-IO thread it competes with the training thread, which
must queue the next kernels while the GPU waits; the default config rendered it twice per epoch (MLflow and
TensorBoard). Measured on an H100 (bench tracking group, resnet18, 0.53 s epochs, 8 classes, one matplotlib
render per epoch, TensorBoard on): +17 % and +24 % epoch time on the epoch-IO thread (two calls).
:func:`render_png` draws the same matrix with PIL in ~20 ms (~13 ms of it holding the GIL; same machine,
8 classes), and the duty rule of :class:`EpochFigures` bounds what is left. On the H100
(bench/results_pipeline_tracking_pil_h100.md, a noisy call): +4.3 % with MLflow and figures vs +3.9 % without
figures and +7.8 % for checkpoints alone; a child-process renderer measured in the same call was not faster
(+5.4 %), so it was removed. A quiet H200 call (bench/results_pipeline_tracking_quiet_h200.md, 0.49 s epochs,
every epoch's figure rendered) put the figure and TensorBoard at +0.4 % over MLflow and checkpoints (+1.7 %
against +1.3 %). The final val/test figures of ``report.finalize`` stay matplotlib's.

Each figure is rendered on the epoch-IO worker, in epoch order. The duty rule skips figures of epochs much
shorter than a render (counted, and said once at the end); the last epoch's figure and the final val and
test figures of ``report.finalize`` are always made.
"""
from __future__ import annotations

import functools
import io
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from mltrack.console import get_logger

log = get_logger()

Sink = Callable[[int, bytes], None]  # (epoch step, PNG bytes)


# Anchors of a white-to-blue scale (matplotlib's "Blues" at 0, 0.5 and 1), interpolated linearly.
_BLUES = ((247, 251, 255), (107, 174, 214), (8, 48, 107))


def _blues(x: Any) -> Any:
    """RGB uint8 of the scale at ``x`` (an array of values in [0, 1])."""
    import numpy as np

    anchors = np.array(_BLUES, dtype=np.float64)
    x = np.clip(x, 0.0, 1.0)[..., None]
    low = anchors[0] + (anchors[1] - anchors[0]) * np.clip(2 * x, 0, 1)
    high = anchors[1] + (anchors[2] - anchors[1]) * np.clip(2 * x - 1, 0, 1)
    return np.where(x <= 0.5, low, high).round().astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render_png(counts: list[list[int]], class_names: list[str], title: str) -> bytes:
    """The epoch's confusion matrix as a PNG drawn with PIL: cells coloured by the row-normalised value
    (recall per true class), annotated with the counts up to 30 classes, class names on both axes.

    Not matplotlib (``metrics.confusion_matrix_figure``, still used for the final val/test figures): this
    runs every epoch beside training, and PIL draws it in ~20 ms where matplotlib took ~0.5 s of GIL-bound
    work (2-core CPU machine, 8 classes)."""
    import numpy as np
    from PIL import Image, ImageDraw

    matrix = np.asarray(counts, dtype=np.int64)
    n = matrix.shape[0]
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    cell = int(np.clip(560 // max(n, 1), 14, 56))
    font, label_font = _font(max(8, min(14, cell // 3))), _font(12)
    names = [str(c)[:24] for c in class_names]
    label_w = max([int(label_font.getlength(c)) for c in names] + [10]) + 8
    left, top, side = label_w + 24, 36, n * cell
    image = Image.new("RGB", (left + side + 10, top + side + label_w + 24), "white")
    image.paste(Image.fromarray(_blues(norm)).resize((side, side), Image.Resampling.NEAREST), (left, top))
    draw = ImageDraw.Draw(image)
    draw.text((left + side / 2, 10), title, fill="black", font=label_font, anchor="mt")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                draw.text((left + (j + 0.5) * cell, top + (i + 0.5) * cell), str(int(matrix[i, j])),
                          fill="white" if norm[i, j] > 0.5 else "black", font=font, anchor="mm")
    for i, name in enumerate(names):
        draw.text((left - 6, top + (i + 0.5) * cell), name, fill="black", font=label_font, anchor="rm")
    strip = Image.new("RGB", (label_w, side), "white")  # the predicted classes' names, turned upright below
    for j, name in enumerate(names):
        ImageDraw.Draw(strip).text((label_w - 4, (j + 0.5) * cell), name, fill="black", font=label_font,
                                   anchor="rm")
    image.paste(strip.rotate(90, expand=True), (left, top + side + 4))
    draw.text((left + side / 2, image.height - 4), "predicted", fill="black", font=label_font, anchor="md")
    ylabel = Image.new("RGB", (side, 16), "white")
    ImageDraw.Draw(ylabel).text((side / 2, 8), "true", fill="black", font=label_font, anchor="mm")
    image.paste(ylabel.rotate(90, expand=True), (2, top))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def epoch_title(step: int) -> str:
    return f"val, epoch {step}"


class EpochFigures:
    """Renders each epoch's validation confusion matrix once and hands the PNG to every sink, in epoch order.

    ``offer`` is called on the training thread at the end of an epoch; ``deliver`` renders the queued
    figures on the epoch-IO worker; ``close`` says how many figures were skipped (once).

    Duty rule: an epoch's figure is skipped while less than ``duty`` x the last render's duration has passed
    since the last rendered one was offered, so rendering takes at most ~1/duty of the wall time. A render
    holds the GIL most of its time (drawing back to back cut a thread launching small ops to 0.33-0.47x on the
    2-core CPU machine, ``bench/probe_save_gil.py``), so 1/duty is what it may take from a launch-bound training
    thread: training on a GPU, ``DUTY`` 1/100, inside the 1 % that tracking may cost (issue 9); with epochs
    longer than 100 renders (0.2-2 s) every epoch gets its figure, 0.05 s epochs and 5 ms renders one every
    ~10 epochs. Training on the CPU the thread's time goes to torch's kernels, not to launching, and a render
    competes for the cores, so it is slower: ``CPU_DUTY`` 1/10 keeps every figure of the digits demo (3-5 s
    epochs; with 1/100, 7 of its 30 were skipped on the 2-core machine). ``finish`` renders the last epoch's
    figure if it was skipped.
    """

    DUTY = 100.0
    CPU_DUTY = 10.0

    @classmethod
    def duty_for(cls, device_type: str) -> float:
        """The duty rule for training on ``device_type`` ("cuda", "cpu", ...): see the class docstring."""
        return cls.DUTY if device_type == "cuda" else cls.CPU_DUTY

    def __init__(self, sinks: list[Sink], duty: float | None = None) -> None:
        self.sinks = sinks
        self.duty = self.DUTY if duty is None else duty  # this instance's rule (run.py picks it by device)
        self.skipped = 0
        self.offered = 0
        self.render_s = 0.0  # duration of the last render (set on the epoch-IO worker, read by offer)
        self._last_at = -math.inf  # when the last rendered figure was offered (time.monotonic)
        self._held: tuple[int, list[list[int]], list[str]] | None = None  # the latest epoch, if skipped
        self._said = False
        # (step, counts, class names): offer() appends on the training thread, deliver() pops on the epoch-IO worker
        self._pending: list[tuple[int, list[list[int]], list[str]]] = []
        self._lock = threading.Lock()

    def offer(self, step: int, counts: list[list[int]], class_names: list[str]) -> None:
        """Queue epoch ``step``'s figure, or skip it (duty rule)."""
        self.offered += 1
        now = time.monotonic()
        if now - self._last_at < self.duty * self.render_s:
            self.skipped += 1
            self._held = (step, counts, class_names)
            return
        self._queue(step, counts, class_names, now)

    def finish(self) -> None:
        """Render the latest epoch's figure if it was skipped (the last epoch of a fit always has one)."""
        if self._held is not None:
            self.skipped -= 1
            self._queue(*self._held, time.monotonic())

    def _queue(self, step: int, counts: list[list[int]], class_names: list[str], now: float) -> None:
        self._last_at, self._held = now, None
        with self._lock:
            self._pending.append((step, counts, class_names))

    def deliver(self) -> None:
        """Render every queued figure and send it to the sinks, oldest first."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                step, counts, class_names = self._pending.pop(0)
            png = self._render(step, counts, class_names)  # outside the lock: offer() must not wait for a render
            if png is not None:
                for sink in self.sinks:
                    sink(step, png)

    def close(self) -> None:
        """Say how many figures were skipped (once, however often it is called)."""
        if self.skipped and not self._said:
            self._said = True
            log.info("%d of %d per-epoch confusion-matrix figures were not rendered: epochs are shorter than "
                     "%g renders (%.2f s each); the last epoch's and the final val and test figures are complete",
                     self.skipped, self.offered, self.duty, self.render_s)

    def _render(self, step: int, counts: list[list[int]], class_names: list[str]) -> bytes | None:
        """:func:`render_png`, timing it for the duty rule; None if it failed."""
        try:
            start = time.perf_counter()
            png = render_png(counts, class_names, epoch_title(step))
            self.render_s = time.perf_counter() - start
            return png
        except Exception as err:  # noqa: BLE001 - a lost figure must not fail the training run
            log.warning("the confusion-matrix figure of epoch %d was not rendered (%s: %s)", step,
                        type(err).__name__, err)
            return None


def tensorboard_sink(writer: Callable[[], Any]) -> Sink:
    """A sink that adds the PNG as image ``confusion_matrix/val`` to the SummaryWriter ``writer()`` returns.

    It writes the PNG bytes as they are, in the image summary that ``add_image`` would build: ``add_image``
    takes pixels, so handing it the figure meant a PNG decode and a re-encode, ~30-50 ms on the epoch-IO
    thread (2-core CPU, 8-10 classes), more than drawing the figure; this takes well under 1 ms."""

    def add(step: int, png: bytes) -> None:
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        with Image.open(io.BytesIO(png)) as image:  # reads the header only
            width, height = image.size
        image_summary = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        summary = Summary(value=[Summary.Value(tag="confusion_matrix/val", image=image_summary)])
        writer()._get_file_writer().add_summary(summary, step)

    return add


def mlflow_sink(tracker: Any) -> Sink:
    """A sink that queues the PNG as artifact ``plots/epochs/confusion_matrix_val_<step>.png``."""

    def log(step: int, png: bytes) -> None:
        tracker.log_image_bytes(png, f"plots/epochs/confusion_matrix_val_{step:04d}.png")

    return log
