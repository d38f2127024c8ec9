"""What the benchmark measures, in priority order (a run short of time drops the last groups first):

1. throughput, per model: (6) ceiling bf16/fp32 -> (5) mltrack gpu / ram cache -> (1) reference fp32,
   (2) reference bf16 -> (3) timm -> (4) mltrack default (no cache); loader-only rates where they bound.
2. hymenoptera-size epoch (train + val): tutorial loop vs mltrack cached, untracked and tracked; eager, then
   (CUDA, --hymen-compile-mode) the same three compiled in that mode (reduce-overhead: CUDA graphs).
3. tracking on vs off at full size (resnet18/tiny model, cached, train + val per epoch), interleaved rounds.
4. compiled: ceiling, mltrack gpu and ram, for --compile-models.
5. decode every epoch with nvJPEG (data larger than RAM): mltrack's decode_gpu loader next to the bench-only feed.
"""
from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from _data import make_dataset, split_files
from _feeds import (Arm, CompileWatch, NvjpegEveryEpoch, SyntheticBatches, build_model, interleaved_rows, make_step,
                    place, reference_loader, shutdown, steps_epoch, time_epochs, time_interleaved, timm_loader)

# The tracking group's variants: None (no hooks) or _mltrack.Tracking's (mlflow, figures, tensorboard,
# figure_duty, sender_process). tracked_default is what `mltrack train` does with the default config: checkpoints,
# MLflow metrics and uploads, TensorBoard scalars and a confusion-matrix figure per epoch for MLflow and
# TensorBoard, rendered on the epoch-IO thread under the figures' duty rule (mltrack.figures). The other rows take
# one part away or change one thing, to show what each costs: tracked_default_every_epoch renders every epoch's
# figure (no duty rule; the default before it, which also rendered twice per epoch),
# tracked_default_figure_duty10 renders one at most every 10 renders' time (the default before it was 100);
# tracked_tensorboard has no figures; *_thread_sender sends to MLflow from a thread of the training process (the
# default before the sender process; sender_process None = as run.py: a child process when training on a GPU).
# *_no_hold write improving epochs inside the checkpoint duty window at once (the rule before the hold).
Spec = tuple[Any, ...]  # Tracking's arguments after (workdir, name): mlflow, figures, ..., sender_process[, hold]
TRACKING_VARIANTS: dict[str, Optional[Spec]] = {
    "untracked": None, "checkpoint_only": (False, None, False, None, None),
    "tracked": (True, None, False, None, None), "tracked_tensorboard": (True, None, True, None, None),
    "tracked_default": (True, "inline", True, None, None),
    "tracked_default_every_epoch": (True, "inline", True, 0.0, None),
    "tracked_default_figure_duty10": (True, "inline", True, 10.0, None),
    "tracked_thread_sender": (True, None, False, None, False),
    "tracked_default_thread_sender": (True, "inline", True, None, False),
    # improving epochs written at once, as before the duty rule held them (CheckpointHook): prices that rule
    "checkpoint_only_no_hold": (False, None, False, None, None, False),
    "tracked_default_no_hold": (True, "inline", True, None, None, False)}

# Row-name tags of the hymenoptera group's compiled variants, per training.compile_mode.
COMPILE_TAGS = {"reduce-overhead": "ro", "default": "compiled", "max-autotune": "ma",
                "max-autotune-no-cudagraphs": "ma_nocg"}


class Lazy:
    """Build an expensive thing (a loader, a cache) on first use; remember a failure instead of retrying."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make, self.value, self.seconds, self.error = make, None, None, None

    def get(self) -> Any:
        if self.error:
            raise RuntimeError(f"not built: {self.error}")
        if self.value is None:
            t0 = time.perf_counter()
            try:
                self.value = self.make()
            except Exception as err:
                self.error = f"{type(err).__name__}: {err}"
                raise
            self.seconds = round(time.perf_counter() - t0, 2)
        return self.value


def _arm_row(session: dict[str, dict[str, Any]], variant: str) -> dict[str, Any]:
    """A variant's row of the interleaved session; raises its error so that ``Results.measure`` records it."""
    row = session.get(variant, {"error": "not measured"})
    if "error" in row:
        raise RuntimeError(row["error"])
    return row


def _tracking_protocol(cfg: dict[str, Any], orders: list[list[str]]) -> dict[str, Any]:
    """How the tracking group measured (stored in its rows and in ``extra``), so a result file says it."""
    return {"rounds": cfg["tracking_rounds"], "block_epochs": cfg["tracking_block"],
            "warmup_epochs_per_variant": cfg["warmup"], "orders": orders, "drop_first_epoch_of_block": False,
            "why_first_epochs_kept": "every epoch ends with the training stream finished, so each starts with an "
            "empty queue, not only a block's first; and a block's first epoch is the one that starts a "
            "checkpointing variant's snapshot after the drain (the next ones may defer theirs while that write "
            "runs, as in continuous training): dropping it would hide that cost. median_epoch_s_after_first is "
            "the median without those epochs.",
            "judged_on": "median_round_ratio of tracked_default (tracked where absent): per round, the median epoch "
            "of its block / untracked's in the same round; then the median over rounds"}


def _importable(module: str) -> Optional[str]:
    try:
        __import__(module)
        return None
    except Exception as err:  # noqa: BLE001 - any import failure means "skip with this reason"
        return f"{module} not importable ({type(err).__name__}: {str(err)[:120]})"


def _store_missing() -> Optional[str]:
    """Why the tracked variants cannot run: they log to a sqlite store, which needs sqlalchemy, alembic and
    cryptography beside mlflow (mlflow-skinny alone has no sqlite store and fails every tracked set-up)."""
    return next(filter(None, map(_importable, ("mlflow", "sqlalchemy", "alembic", "cryptography"))), None)


def run_all(R: Any, cfg: dict[str, Any], device: torch.device, cache_dir: Path, *, tiny: bool) -> None:
    t0 = time.perf_counter()
    w, h = cfg["size"]
    root = cache_dir / "data" / f"synth_{cfg['train']}_{cfg['val']}_{w}x{h}_{cfg['classes']}"
    R.log(f"dataset {root} ...")
    R.extra["dataset"] = make_dataset(root, classes=cfg["classes"], train=cfg["train"], val=cfg["val"],
                                      test=cfg["test"], size=cfg["size"], workers=0 if tiny else cfg["workers"])
    R.extra["dataset"]["ready_s"] = round(time.perf_counter() - t0, 1)
    R.log(f"dataset ready: {R.extra['dataset']}")
    work = cache_dir / "work" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    plan = Plan(R, cfg, device, root, work, tiny)
    groups = {"throughput": plan.throughput, "hymenoptera": lambda: plan.hymenoptera(cache_dir),
              "tracking": plan.tracking, "compiled": plan.compiled, "nvjpeg": plan.nvjpeg}
    try:
        for name in cfg.get("groups", list(groups)):
            try:
                groups[name]()
            except Exception as err:  # noqa: BLE001 - set-up outside a variant failed: keep the other groups
                R.log(f"FAIL group {name}: {type(err).__name__}: {err}")
                R.extra.setdefault("group_errors", {})[name] = traceback.format_exc()[-2000:]
                R.save()
    finally:
        plan.close()
        shutil.rmtree(work, ignore_errors=True)


class Plan:
    def __init__(self, R: Any, cfg: dict[str, Any], device: torch.device, root: Path, work: Path, tiny: bool) -> None:
        self.R, self.cfg, self.device, self.root, self.work, self.tiny = R, cfg, device, root, work, tiny
        self.files = split_files(root, "train")
        names = sorted({rel.split("/")[0] for rel in self.files})
        self.labels = [names.index(rel.split("/")[0]) for rel in self.files]
        self.models = {name: build_model(name, cfg["classes"]) for name in cfg["models"]}
        self.B, self.S, self.W = cfg["batch"], cfg["image"], cfg["workers"]
        self.steps = -(-cfg["train"] // self.B)
        self.timed = dict(warmup_epochs=cfg["warmup"], min_seconds=cfg["seconds"], max_epochs=cfg["max_epochs"])
        self.need = cfg["seconds"] + 8
        self.cuda = device.type == "cuda"
        self.gpu_only = None if self.cuda else "needs a CUDA device"
        self.cached = {mode: Lazy(lambda m=mode: self._build(m)) for mode in ("gpu", "ram")}

    # ------------------------------------------------------------ building blocks

    def _build(self, mode: str, root: Optional[Path] = None, batch: Optional[int] = None,
               splits: tuple[str, ...] = ("train",)) -> Any:
        from _mltrack import build

        loaders, seconds = build(root or self.root, cache=mode, image_size=self.S, batch_size=batch or self.B,
                                 workers=self.W, device=self.device, splits=splits)
        self.R.extra.setdefault("build_s", {})[f"{mode}:{(root or self.root).name}:{'+'.join(splits)}"] = round(seconds, 2)
        return loaders

    def _steps(self, loader: Any, model: torch.nn.Module, amp: bool, compiled: Optional[torch.nn.Module] = None,
               **timed: Any) -> dict[str, Any]:
        place(model, self.device, channels_last=amp)
        step = make_step(compiled if compiled is not None else model, self.device, amp=amp, channels_last=amp)
        return time_epochs(lambda: steps_epoch(loader, step), self.device, **{**self.timed, **timed})

    def _mltrack(self, lazy: Lazy, model: torch.nn.Module, compiled: Optional[torch.nn.Module] = None) -> dict[str, Any]:
        from _mltrack import context, train_epochs

        loaders = lazy.get()
        place(model, self.device, channels_last=True)
        fit = context(model, loaders, self.device, self.B, compiled=compiled)
        out = time_epochs(train_epochs(fit, loaders.sizes["train"]), self.device, **self.timed)
        return {**out, "build_s": lazy.seconds, "cache": loaders.cache}

    def _synthetic(self, channels_last: bool) -> SyntheticBatches:
        return SyntheticBatches(self.steps, self.B, self.S, self.cfg["classes"], self.device, channels_last)

    def _loader_only(self, loader: Any) -> dict[str, Any]:
        """The loader alone (no model): what it can deliver, i.e. whether it bounds a variant."""
        def epoch() -> int:
            return sum(len(targets) for _, targets in loader)
        return time_epochs(epoch, self.device, warmup_epochs=0, min_seconds=min(3.0, self.cfg["seconds"]),
                           max_epochs=self.cfg["max_epochs"])

    # ------------------------------------------------------------ groups

    def throughput(self) -> None:
        R, m = self.R, self.models
        for name, model in m.items():
            for amp, label in ((True, "ceiling_bf16"), (False, "ceiling_fp32")):
                R.measure("throughput", label, name, lambda mo=model, a=amp: self._steps(self._synthetic(a), mo, a),
                          need_s=self.need)
        for mode in ("gpu", "ram"):
            skip = self.gpu_only if mode == "gpu" else None
            for name, model in m.items():
                R.measure("throughput", f"mltrack_{mode}", name,
                          lambda mo=model, md=mode: self._mltrack(self.cached[md], mo), unavailable=skip,
                          need_s=self.need + 10)
            if self.cached[mode].value is not None:
                R.measure("loader_only", f"mltrack_{mode}", "-", lambda md=mode: self._loader_only(
                    self.cached[md].value.train), need_s=6)
        self._peer("reference", lambda: reference_loader(self.root, self.files, self.S, self.B, self.W, self.device),
                   [("reference_fp32", False), ("reference_bf16", True)], None)
        self._peer("timm", lambda: timm_loader(self.root, self.files, self.S, self.B, self.W, self.device),
                   [("timm_bf16", True)], _importable("timm"))
        default = Lazy(lambda: self._build("none"))
        for name, model in m.items():
            R.measure("throughput", "mltrack_default", name, lambda mo=model: self._mltrack(default, mo),
                      need_s=self.need + 5)
        if default.value is not None:
            R.measure("loader_only", "mltrack_default", "-", lambda: self._loader_only(default.value.train), need_s=8)
            shutdown(default.value.train)

    def _peer(self, label: str, make: Callable[[], Any], variants: list[tuple[str, bool]], skip: Optional[str]) -> None:
        loader = Lazy(make)
        for name, model in self.models.items():
            for variant, amp in variants:
                self.R.measure("throughput", variant, name, lambda mo=model, a=amp: self._steps(loader.get(), mo, a),
                               unavailable=skip, need_s=self.need + 5)
        if loader.value is not None:
            self.R.measure("loader_only", label, "-", lambda: self._loader_only(loader.value), need_s=8)
            shutdown(loader.value)

    def hymenoptera(self, cache_dir: Path) -> None:
        from _mltrack import Tracking, compile_like_run, context, full_epochs, tutorial_epochs

        n_train, n_val, batch = self.cfg["hymen"]
        size = (64, 48) if self.tiny else (500, 375)
        root = cache_dir / "data" / f"hymen_{n_train}_{n_val}_{size[0]}"
        make_dataset(root, classes=2, names=["ants", "bees"], train=n_train, val=n_val, test=4, size=size,
                     vary_size=True, workers=0 if self.tiny else self.W)
        arch = "tinycnn" if self.tiny else "resnet18"
        model = build_model(arch, 2)
        timed = dict(warmup_epochs=self.cfg["warmup"], min_seconds=min(4.0, self.cfg["seconds"]),
                     max_epochs=40 if self.cfg["max_epochs"] > 1 else 1)
        files = {s: split_files(root, s) for s in ("train", "val")}
        ref = Lazy(lambda: [reference_loader(root, files[s], self.S, batch, min(4, self.W), self.device, train=s == "train")
                            for s in ("train", "val")])

        def tutorial() -> dict[str, Any]:
            place(model, self.device, channels_last=False)
            train, val = ref.get()
            run = tutorial_epochs(model, train, val, self.device, self.work / "tutorial_best.pt")
            return time_epochs(run, self.device, **timed)

        self.R.measure("hymenoptera", "tutorial_fp32", arch, tutorial, need_s=12)
        for loader in ref.value or []:
            shutdown(loader)
        mode = "gpu" if self.cuda else "ram"
        cached = Lazy(lambda: self._build(mode, root, batch, ("train", "val")))
        mlflow_missing = _store_missing()

        def mltrack_epochs(variant: Optional[str], compiled: Optional[Lazy] = None) -> dict[str, Any]:
            loaders = cached.get()
            place(model, self.device, channels_last=True)
            compiles = compiled is not None and compiled.value is None  # this variant's warm-up compiles
            module = compiled.get() if compiled is not None else None  # torch.compile is lazy: nothing runs yet
            fit = context(model, loaders, self.device, batch, compiled=module)
            label = f"hymen_{variant}{'' if module is None else '_compiled'}"
            # variant: a TRACKING_VARIANTS name; "tracked_default" is the default config's tracking (figures
            # per epoch for MLflow and TensorBoard included), "checkpoint_only" checkpoints without MLflow
            spec = TRACKING_VARIANTS[variant] if variant is not None else None
            tracking = Tracking(self.work, label, *spec) if spec is not None else None
            run = full_epochs(fit, n_train + n_val, tracking.hooks(fit) if tracking else [], tracking)
            warm: dict[str, Any] = {"warmup_epochs": 2 * self.cfg["warmup"]}
            if module is not None:
                # Compiling and CUDA-graph capture (train and eval, full and partial batches) stay in the
                # warm-up: it runs until two epochs in a row compiled nothing (CompileWatch), at least 4
                # epochs when it compiles (a capture follows the compile by one epoch), at most 15.
                run = watch = CompileWatch(run)
                warm = {"warmup_epochs": max(4 if compiles else 2, 2 * self.cfg["warmup"]),
                        "settled": watch.settled, "max_warmup_epochs": 15}
            out = time_epochs(run, self.device, **{**timed, **warm})
            if module is not None:
                out.update(watch.report(out["warmup_epochs"]), compile_mode=self.cfg["hymen_compile_mode"],
                           compiled_here=compiles)
            return {**out, **(tracking.finish() if tracking else {}), "build_s": cached.seconds, "cache": loaders.cache}

        rows = (("", None), ("_checkpoint", "checkpoint_only"), ("_tracked", "tracked_default"))
        for suffix, variant in rows:
            self.R.measure("hymenoptera", f"mltrack_{mode}{suffix}", arch, lambda v=variant: mltrack_epochs(v),
                           unavailable=mlflow_missing if variant and TRACKING_VARIANTS[variant][0] else None,
                           need_s=15 if variant == "tracked_default" else 10)
        compile_mode = self.cfg["hymen_compile_mode"]
        if not compile_mode:
            return
        # The configuration a user picks for small epochs (training.compile + compile_mode), compiled once
        # and reused by the three variants, as the compiled group does; the first one pays the compile.
        compiled = Lazy(lambda: compile_like_run(model, self.device, compile_mode))
        why_not = "--tiny (compiling takes minutes)" if self.tiny else self.gpu_only
        tag = COMPILE_TAGS.get(compile_mode, compile_mode.replace("-", "_"))
        # --hymen-variants: more tracking variants (TRACKING_VARIANTS names), compiled only, to price each part
        extra = tuple((f"+{v}", v) for v in self.cfg["hymen_variants"])  # "+": "_tracked" is taken
        for suffix, variant in rows + extra:
            self.R.measure("hymenoptera", f"mltrack_{mode}_{tag}{suffix}", arch,
                           lambda v=variant: mltrack_epochs(v, compiled),
                           unavailable=why_not or (mlflow_missing if variant and TRACKING_VARIANTS[variant][0]
                                                   else None),
                           need_s=15 if compiled.value is not None else 180)

    def tracking(self) -> None:
        """Tracking on vs off, interleaved (``_feeds.time_interleaved``): rounds of a few epochs of each
        variant in turn, in one process, so drift between windows does not hide or fake a 1 % difference."""
        name = next(iter(self.models))
        model, mode = self.models[name], "gpu" if self.cuda else "ram"
        both = Lazy(lambda: self._build(mode, splits=("train", "val")))
        variants = dict(TRACKING_VARIANTS)
        unavailable = {v: _store_missing() for v, spec in variants.items() if spec is not None and spec[0]}
        wanted = {v: t for v, t in variants.items() if not unavailable.get(v) and v not in self.R.skip}
        session = Lazy(lambda: self._interleaved(both, model, wanted))
        for variant in variants:
            self.R.measure("tracking", variant, name, lambda v=variant: _arm_row(session.get(), v),
                           unavailable=unavailable.get(variant),
                           need_s=0 if session.value is not None else len(wanted) * (self.need + 5))
        both.value = None  # frees its cache before the compiled group

    def _interleaved(self, both: Lazy, model: torch.nn.Module,
                     variants: dict[str, Optional[Spec]]
                     ) -> dict[str, Any]:
        """One FitContext, hooks and (tracked) MLflow run per variant, kept for all rounds; the model is shared.
        Returns each variant's row (or its error), the protocol recorded in the row and in ``extra``."""
        from _mltrack import Tracking, context, full_epochs

        loaders = both.get()
        place(model, self.device, channels_last=True)
        images = self.cfg["train"] + self.cfg["val"]
        arms, trackings, failed = [], {}, {}
        try:
            for variant, spec in variants.items():
                try:
                    fit = context(model, loaders, self.device, self.B)
                    tracking = Tracking(self.work, f"full_{variant}", *spec) if spec is not None else None
                    hooks = tracking.hooks(fit) if tracking else []
                except Exception as err:  # noqa: BLE001 - e.g. the MLflow store: the other variants still run
                    failed[variant] = f"set-up failed: {type(err).__name__}: {err}"[:500]
                    continue
                if tracking is not None:
                    trackings[variant] = tracking
                run = full_epochs(fit, images, hooks, tracking)
                arms.append(Arm(variant, run, tracking.drain) if tracking is not None else Arm(variant, run))
            measured = time_interleaved(arms, self.device, rounds=self.cfg["tracking_rounds"],
                                        block_epochs=self.cfg["tracking_block"], warmup_epochs=self.cfg["warmup"])
        finally:
            for variant, tracking in trackings.items():
                try:
                    tracking.finish()
                except Exception as err:  # noqa: BLE001 - its error was already recorded, or is recorded now
                    failed.setdefault(variant, f"closing: {type(err).__name__}: {err}"[:500])
        protocol = _tracking_protocol(self.cfg, measured["orders"])
        self.R.extra["tracking_protocol"] = protocol
        rows = interleaved_rows(measured, "untracked")
        for variant, error in failed.items():
            if variant in rows and "error" not in rows[variant]:
                rows[variant]["close_error"] = error  # measured; only closing its run failed
            elif variant not in rows:
                rows[variant] = {"error": error}
        for variant, row in rows.items():
            if row.get("traceback"):  # the row that Results.measure records carries the error text only
                self.R.extra.setdefault("tracking_tracebacks", {})[variant] = row["traceback"]
        return {v: {**row, "cache": loaders.cache, "interleaved": protocol} if "error" not in row else row
                for v, row in rows.items()}

    def compiled(self) -> None:
        for name in [n for n in self.cfg["compile"] if n in self.models]:
            model = self.models[name]
            compiled = Lazy(lambda mo=model: torch.compile(place(mo, self.device, channels_last=True)))
            self.R.measure("throughput", "ceiling_compiled", name,
                           lambda mo=model, c=compiled: self._steps(self._synthetic(True), mo, True, c.get()),
                           unavailable=self.gpu_only, need_s=self.need + 100)
            for mode in ("gpu", "ram"):  # the same compiled module: compiled once, in the ceiling's warm-up
                self.R.measure("throughput", f"mltrack_{mode}_compiled", name,
                               lambda md=mode, mo=model, c=compiled: self._mltrack(self.cached[md], mo, c.get()),
                               unavailable=self.gpu_only or (None if self.R.get("ceiling_compiled", name) else
                                                             "the compiled ceiling (which compiles) did not run"),
                               need_s=self.need + 20)

    def nvjpeg(self) -> None:
        name = "resnet18" if "resnet18" in self.models else next(iter(self.models))
        feed = Lazy(lambda: NvjpegEveryEpoch(self.root, self.files, self.labels, self.S, self.B, self.device, True))
        self.R.measure("throughput", "nvjpeg_every_epoch", name, lambda: self._steps(feed.get(), self.models[name], True),
                       unavailable=self.gpu_only, need_s=self.need + 10)
        if feed.value is not None:
            self.R.measure("loader_only", "nvjpeg_every_epoch", "-", lambda: self._loader_only(feed.value), need_s=6)
        feed.value = None  # its file bytes: mltrack's loader below reads files per batch instead
        decode = Lazy(lambda: self._build("decode_gpu"))  # data.cache: decode_gpu, what auto picks when nothing fits
        self.R.measure("throughput", "mltrack_decode_gpu", name, lambda: self._mltrack(decode, self.models[name]),
                       unavailable=self.gpu_only, need_s=self.need + 10)
        if decode.value is not None:
            self.R.measure("loader_only", "mltrack_decode_gpu", "-", lambda: self._loader_only(decode.value.train),
                           need_s=6)

    def close(self) -> None:
        for lazy in self.cached.values():
            lazy.value = None
