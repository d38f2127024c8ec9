"""Is a training process's main thread pinned to one core (an OpenMP binding setting, say), so that the
threads it starts and the children it spawns share that core with it? Prints the environment's OpenMP
settings, the CPU affinity before and after torch runs CPU and CUDA work, that of a new thread and of a
spawned child, and how fast a Python loop runs in the main thread alone and beside a spawned child that
burns a core (about 1.0x when they do not share a core).

    python bench/probe_affinity.py

Written to test one explanation of the tracking group's finding that a child process rendering figures
slowed training more than rendering them on a thread (README.md; that mode has since been removed). On an
H100 machine (16 cores, bench/results_probe_affinity_h100.txt) nothing is pinned: all 16 cores everywhere,
1.02x, so that explanation is ruled out."""
import multiprocessing as mp
import os
import threading
import time


def burn(seconds: float) -> tuple[set, float]:
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return os.sched_getaffinity(0), n / seconds


def loop_rate(seconds: float = 0.6) -> float:
    return burn(seconds)[1]


if __name__ == "__main__":
    print({k: v for k, v in os.environ.items() if any(s in k.upper() for s in ("OMP", "KMP", "GOMP", "MKL", "CUDA_"))})
    print("cpu_count", os.cpu_count(), "start affinity", sorted(os.sched_getaffinity(0)))
    import torch
    a = torch.randn(800, 800)
    (a @ a).sum(); torch.randn(20_000_000).sum()
    if torch.cuda.is_available():
        x = torch.randn(4096, 4096, device="cuda"); (x @ x).sum().item()
    print("after torch CPU+CUDA ops: main affinity", sorted(os.sched_getaffinity(0)), "threads", torch.get_num_threads())
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("aff", os.sched_getaffinity(0))); t.start(); t.join()
    print("new thread affinity", sorted(out["aff"]))
    alone = loop_rate()
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        res = pool.apply_async(burn, (1.5,))
        time.sleep(0.3)
        with_child = loop_rate()
        child_aff, _ = res.get()
    print("spawned child affinity", sorted(child_aff))
    print(f"main-thread loop rate: alone {alone:,.0f}/s, with a spawned child burning a core {with_child:,.0f}/s "
          f"({with_child / alone:.2f}x)")
