"""``mltrack export --format onnx``: a run's best model as ONNX, accepted only if it agrees with torch.

The model is rebuilt from the run's artifacts (as ``mltrack evaluate`` does), exported with torch's
ONNX exporter (input ``image`` float32 (N, 3, S, S) with a dynamic batch dimension, output ``logits``
(N, C), eval mode), and run with ONNX Runtime (CPU) on up to ``max_images`` of the run's test images.
The largest absolute logit difference against torch (CPU, fp32) is logged as
``export/onnx/max_abs_logit_diff``. Tolerance: :data:`DEFAULT_TOLERANCE` = 1e-4 for fp32 - the two
runtimes order float sums differently, which moves logits by ~1e-6; anything near 1e-4 means a
different computation. Above it the export fails and no ``.onnx`` artifact is logged (only the
parity report, under ``export/rejected/``). The preprocessing is not part of the graph:
``export/onnx_model.json`` records it.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mltrack.console import get_logger
from mltrack.errors import ConfigError, DataError

log = get_logger()
DEFAULT_TOLERANCE = 1e-4  # fp32 max abs logit difference ONNX Runtime vs torch (see module docstring)
_SINGLE_FILE_LIMIT = 1_500_000_000  # bytes of weights above which ONNX needs external data (2 GB protobuf cap)
METRIC = "export/onnx/max_abs_logit_diff"


@dataclass
class ExportResult:
    run_id: str
    passed: bool
    max_abs_diff: float
    tolerance: float
    n_images: int
    artifact: str  # artifact path of the .onnx file ("" when the check failed)
    local_path: Path | None  # --output copy, if asked for


def export_network(network: nn.Module, example: torch.Tensor, path: Path, opset: int | None = None) -> Path:
    """Write ``network`` (eval, CPU, fp32) to ``path`` as ONNX with a dynamic batch dimension.
    ConfigError if onnx/onnxscript are not installed or the exporter cannot translate the model."""
    try:
        import onnxscript  # noqa: F401 - the exporter needs it; fail with an install hint instead of deep inside
    except ModuleNotFoundError as err:
        raise ConfigError(f"ONNX export needs '{err.name}': pip install -e '.[export]'") from None
    network = network.cpu().eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    try:
        torch.onnx.export(network, (example.cpu(),), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                          external_data=weight_bytes > _SINGLE_FILE_LIMIT, verbose=False)
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export this"
        raise ConfigError(f"torch could not export {type(network).__name__} to ONNX: {str(err)[:500]}") from None
    return path


def max_abs_logit_diff(network: nn.Module, onnx_path: Path, images: torch.Tensor) -> float:
    """Largest |logit_onnxruntime - logit_torch| over ``images`` (CPU, fp32). Needs onnxruntime."""
    try:
        import onnxruntime
    except ModuleNotFoundError:
        raise ConfigError("the ONNX parity check needs onnxruntime: pip install -e '.[export]'") from None
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = network.cpu().eval()(images.cpu()).float().numpy()
    got = session.run(["logits"], {"image": images.cpu().numpy()})[0]
    if got.shape != expected.shape:
        return float("inf")
    return float(abs(got - expected).max())


def _versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _test_batch(bundle: Any, data_dir: str | Path | None, max_images: int, workdir: Path) -> torch.Tensor:
    from mltrack.data.images import load_rgb
    from mltrack.data.transforms import build_transform
    from mltrack.evaluate import resolve_data_dir, split_samples

    images = resolve_data_dir(bundle.cfg, bundle.info, data_dir)
    samples = split_samples(bundle, images, "test", workdir)[:max_images]
    if not samples:
        raise DataError(f"run {bundle.run_id} has an empty test index: no images for the ONNX parity check")
    data = bundle.cfg.data
    transform = build_transform(data.transforms, data.image_size, train=False)
    return torch.stack([transform(load_rgb(images / "raw" / rel, data.max_image_pixels)) for rel, _ in samples])


def export_onnx(run_id: str, *, data_dir: str | Path | None = None, tolerance: float = DEFAULT_TOLERANCE,
                opset: int | None = None, max_images: int = 64, output: Path | None = None) -> ExportResult:
    """Export ``run_id``'s best model to ONNX, check parity on its test images and log to that run:
    metric :data:`METRIC`, tag ``mltrack.export.onnx`` (passed/failed) and, if passed, ``export/model.onnx``
    with ``export/onnx_model.json`` (preprocessing, class names, versions, parity). See the module docstring."""
    import shutil

    from mltrack.evaluate import fetch_run
    from mltrack.serving import network_from_state
    from mltrack.tracking import log_to_run, metric_history

    with tempfile.TemporaryDirectory(prefix="mltrack-export-") as tmp:
        workdir = Path(tmp)
        bundle = fetch_run(run_id, workdir)
        images = _test_batch(bundle, data_dir, max_images, workdir)
        network, cfg = network_from_state(bundle.state)
        out_dir = workdir / "export"
        onnx_path = export_network(network, images[:2], out_dir / "model.onnx", opset)
        diff = max_abs_logit_diff(network, onnx_path, images)
        passed = diff <= tolerance
        report = {"format": "onnx", "input": {"name": "image", "dtype": "float32",
                                              "shape": ["batch", 3, cfg.data.image_size, cfg.data.image_size]},
                  "output": {"name": "logits", "shape": ["batch", len(bundle.class_names)]},
                  "class_names": bundle.class_names, "preprocessing": {"transforms": cfg.data.transforms,
                                                                      "image_size": cfg.data.image_size},
                  "parity": {"max_abs_logit_diff": diff, "tolerance": tolerance, "images": len(images),
                             "passed": passed}, "versions": _versions(), "source_run": run_id}
        (out_dir / "onnx_model.json").write_text(json.dumps(report, indent=2))
        step = len(metric_history(run_id, METRIC))
        tag = "passed" if passed else f"failed: max abs logit diff {diff:.3e} > {tolerance:.0e}"
        # A rejected export leaves only its report, apart from an earlier accepted export/model.onnx.
        artifacts = [(p, "export") for p in out_dir.iterdir()] if passed else \
            [(out_dir / "onnx_model.json", "export/rejected")]
        log_to_run(run_id, {METRIC: diff}, step, tags={"mltrack.export.onnx": tag}, artifacts=artifacts)
        local = None
        if passed and output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            local = Path(shutil.copyfile(onnx_path, output))
    log.info("ONNX parity on %d test images: max abs logit diff %.3e (tolerance %.0e): %s", len(images), diff,
             tolerance, "passed" if passed else "FAILED")
    return ExportResult(run_id, passed, diff, tolerance, len(images), "export/model.onnx" if passed else "", local)
