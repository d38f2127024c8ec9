"""The benchmark's printed report: throughput table with ratios, the other groups, the issue's targets;
and the same from a saved bench.json as Markdown for the README (``--markdown bench.json``)."""
from __future__ import annotations

import statistics

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Optional

LABELS = {
    "reference_fp32": "(1) reference: ImageFolder+PIL workers, fp32",
    "reference_bf16": "(2) reference loader, bf16+channels_last",
    "timm_bf16": "(3) timm create_loader(use_prefetcher)",
    "mltrack_default": "(4) mltrack default (data.cache none)",
    "mltrack_gpu": "(5) mltrack fast path, cache gpu",
    "mltrack_ram": "(5) mltrack fast path, cache ram",
    "nvjpeg_every_epoch": "    decode every epoch on GPU (bench feed, bytes in RAM)",
    "mltrack_decode_gpu": "(5) mltrack data.cache decode_gpu (nvJPEG, every epoch)",
    "ceiling_bf16": "(6) ceiling: synthetic on GPU, bf16+CL",
    "ceiling_fp32": "    ceiling fp32",
    "mltrack_gpu_compiled": "(5) cache gpu, torch.compile",
    "mltrack_ram_compiled": "(5) cache ram, torch.compile",
    "ceiling_compiled": "(6) ceiling, torch.compile",
}


def _ratio(a: Optional[float], b: Optional[float], pct: bool = False) -> str:
    if a is None or not b:
        return "-"
    return f"{100 * a / b:5.1f} %" if pct else f"{a / b:5.2f}x"


def _epoch(row: dict[str, Any]) -> Optional[float]:
    times = row.get("epoch_s")
    return sum(times) / len(times) if times else None


def _status(row: dict[str, Any]) -> str:
    return f"skipped: {row['skipped']}" if "skipped" in row else f"FAILED: {row.get('error', '?')}"


def print_report(R: Any) -> None:
    env = R.env
    print("\n" + "=" * 100)
    print(f"device: {env.get('gpu', env['device'])} | torch {env['torch']} | torchvision {env['torchvision']} | "
          f"timm {env['timm']} | python {env['python']} | {env['cpu_count']} CPU cores")
    print(f"command: {env['command']}")
    models = [r["model"] for r in R.rows if r["group"] == "throughput"]
    for model in dict.fromkeys(models):
        ref, timm = R.get("reference_fp32", model), R.get("timm_bf16", model)
        print(f"\n{model}: img/s of full training steps (bs {R.extra['settings']['batch']}, "
              f"{R.extra['settings']['image']} px)")
        print(f"  {'variant':48s} {'img/s':>9s} {'x (1)':>7s} {'x (3)':>7s} {'% of (6)':>9s}")
        for row in [r for r in R.rows if r["group"] == "throughput" and r["model"] == model]:
            ceiling = R.get("ceiling_compiled" if "compiled" in row["name"] else
                            "ceiling_fp32" if row["name"] == "reference_fp32" else "ceiling_bf16", model)
            label = LABELS.get(row["name"], row["name"])
            if "img_per_s" not in row:
                print(f"  {label:48s} {_status(row)}")
                continue
            v = row["img_per_s"]
            print(f"  {label:48s} {v:9,.0f} {_ratio(v, ref):>7s} {_ratio(v, timm):>7s} {_ratio(v, ceiling, True):>9s}")
    _other(R, "loader_only", "loader alone (no model): what each loader can deliver, img/s", relative=False)
    _other(R, "hymenoptera", "hymenoptera-size epoch (train + val), seconds per epoch")
    if any("median_epoch_s" in r for r in R.rows if r["group"] == "tracking"):
        _tracking(R)
    else:  # a result file from before the interleaved measurement
        _other(R, "tracking", "tracking on vs off: train + val epoch")
    if R.extra.get("build_s"):
        print(f"\ncache build (decode every image once), s: {R.extra['build_s']}")
    print_targets(R)


def _other(R: Any, group: str, title: str, relative: bool = True) -> None:
    rows = [r for r in R.rows if r["group"] == group]
    if not rows:
        return
    print(f"\n{title}")
    base = _epoch(rows[0]) if relative and "epoch_s" in rows[0] else None
    for row in rows:
        if "img_per_s" not in row:
            print(f"  {row['name']:28s} {row['model']:10s} {_status(row)}")
            continue
        e = _epoch(row)
        extra = "".join(f"  {label} {row[key]} s" for key, label in (("io_drain_s", "epoch IO drain after"),
                                                                         ("queue_drain_s", "upload queue drain after")) if key in row)
        if "checkpoints_queued" in row:
            extra += f"  checkpoints queued {row['checkpoints_queued']}{_not_queued(row)}"
        if "figures" in row:
            extra += f"  figures {row['figures']}"
        if row.get("hooks_ms"):
            extra += f"  hooks {statistics.median(row['hooks_ms']):.2f} ms median"
        if "compile_mode" in row:  # its warm-up: compiling + CUDA-graph capture when this variant compiled
            extra += (f"  warm-up {row['warmup_s']} s ({row.get('warmup_epochs', '?')} epochs, "
                      f"{'compiling' if row.get('compiled_here') else 'already compiled'}; "
                      f"graphs compiled in the timed epochs: {row.get('graphs_compiled_timed', '?')})")
        rel = f"  {_ratio(e, base)} the first's time" if base and e and row is not rows[0] else ""
        print(f"  {row['name']:28s} {row['model']:10s} {row['img_per_s']:9,.0f} img/s  epoch {e:.3f} s{rel}{extra}")


def _not_queued(row: dict[str, Any]) -> str:
    """Improving epochs not queued on their own: superseded in the queue, held by the duty rule (CheckpointHook)."""
    parts = [f"+{row[key]} {label}" for key, label in (("checkpoints_superseded", "superseded in the queue"),
                                                        ("checkpoints_held", "held")) if row.get(key)]
    return f" ({', '.join(parts)})" if parts else ""


def _tracking(R: Any) -> None:
    """The interleaved tracking on/off rows: medians, ratios to untracked and the drains between blocks."""
    rows = [r for r in R.rows if r["group"] == "tracking"]
    proto = next((r["interleaved"] for r in rows if "interleaved" in r), R.extra.get("tracking_protocol", {}))
    print(f"\ntracking on vs off: train + val epoch, interleaved in one process: {proto.get('rounds')} rounds x "
          f"{proto.get('block_epochs')} epochs per variant, order rotated each round, drains between blocks "
          f"untimed; first epochs of blocks {'dropped' if proto.get('drop_first_epoch_of_block') else 'kept'}")
    print(f"  {'variant':28s} {'img/s':>9s} {'median s':>9s} {'x untracked':>12s} {'per round (median)':>34s}  "
          f"{'max drain after a block (io / upload queue)'}")
    for row in rows:
        if "img_per_s" not in row:
            print(f"  {row['name']:28s} {_status(row)}")
            continue
        rounds = " ".join(f"{x:.3f}" for x in row.get("round_ratios", []))
        per_round = f"{rounds} ({row['median_round_ratio']:.3f})" if row.get("median_round_ratio") else "-"
        ratio = f"{row['ratio_of_medians']:.3f}" if "ratio_of_medians" in row else "-"
        drains = (f"{row['io_drain_s']:.3f} / {row.get('queue_drain_s', '-')} s" if "io_drain_s" in row else "-")
        if "checkpoints_queued" in row:
            drains += (f"; {row['checkpoints_queued']} checkpoints queued in {row['epochs']} timed + warm-up "
                       f"epochs{_not_queued(row)}")
        if "figures" in row:
            drains += f"; figures {row['figures']}"
        if "process_cpus" in row:
            drains += f"; process CPU {row['process_cpus']} cores"
        if "threads_cpu_ms_per_epoch" in row:
            names = ", ".join(f"{n} {ms}" for n, ms in row.get("threads_cpu_ms_per_epoch_by_name", {}).items())
            share = row["threads_cpu_ms_per_epoch"] / (10 * row["median_epoch_s"])  # % of the epoch
            drains += (f"; background threads' CPU {row['threads_cpu_ms_per_epoch']} ms per epoch, {share:.1f} % of it "
                       f"({names})")
        if "renderer_cpu_s" in row:  # saved results of the child-process renderer (removed since) carry it
            drains += f"; renderer CPU {row['renderer_cpu_s']} s"
        if "hooks_ms_median" in row:
            drains += f"; hooks on the training thread {row['hooks_ms_median']} ms median, {row['hooks_ms_max']} max"
        print(f"  {row['name']:28s} {row['img_per_s']:9,.0f} {row['median_epoch_s']:9.4f} {ratio:>12s} "
              f"{per_round:>34s}  {drains}")


def _check(text: str, ok: Optional[bool]) -> None:
    print(f"  [{'PASS' if ok else 'MISS' if ok is not None else 'n/a '}] {text}")


def print_targets(R: Any) -> None:
    """The issue's targets, each with the numbers it is judged on (n/a where not measured)."""
    print("\ntargets (issue 9)")
    g = R.get
    r50 = [g("mltrack_gpu", "resnet50"), g("timm_bf16", "resnet50"), g("ceiling_bf16", "resnet50")]
    if all(r50):
        _check(f"resnet50 fast path {r50[0]:,.0f} img/s >= timm {r50[1]:,.0f} and >= 97 % of ceiling "
               f"({100 * r50[0] / r50[2]:.1f} %)", r50[0] >= r50[1] and r50[0] >= 0.97 * r50[2])
    else:
        _check("resnet50 fast path >= timm and >= 97 % of ceiling", None)
    for name, ceiling in (("mltrack_gpu", "ceiling_bf16"), ("mltrack_ram", "ceiling_bf16"),
                          ("mltrack_gpu_compiled", "ceiling_compiled"), ("mltrack_ram_compiled", "ceiling_compiled")):
        v, c, t = g(name, "resnet18"), g(ceiling, "resnet18"), g("timm_bf16", "resnet18")
        if v and c:
            vs_timm = f", {v / t:.2f}x timm (>= 2.5x)" if t else ""
            _check(f"resnet18 {name}: {100 * v / c:.1f} % of {ceiling} (>= 90 %){vs_timm}",
                   v >= 0.9 * c and (t is None or v >= 2.5 * t))
        else:
            _check(f"resnet18 {name} >= 90 % of {ceiling}", None)
    v, t = g("mltrack_decode_gpu", "resnet18"), g("timm_bf16", "resnet18")  # mltrack's own loader, not the feed
    _check(f"decode every epoch (decode_gpu): {v / t:.2f}x timm (>= 2x)" if v and t else
           "decode every epoch (decode_gpu) >= 2x timm",
           (v >= 2 * t) if v and t else None)
    _hymenoptera_target(R)
    _tracking_target(R)


def _hymenoptera_target(R: Any) -> None:
    """Judged on the fastest tracked variant (eager or compiled), named, with the eager one beside it."""
    rows = {r["name"]: r for r in R.rows if r["group"] == "hymenoptera"}
    tut = _epoch(rows.get("tutorial_fp32", {}))
    tracked = {n: _epoch(r) for n, r in rows.items() if n.endswith("_tracked") and "epoch_s" in r}
    if not (tut and tracked):
        _check("hymenoptera epoch with tracking <= 0.1 s and >= 10x the tutorial loop", None)
        return
    best = min(tracked, key=lambda n: tracked[n])
    mode = rows[best].get("compile_mode")
    eager = next((n for n in tracked if "compile_mode" not in rows[n]), None)
    beside = (f"; eager {eager} {tracked[eager]:.3f} s, {tut / tracked[eager]:.1f}x" if eager and eager != best else "")
    _check(f"hymenoptera epoch with tracking: {best} ({f'compile_mode {mode}' if mode else 'eager'}) "
           f"{tracked[best]:.3f} s (<= 0.1 s), {tut / tracked[best]:.1f}x the tutorial loop (>= 10x){beside}",
           tracked[best] <= 0.1 and tut >= 10 * tracked[best])


def _tracking_target(R: Any) -> None:
    """Interleaved rows: the median over rounds of tracked/untracked (paired per round); older result files:
    the ratio of the two windows' mean epochs."""
    rows = {r["name"]: r for r in R.rows if r["group"] == "tracking"}
    judged = "tracked_default" if rows.get("tracked_default", {}).get("median_round_ratio") else "tracked"
    on = rows.get(judged, {})
    if on.get("median_round_ratio"):
        ratio = on["median_round_ratio"]
        _check(f"tracking on vs off ({judged}): {100 * (ratio - 1):+.1f} % epoch time, median of per-round ratios over "
               f"{len(on['round_ratios'])} rounds (of medians: {100 * (on['ratio_of_medians'] - 1):+.1f} %) "
               f"(<= 1 %)", ratio <= 1.01)
        return
    off, on_s = _epoch(rows.get("untracked", {})), _epoch(on)
    _check(f"tracking on vs off: {100 * (on_s / off - 1):+.1f} % epoch time (<= 1 %)" if on_s and off else
           "tracking on vs off <= 1 %", (on_s <= 1.01 * off) if on_s and off else None)


class Saved:
    """A bench.json read back, with the interface the report functions use."""

    def __init__(self, path: Path) -> None:
        data = json.loads(Path(path).read_text())
        self.env, self.extra, self.rows = data["env"], data["extra"], data["results"]

    def get(self, name: str, model: str) -> Optional[float]:
        for row in self.rows:
            if row["name"] == name and row["model"] == model and "img_per_s" in row:
                return float(row["img_per_s"])
        return None


def markdown(path: Path) -> str:
    """README-ready: a throughput table per model, then the full text report in a code block."""
    R = Saved(path)
    env = R.env
    lines = [f"Device: {env.get('gpu', env['device'])}, {env['cpu_count']} CPU cores; torch {env['torch']}, "
             f"torchvision {env['torchvision']}, timm {env['timm']}; command: `{env['command']}`", ""]
    for model in dict.fromkeys(r["model"] for r in R.rows if r["group"] == "throughput"):
        ref, timm = R.get("reference_fp32", model), R.get("timm_bf16", model)
        lines += [f"**{model}** (bs {R.extra['settings']['batch']}, {R.extra['settings']['image']} px)", "",
                  "| variant | img/s | x (1) | x (3) | % of (6) |", "|---|---:|---:|---:|---:|"]
        for row in [r for r in R.rows if r["group"] == "throughput" and r["model"] == model]:
            label = LABELS.get(row["name"], row["name"]).strip()
            if "img_per_s" not in row:
                lines.append(f"| {label} | {_status(row)} | | | |")
                continue
            ceiling = R.get("ceiling_compiled" if "compiled" in row["name"] else
                            "ceiling_fp32" if row["name"] == "reference_fp32" else "ceiling_bf16", model)
            v = row["img_per_s"]
            lines.append(f"| {label} | {v:,.0f} | {_ratio(v, ref).strip()} | {_ratio(v, timm).strip()} | "
                         f"{_ratio(v, ceiling, True).strip()} |")
        lines.append("")
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_report(R)
    return "\n".join(lines + ["```", text.getvalue().strip(), "```", ""])
