"""How long does the training thread wait at the end of improving epochs that are shorter than a checkpoint write?

Every improving epoch used to be written (``best.pt`` must hold its weights). With epochs shorter than a write
(a small dataset from a GPU cache: 0.04-0.1 s epochs, 0.1-0.3 s writes of a resnet18 state), a run of them
filled both IO slots, and each further one waited for a slot on the training thread ("waiting for a slot").
Then such an epoch superseded the queued checkpoint job that had not started ("superseding"): no waits, but
the writer still ran back to back. Now the duty rule holds improving epochs too ("duty rule": the state is
kept and written once the writer has rested DUTY x its last write; ``CheckpointHook``). This runs the real
``CheckpointHook`` on a real ``EpochIO`` worker writing a resnet18 + momentum state, with every epoch improving
and each epoch stood in for by a sleep of ``--epoch-ms`` (no training: only the wait and the writer's share
are measured), under each rule, and prints the hook's time per epoch, the checkpoints written (the final
one at fit end included) and the share of the loop's time the writer was busy.

    python bench/probe_improving_epochs.py [--epochs 20] [--epoch-ms 40]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def fit_context(model: torch.nn.Module) -> Any:
    from mltrack.config import load_config
    from mltrack.optim import build_scheduler
    from mltrack.trainers import build_trainer
    from mltrack.trainers.loop import FitContext

    cfg = load_config(None, ["training.device=cpu", "tracking.progress='off'"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers: the state is model + optimizer, as in training
    schedule = build_scheduler(cfg.scheduler, optimizer, 3, 1, cfg.optimizer.lr, mode=cfg.training.monitor_mode)
    return FitContext(cfg, model, optimizer, schedule, build_trainer(cfg.training, torch.device("cpu")),
                      {"train": None, "val": None, "test": None}, torch.nn.CrossEntropyLoss(), ["a", "b"])


RULES = ("waiting for a slot", "superseding", "duty rule")


def run(rule: str, epochs: int, epoch_s: float, weights: Path) -> dict[str, Any]:
    from mltrack.epoch_io import EpochIO
    from mltrack.hooks import CheckpointHook
    from mltrack.trainers.loop import EpochOutput
    import torchvision

    from _mltrack import write_improving_at_once

    class Timed(CheckpointHook):
        """The real hook, with the writer's busy time summed (and superseding off for the first rule)."""

        busy_s = 0.0

        def _epoch_job(self, job: Any) -> None:
            t0 = time.perf_counter()
            super()._epoch_job(job)
            self.busy_s += time.perf_counter() - t0

        def _supersede(self, ctx: Any) -> bool:
            return rule != "waiting for a slot" and super()._supersede(ctx)

    ctx = fit_context(torchvision.models.resnet18(num_classes=2))
    io = EpochIO(inline=False)
    hook = Timed(weights, None, {"mlflow_run_id": "probe"}, io)
    if rule != "duty rule":  # before the duty rule held improving epochs: written at once
        write_improving_at_once(hook)
    waits = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        time.sleep(epoch_s)  # the epoch
        ctx.state.epoch = epoch
        ctx.last = EpochOutput({"val/acc": epoch / epochs}, torch.zeros(2, 2), torch.zeros(2, 2), improved=True)
        t0 = time.perf_counter()
        hook.on_epoch_end(ctx)
        waits.append(time.perf_counter() - t0)
    loop_s = time.perf_counter() - start
    busy_in_loop = hook.busy_s  # jobs finished within the loop (a running one is not counted yet)
    hook.on_fit_end(ctx)
    io.close()
    return {"loop_s": loop_s, "waits": waits, "written": hook.queued, "superseded": hook.superseded,
            "held": hook.held, "write_s": hook.write_s, "busy_share": busy_in_loop / loop_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--epoch-ms", type=float, default=40.0)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, resnet18 + momentum state, {args.epochs} improving epochs of "
          f"{args.epoch_ms:g} ms (sleeps)")
    for rule in RULES:
        with tempfile.TemporaryDirectory() as tmp:
            r = run(rule, args.epochs, args.epoch_ms / 1000, Path(tmp) / "weights")
        ms = [1000 * w for w in r["waits"]]
        print(f"  {rule}: {args.epochs} epochs in {r['loop_s']:.2f} s "
              f"(sleeps alone {args.epochs * args.epoch_ms / 1000:.2f} s); hook {statistics.median(ms):.1f} ms median, "
              f"{max(ms):.1f} max; {r['written']} checkpoints written (fit end included), {r['superseded']} "
              f"superseded in the queue, {r['held']} held; writer busy {100 * r['busy_share']:.0f} % of the loop "
              f"(finished writes); last write {1000 * r['write_s']:.0f} ms")


if __name__ == "__main__":
    main()
