"""Search benchmark: trial start overhead (Optuna ask -> first optimizer step) and trials/hour on digits.

    python bench/bench_search.py [--trials 6] [--epochs 2] [--workers 2] [--out DIR]

Runs the real ``mltrack search`` code path (``mltrack.search.run_search``) on the digits demo data
(scikit-learn's 1797 8x8 digits, written under a temp dir, nothing downloaded) with configs/digits.yaml,
the shipped space configs/search/digits.yaml, TPE and no pruning (every trial trains all its epochs, so
trials are comparable). Two scenarios:

1. one worker in this process, SQLite storage: per trial, ask -> MLflow run open -> first optimizer step
   (the first step is timed by wrapping ``Trainer.optimizer_step`` in this process), and trials/hour;
2. ``--workers`` worker processes on a journal file: trials/hour and the start-up of the worker processes
   (spawn -> first trial asked).

Prints a table and writes ``bench_search.json`` to --out (default: $OUT when set).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6, help="trials per scenario")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    p.add_argument("--workers", type=int, default=2, help="worker processes of scenario 2 (0: skip it)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_search.json")
    return p.parse_args(argv)


def base_config(data_dir: Path, epochs: int) -> Any:
    from mltrack.config import load_config

    return load_config(ROOT / "configs" / "digits.yaml", [f"data.data_dir={data_dir}", f"training.num_epochs={epochs}",
                                                          "tracking.progress=off", "training.device=cpu"])


def options(name: str, storage: str, trials: int, workers: int) -> Any:
    from mltrack.config import RunConfig
    from mltrack.search_space import SearchOptions, load_space

    space_path = ROOT / "configs" / "search" / "digits.yaml"
    return SearchOptions(space=load_space(space_path, RunConfig()), space_path=str(space_path), study_name=name,
                         storage=storage, n_trials=trials, pruner="none", workers=workers)


def first_steps() -> list[float]:
    """Wrap Trainer.optimizer_step so the wall time of each trainer's first step is recorded (this process)."""
    from mltrack.trainers.base import Trainer

    stamps: list[float] = []
    original = Trainer.optimizer_step

    def timed(self: Any, model: Any, optimizer: Any) -> bool:
        done = original(self, model, optimizer)
        if not getattr(self, "_bench_stepped", False):
            self._bench_stepped = True
            stamps.append(time.time())
        return done

    Trainer.optimizer_step = timed  # type: ignore[method-assign]
    return stamps


def study_trials(storage: str, name: str) -> list[Any]:
    import optuna

    if storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(storage[len("journal:"):]))  # type: ignore[assignment]
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    return sorted(trials, key=lambda t: t.number)


def throughput(trials: list[Any]) -> dict[str, float]:
    done = [t for t in trials if t.datetime_complete is not None and t.state.name in ("COMPLETE", "PRUNED")]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    walls = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    return {"trials": len(done), "span_s": span, "trial_wall_median_s": statistics.median(walls),
            "trials_per_hour": 3600.0 * len(done) / span}


def one_worker(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from mltrack.search import run_search
    from mltrack.tracking import run_info

    stamps = first_steps()
    storage = f"sqlite:///{work / 'one.db'}"
    run_search(base_config(work / "data" / "digits", args.epochs), options("bench-one", storage, args.trials, 1))
    trials = study_trials(storage, "bench-one")
    opened = [run_info(t.user_attrs["mlflow_run_id"])["start_time"] / 1000.0 for t in trials]
    asked = [t.datetime_start.timestamp() for t in trials]
    to_run = [o - a for a, o in zip(asked, opened)]
    to_step = [s - o for o, s in zip(opened, stamps)]
    total = [s - a for a, s in zip(asked, stamps)]
    return {**throughput(trials), "ask_to_run_open_s": statistics.median(to_run),
            "run_open_to_first_step_s": statistics.median(to_step), "ask_to_first_step_s": statistics.median(total),
            "ask_to_first_step_all_s": [round(x, 3) for x in total]}


def many_workers(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from mltrack.search import run_search
    from mltrack.tracking import run_info

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    storage = f"journal:{work / 'many.journal'}"
    started = time.time()
    run_search(base_config(work / "data" / "digits", args.epochs),
               options("bench-many", storage, args.trials, args.workers))
    trials = study_trials(storage, "bench-many")
    first_ask = min(t.datetime_start.timestamp() for t in trials)
    to_run = [run_info(t.user_attrs["mlflow_run_id"])["start_time"] / 1000.0 - t.datetime_start.timestamp()
              for t in trials]
    return {**throughput(trials), "workers": args.workers, "start_to_first_ask_s": first_ask - started,
            "ask_to_run_open_s": statistics.median(to_run), "ask_to_run_open_all_s": [round(x, 3) for x in to_run]}


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    import optuna
    import torch

    work = Path(tempfile.mkdtemp(prefix="mltrack-bench-search-"))
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result: dict[str, Any] = {"host": {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
                                       "load_average_1m_at_start": os.getloadavg()[0],
                                       "torch": torch.__version__, "optuna": optuna.__version__},
                              "setup": {"data": "digits 1797 images, 10 classes", "config": "configs/digits.yaml",
                                        "space": "configs/search/digits.yaml", "epochs_per_trial": args.epochs,
                                        "sampler": "tpe", "pruner": "none"}}
    result["one_worker_sqlite"] = one_worker(work, args)
    if args.workers > 0:
        result["workers_journal"] = many_workers(work, args)
    report(result)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_search.json").write_text(json.dumps(result, indent=1))


def report(result: dict[str, Any]) -> None:
    one, setup = result["one_worker_sqlite"], result["setup"]
    print(f"\nmltrack search on {setup['data']}: {setup['config']}, {setup['epochs_per_trial']} epochs/trial, "
          f"TPE, no pruning; {result['host']['cpu_cores']} CPU cores, torch {result['host']['torch']}")
    print(f"1 worker (in process, SQLite): {one['trials']} trials, {one['trials_per_hour']:.0f} trials/hour, "
          f"median trial {one['trial_wall_median_s']:.1f} s")
    print(f"  trial start overhead (median): ask -> MLflow run open {one['ask_to_run_open_s']:.2f} s, "
          f"run open -> first optimizer step {one['run_open_to_first_step_s']:.2f} s, "
          f"ask -> first step {one['ask_to_first_step_s']:.2f} s (all: {one['ask_to_first_step_all_s']})")
    many = result.get("workers_journal")
    if many:
        print(f"{many['workers']} worker processes (journal): {many['trials']} trials, {many['trials_per_hour']:.0f} "
              f"trials/hour, median trial {many['trial_wall_median_s']:.1f} s, "
              f"search start -> first trial asked {many['start_to_first_ask_s']:.1f} s, ask -> MLflow run open "
              f"{many['ask_to_run_open_s']:.2f} s (all: {many['ask_to_run_open_all_s']}; a fresh worker imports "
              "torch and mlflow in its first trial)")
    print(f"load average (1 min) at start: {result['host']['load_average_1m_at_start']:.1f}")


if __name__ == "__main__":
    main()
