"""MLflow adapter: the only module that imports mlflow.

Every call names its run explicitly through ``MlflowClient`` (never the fluent active run), so parallel
Optuna trials in one process cannot collide. Writes after ``Tracker.start`` go through one ordered
background queue (``mltrack._spool.Delivery``): the training thread never waits on the network, and a
tracking outage spools to a local JSONL file that is replayed when the server is back (or by
``mltrack sync <spool file>`` -> :func:`replay_spool`).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import mlflow.artifacts
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from mltrack._sender_process import ProcessSender, RemoteSendError
from mltrack._spool import (Delivery, Op, SpoolFile, check_key, chunks, first_line, group, link_or_copy,
                            quiet_worker_retries)
from mltrack.errors import CheckpointError, ConfigError, UserError

log = logging.getLogger("mltrack.tracking")

FINISH_TIMEOUT_S = 60.0  # finish() waits at most this long for the queue before leaving a spool
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_TAG = "mlflow.parentRunId"
EXIT_REASON_TAG = "mltrack.exit_reason"
DEFAULT_SPOOL_DIR = Path("runs") / ".tracking"  # relative to the working directory
# MLflow's defaults (7 retries, backoff 2, 120 s timeout) block for minutes on a dead server.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# Errors that no retry can fix: the request itself is wrong (or its run is gone).
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST",
                    "RESOURCE_ALREADY_EXISTS"}


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` (absolute, so a later chdir
    cannot move the store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class Tracker:
    """One MLflow run, written through an ordered non-blocking queue. Create with :meth:`start`."""

    run_id: str
    experiment_id: str
    run_name: str

    def __init__(self, client: MlflowClient, run: Run, spool_dir: Path, uri: str, sender_process: bool = False) -> None:
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self.run_name = run.info.run_name or ""
        self.tracking_uri = uri
        self._client = client
        self._params: dict[str, str] = dict(run.data.params)  # what the run holds: immutability check
        self._steps: dict[str, set[int]] = {}  # steps queued by this process, per metric key
        self._spool_dir = spool_dir
        self._stage_root = spool_dir / f"{self.run_id}.stage"
        self._finished = False
        spool = SpoolFile(spool_file_for(spool_dir, self.run_id), {"run_id": self.run_id, "tracking_uri": uri})
        # sender_process: MLflow's client work in a child process (see mltrack._sender_process), off this GIL
        sender = _Sender(client, self.run_id)
        self._process = ProcessSender(uri, self.run_id, fallback=sender) if sender_process else None
        self._delivery = Delivery(self._process if self._process is not None else sender, _is_permanent, spool, uri)

    @classmethod
    def start(cls, experiment: str, run_name: str, tags: dict[str, str], *, resume_run_id: str | None = None,
              parent_run_id: str | None = None, spool_dir: Path | None = None,
              sender_process: bool = False) -> "Tracker":
        """Create, re-open (``resume_run_id``) or attach to (env ``MLFLOW_RUN_ID``) a run; status RUNNING.

        Synchronous (one round of requests). The experiment comes from env ``MLFLOW_EXPERIMENT_ID`` /
        ``MLFLOW_EXPERIMENT_NAME`` before ``experiment`` and is created if missing; an attached or resumed
        run keeps its experiment and name. ``tags`` (+ ``mlflow.parentRunId``) are set in every case.
        A spool left by an earlier process for this run is replayed first. ``sender_process``: deliver the
        queued writes from a child process (training on a GPU: MLflow's Python work then never holds the
        training process's GIL); the default delivers them from a thread. Raises UserError when the
        tracking store cannot be reached, CheckpointError for an unknown ``resume_run_id``.
        """
        _fast_fail_http_defaults()
        quiet_worker_retries()
        uri = tracking_uri()
        client = MlflowClient(tracking_uri=uri)
        spool_dir = Path(spool_dir) if spool_dir is not None else Path.cwd() / DEFAULT_SPOOL_DIR
        all_tags = {**tags, **({PARENT_TAG: parent_run_id} if parent_run_id else {})}
        try:
            run = _open_run(client, experiment, run_name, all_tags, resume_run_id)
            leftover = spool_file_for(spool_dir, run.info.run_id)
            if leftover.exists():  # before re-opening: it may end with the earlier process's status
                log.warning("tracking: replaying %s left by an earlier process", leftover)
                replay_spool(leftover, uri)
                run = client.get_run(run.info.run_id)
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            _log_tags_now(client, run.info.run_id, all_tags)
            run = client.get_run(run.info.run_id)
        except MlflowException as exc:
            if _is_permanent(exc):
                raise
            raise UserError(f"cannot reach the MLflow tracking store at {uri}: {first_line(exc)}. Start the "
                            "server (mlflow server ...) or fix MLFLOW_TRACKING_URI; unset it to use ./mlflow.db"
                            ) from None
        return cls(client, run, spool_dir, uri, sender_process)

    # ---------------------------------------------------------------- writes (queued, non-blocking)

    def log_params(self, params: dict[str, Any]) -> None:
        """Queue params (stringified, truncated to MLflow's 6000 chars, chunked by 100). A key already on
        the run with the same value is skipped; a different value raises ValueError before anything is
        queued, because MLflow params are immutable (record drift as a tag/artifact instead)."""
        new: dict[str, str] = {}
        conflicts = []
        for key, value in params.items():
            check_key(key, "param", MAX_ENTITY_KEY_LENGTH)
            text = str(value)[:MAX_PARAM_VAL_LENGTH]
            old = self._params.get(key)
            if old is None:
                new[key] = text
            elif old != text:
                conflicts.append(f"{key}: logged {old!r}, now {text!r}")
        if conflicts:
            raise ValueError(f"MLflow params are immutable and run {self.run_id} already has different values: "
                             + "; ".join(conflicts) + ". Record the change as drift instead of re-logging it.")
        self._params.update(new)
        self._delivery.put([{"op": "params", "params": c} for c in chunks(new, MAX_PARAMS_TAGS_PER_BATCH)])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values for ``step``, timestamped now (ms); values must convert with ``float()``
        (tensors and numpy scalars do). Consecutive calls are sent as one ``log_batch``."""
        values = {}
        for key, value in metrics.items():
            check_key(key, "metric", MAX_ENTITY_KEY_LENGTH)
            values[key] = float(value)
        for key in values:
            self._steps.setdefault(key, set()).add(int(step))
        ts = int(time.time() * 1000)
        self._delivery.put([{"op": "metrics", "step": int(step), "ts": ts, "metrics": c}
                            for c in chunks(values, MAX_METRICS_PER_BATCH)])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Queue tags (values stringified, truncated to MLflow's 8000 chars, chunked by 100)."""
        for key in tags:
            check_key(key, "tag", MAX_ENTITY_KEY_LENGTH)
        clean = {k: str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}
        self._delivery.put([{"op": "tags", "tags": c} for c in chunks(clean, MAX_PARAMS_TAGS_PER_BATCH)])

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        """Queue an upload of the file as it is *now*: it is hard-linked (or copied) into the stage
        directory first, so a later atomic replace of ``local_path`` (next epoch's ``last.pt``) cannot
        change what this call uploads. A directory is handed to :meth:`log_artifacts`."""
        src = Path(local_path)
        if src.is_dir():
            self.log_artifacts(src, artifact_path)
            return
        if not src.is_file():
            raise FileNotFoundError(f"cannot log artifact: {src} does not exist")
        staged = self._stage_dir() / src.name
        link_or_copy(src, staged)
        self._delivery.put([{"op": "artifact", "path": str(staged), "artifact_path": artifact_path,
                             "cleanup": True}])

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        """Queue an upload of the directory's contents as they are now (snapshot by hard links)."""
        src = Path(local_dir)
        if not src.is_dir():
            raise NotADirectoryError(f"cannot log artifacts: {src} is not a directory")
        staged = self._stage_dir() / "contents"
        shutil.copytree(src, staged, copy_function=link_or_copy)
        self._delivery.put([{"op": "artifacts", "path": str(staged), "artifact_path": artifact_path,
                             "cleanup": True}])

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Save a matplotlib figure as PNG (on the calling thread) and queue it as ``artifact_file``
        (e.g. ``plots/confusion_matrix_val.png``)."""
        rel = PurePosixPath(artifact_file)
        staged = self._stage_dir() / rel.name
        fig.savefig(staged, format="png")
        self._queue_staged(staged, rel)

    def log_image_bytes(self, data: bytes, artifact_file: str) -> None:
        """Queue an image already encoded elsewhere (a PNG of ``mltrack.figures.render_png``) as
        ``artifact_file``."""
        rel = PurePosixPath(artifact_file)
        staged = self._stage_dir() / rel.name
        staged.write_bytes(data)
        self._queue_staged(staged, rel)

    def _queue_staged(self, staged: Path, rel: PurePosixPath) -> None:
        parent = str(rel.parent)
        self._delivery.put([{"op": "artifact", "path": str(staged), "artifact_path": None if parent == "." else parent,
                             "cleanup": True}])

    # ---------------------------------------------------------------- reads and lifecycle

    def metric_steps(self, key: str) -> set[int]:
        """Steps stored on the server for ``key`` plus those queued by this tracker (resume de-dup).
        Blocks for one request unless offline, when only the locally known steps are returned."""
        local = set(self._steps.get(key, ()))
        if self.offline:
            return local
        try:
            return local | {m.step for m in self._client.get_metric_history(self.run_id, key)}
        except MlflowException as exc:
            if _is_permanent(exc):
                raise
            log.warning("tracking: cannot read the history of %s (%s); using this process's steps only",
                        key, first_line(exc))
            return local

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is delivered (s; None = no limit). True if the queue is empty."""
        return self._delivery.flush(timeout)

    def finish(self, status: str = "FINISHED", reason: str | None = None, *,
               timeout: float = FINISH_TIMEOUT_S) -> None:
        """Queue tag ``mltrack.exit_reason`` (when ``reason``) and the terminal status, then flush for at
        most ``timeout`` s. If the server is still unreachable, everything left (the status included)
        stays in the spool file and a warning says how to replay it. Idempotent."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"terminal status must be one of {TERMINAL_STATUSES}, got {status!r}")
        if self._finished:
            return
        self._finished = True
        ops: list[Op] = []
        if reason:
            ops.append({"op": "tags", "tags": {EXIT_REASON_TAG: str(reason)[:MAX_TAG_VAL_LENGTH]}})
        ops.append({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})
        self._delivery.put(ops)
        delivered = self._delivery.close(timeout)
        if self._process is not None:
            self._process.close()
        if delivered:
            shutil.rmtree(self._stage_root, ignore_errors=True)
            try:
                self._spool_dir.rmdir()  # only if empty: other runs' spools stay
            except OSError:
                pass
            return
        spool = self._delivery.spool_path
        log.warning("tracking offline (%s): %d operations of run %s (status %s included) are left in %s; "
                    "replay them when the server is back with: mltrack sync %s",
                    self.tracking_uri, self._delivery.pending(), self.run_id, status, spool, spool)

    @property
    def offline(self) -> bool:
        """True while the tracking server is unreachable (operations are being spooled)."""
        return self._delivery.offline

    @property
    def spool_file(self) -> Path:
        """Where this run's operations are spooled during an outage (exists only while needed)."""
        return self._delivery.spool_path

    def _stage_dir(self) -> Path:
        self._stage_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self._stage_root))


def spool_file_for(spool_dir: Path, run_id: str) -> Path:
    return Path(spool_dir) / f"{run_id}.spool.jsonl"


def replay_spool(spool_file: Path, tracking_uri: str | None = None) -> int:
    """Send the undelivered operations of a spool file in order; returns how many were sent.

    Target: ``tracking_uri``, else env ``MLFLOW_TRACKING_URI``, else the URI recorded in the file.
    (metric, step) pairs already on the server are skipped, so replaying twice sends nothing twice.
    Progress is acked in the file; on success the file is deleted. UserError if the file is not a
    spool or the server is still unreachable (the file then keeps what is left)."""
    _fast_fail_http_defaults()
    path = Path(spool_file)
    try:
        spool, pending = SpoolFile.load(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot replay {path}: {exc}") from None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or spool.header["tracking_uri"]
    send = _Sender(MlflowClient(tracking_uri=uri), spool.header["run_id"])
    sent = 0
    for batch in group(pending, MAX_METRICS_PER_BATCH):
        try:
            send(batch, True)
        except Exception as exc:
            if not _is_permanent(exc):
                raise UserError(f"cannot replay {path}: tracking store {uri} failed ({first_line(exc)}); "
                                f"{sent} of {len(pending)} operations sent. Run `mltrack sync {path}` again "
                                "when it is reachable") from None
            log.warning("tracking: dropping a spooled %s operation that can never succeed: %s",
                        batch[0]["op"], first_line(exc))
        spool.ack(batch[-1]["seq"])
        sent += len(batch)
    spool.remove()
    return sent


def download_artifact(uri: str, dst_dir: Path) -> Path:
    """Local path -> returned as is; ``runs:/``, ``models:/``, ``mlflow-artifacts:/`` and other artifact
    URIs -> downloaded into ``dst_dir``. Anything missing raises CheckpointError within seconds."""
    _fast_fail_http_defaults()
    if "://" not in uri and not uri.startswith(("runs:", "models:", "mlflow-artifacts:")):
        if not Path(uri).exists():
            raise CheckpointError(f"cannot download {uri}: no such local file")
        return Path(uri)
    tracking = tracking_uri()
    try:
        if uri.startswith("runs:/"):
            MlflowClient(tracking_uri=tracking).get_run(uri[len("runs:/"):].strip("/").split("/")[0])
        dst = Path(dst_dir)
        dst.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking,
            registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking))
    except (MlflowException, OSError) as exc:
        raise CheckpointError(f"cannot download {uri}: {first_line(exc)}") from None
    if not local.exists():
        raise CheckpointError(f"cannot download {uri}: nothing at that path")
    return local


def run_info(run_id: str) -> dict[str, Any]:
    """Plain-data view of a run: run_id, run_name, status, tags, params, experiment_id, artifact_uri,
    start_time/end_time (ms). CheckpointError if the run does not exist."""
    _fast_fail_http_defaults()
    run = _get_run(MlflowClient(tracking_uri=tracking_uri()), run_id)
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
            "tags": dict(run.data.tags), "params": dict(run.data.params),
            "experiment_id": run.info.experiment_id, "artifact_uri": run.info.artifact_uri,
            "start_time": run.info.start_time, "end_time": run.info.end_time}


def set_run_status(run_id: str, status: str, reason: str | None = None) -> None:
    """Synchronously set a run's status (RUNNING or terminal) and, with ``reason``, its exit_reason tag.
    For runs no live Tracker owns (reconcile, stale trials). CheckpointError if the run does not exist."""
    if status not in (*TERMINAL_STATUSES, "RUNNING"):
        raise ValueError(f"status must be RUNNING or one of {TERMINAL_STATUSES}, got {status!r}")
    _fast_fail_http_defaults()
    client = MlflowClient(tracking_uri=tracking_uri())
    _get_run(client, run_id)
    if reason:
        client.set_tag(run_id, EXIT_REASON_TAG, str(reason)[:MAX_TAG_VAL_LENGTH])
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


def running_runs(experiment_names: list[str] | None = None) -> list[dict[str, Any]]:
    """:func:`run_info` of every RUNNING run that carries an ``mltrack.role`` tag (mltrack's own runs), in
    the named experiments or in all active ones (for ``mltrack reconcile``)."""
    _fast_fail_http_defaults()
    client = MlflowClient(tracking_uri=tracking_uri())
    if experiment_names:
        exps = [client.get_experiment_by_name(n) for n in experiment_names]
        missing = [n for n, e in zip(experiment_names, exps) if e is None]
        if missing:
            raise UserError(f"no MLflow experiment named {', '.join(missing)} at {tracking_uri()}")
        ids = [e.experiment_id for e in exps if e is not None]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=5000) if ids else []
    return [run_info(r.info.run_id) for r in runs if "mltrack.role" in r.data.tags]


def model_run_id(models_uri: str) -> str:
    """The run that produced the model version a ``models:/<name>@<alias>`` (or ``/<version>``) URI names.
    CheckpointError if the URI names no version or the version has no run."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    _fast_fail_http_defaults()
    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    try:
        name, version = get_model_name_and_version(client, models_uri)
        run_id = client.get_model_version(name, version).run_id
    except MlflowException as exc:
        raise CheckpointError(f"cannot resolve {models_uri}: {first_line(exc)}") from None
    if not run_id:
        raise CheckpointError(f"{models_uri} (model {name} version {version}) was registered without a run; "
                              "resume from runs:/<run_id>/weights/last.pt instead")
    return run_id


# ---------------------------------------------------------------- reads, eval logging, models, registry


def child_runs(parent_run_id: str) -> list[dict[str, Any]]:
    """:func:`run_info` of every run whose ``mlflow.parentRunId`` is ``parent_run_id``, oldest first."""
    _fast_fail_http_defaults()
    client = MlflowClient(tracking_uri=tracking_uri())
    parent = _get_run(client, parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    return [run_info(r.info.run_id) for r in runs]


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of every metric of the run (MLflow's "latest": highest step, then newest)."""
    _fast_fail_http_defaults()
    return dict(_get_run(MlflowClient(tracking_uri=tracking_uri()), run_id).data.metrics)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` pairs of one metric, in logging order."""
    _fast_fail_http_defaults()
    client = MlflowClient(tracking_uri=tracking_uri())
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def log_to_run(run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str] | None = None,
               artifacts: Sequence[tuple[Path, str | None]] = ()) -> None:
    """Synchronously add metrics (at ``step``), tags and artifacts ``(local file or dir, artifact dir)`` to an
    existing run *without* changing its status, end time or params (evaluation of a finished run)."""
    _fast_fail_http_defaults()
    client = MlflowClient(tracking_uri=tracking_uri())
    _get_run(client, run_id)
    ts = int(time.time() * 1000)
    for chunk in chunks(metrics, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, int(step)) for k, v in chunk.items()],
                         synchronous=True)
    if tags:
        _log_tags_now(client, run_id, tags)
    for path, artifact_path in artifacts:
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path)


def save_pyfunc_model(path: Path, data_dir: Path, input_example: Any, input_column: str,
                      output_columns: list[tuple[str, str]], code_dir: Path | None,
                      requirements: list[str]) -> Path:
    """Write an MLflow pyfunc model directory at ``path`` (must not exist) served by ``mltrack.serving``.

    ``data_dir`` is copied to ``<path>/data/<its name>`` and handed to ``mltrack.serving._load_pyfunc``;
    ``code_dir`` (the ``mltrack`` package) is copied into the model so that it loads where mltrack is not
    installed. Signature: one string input column, ``output_columns`` as ``(name, mlflow type)``, and the
    params ``tta`` (boolean) and ``batch_size`` (long). No model is executed here.
    """
    import mlflow.pyfunc
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", input_column)]),
        outputs=Schema([ColSpec(kind, name) for name, kind in output_columns]),
        params=ParamSchema([ParamSpec("tta", "boolean", False), ParamSpec("batch_size", "long", 64)]))
    mlflow.pyfunc.save_model(
        str(path), loader_module="mltrack.serving", data_path=str(data_dir),
        code_paths=[str(code_dir)] if code_dir is not None else None, signature=signature,
        input_example=input_example, pip_requirements=requirements)
    return Path(path)


def register_model(run_id: str, name: str, alias: str, artifact_path: str = "model",
                   tags: dict[str, str] | None = None) -> dict[str, str]:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of model ``name`` and point ``alias``
    at it (registry aliases; stages are deprecated). The registered model is created if missing.

    Returns ``{"name", "version", "alias", "uri": "models:/<name>@<alias>", "source"}``. UserError if the
    run holds no MLflow model at ``artifact_path``.
    """
    _fast_fail_http_defaults()
    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    run = _get_run(client, run_id)
    listed = {f.path for f in client.list_artifacts(run_id, artifact_path)}
    if f"{artifact_path}/MLmodel" not in listed:
        raise UserError(f"run {run_id} has no MLflow model at '{artifact_path}/' (no MLmodel file); register a "
                        "training or cv run that finished, or log its model first")
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise UserError(f"cannot create registered model '{name}': {first_line(exc)}") from None
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": str(version.version), "alias": alias, "uri": f"models:/{name}@{alias}",
            "source": source}


# ---------------------------------------------------------------- helpers


def sender_for(uri: str, run_id: str) -> "_Sender":
    """The ``send`` of a run's queued operations at ``uri`` (mltrack._sender_process runs it in its child)."""
    return _Sender(MlflowClient(tracking_uri=uri), run_id)


class _Sender:
    """Turns one batch of queued ops into MlflowClient calls for one run (worker and replay_spool)."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self._client, self._run_id = client, run_id
        self._server_steps: dict[str, set[int]] = {}  # per key, fetched once when first replaying it
        self._repo: Any = None  # artifact repository of the run, resolved against *this* client's URI

    def __call__(self, batch: list[Op], replay: bool) -> None:
        kind = batch[0]["op"]
        if kind == "metrics":
            self._metrics(batch, replay)
        elif kind == "params":
            self._client.log_batch(self._run_id, params=[Param(k, v) for k, v in batch[0]["params"].items()],
                                   synchronous=True)
        elif kind == "tags":
            self._client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in batch[0]["tags"].items()],
                                   synchronous=True)
        elif kind in ("artifact", "artifacts"):
            self._upload(batch[0])
        elif kind == "terminate":
            self._client.set_terminated(self._run_id, batch[0]["status"], batch[0]["end_time"])
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")

    def _metrics(self, batch: list[Op], replay: bool) -> None:
        """Metric ops and the tags ops among them (``group``): one ``log_batch`` for all."""
        metrics = [Metric(k, float(v), op["ts"], op["step"]) for op in batch if op["op"] == "metrics"
                   for k, v in op["metrics"].items()]
        # One value per key: several epochs' commit tags in one batch leave the last, as separate calls would.
        latest = {k: v for op in batch if op["op"] == "tags" for k, v in op["tags"].items()}
        tags = [RunTag(k, v) for k, v in latest.items()]
        if replay:  # the head of a spool may have reached the server before the connection broke
            metrics = [m for m in metrics if m.step not in self._steps_on_server(m.key)]
        if metrics or tags:
            self._client.log_batch(self._run_id, metrics=metrics, tags=tags, synchronous=True)
        for m in metrics:
            if m.key in self._server_steps:
                self._server_steps[m.key].add(m.step)

    def _steps_on_server(self, key: str) -> set[int]:
        if key not in self._server_steps:
            self._server_steps[key] = {m.step for m in self._client.get_metric_history(self._run_id, key)}
        return self._server_steps[key]

    def _upload(self, op: Op) -> None:
        path = Path(op["path"])
        if not path.exists():
            raise FileNotFoundError(f"the local copy to upload is gone: {path}")
        if self._repo is None:
            # Not client.log_artifact: MLflow caches that repository per run id process-wide, bound to
            # the first tracking URI seen, so a replay to another server would upload to the dead one.
            artifact_uri = self._client.get_run(self._run_id).info.artifact_uri
            self._repo = get_artifact_repository(artifact_uri, tracking_uri=self._client.tracking_uri)
        if op["op"] == "artifact":
            self._repo.log_artifact(str(path), op["artifact_path"])
        else:
            self._repo.log_artifacts(str(path), op["artifact_path"])
        if op.get("cleanup"):  # staged copy: <stage root>/<unique dir>/<name>
            shutil.rmtree(path.parent, ignore_errors=True)


def _open_run(client: MlflowClient, experiment: str, run_name: str, tags: dict[str, str],
              resume_run_id: str | None) -> Run:
    if resume_run_id:
        return _get_run(client, resume_run_id)
    # A child (cv fold, trial) is never the run `mlflow run` created: that one is its parent.
    attach = None if PARENT_TAG in tags else os.environ.get("MLFLOW_RUN_ID")
    if attach:  # inside `mlflow run`: the run exists, named by --run-name; never create a second one
        try:
            return client.get_run(attach)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ConfigError(f"MLFLOW_RUN_ID={attach} names no run at {tracking_uri()}; unset it or "
                                  "launch through `mlflow run`") from None
            raise
    exp_id = _experiment_id(client, experiment)
    return client.create_run(exp_id, run_name=run_name)  # tags follow in one place for every path


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if env_id:
        try:
            return client.get_experiment(env_id).experiment_id
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ConfigError(f"MLFLOW_EXPERIMENT_ID={env_id} does not exist at {tracking_uri()}; "
                                  "unset it or use MLFLOW_EXPERIMENT_NAME") from None
            raise
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException as exc:  # a parallel worker created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore "
                          f"--experiment-id {exp.experiment_id}) or choose another tracking.experiment_name")
    return exp.experiment_id


def _get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise CheckpointError(f"MLflow run {run_id} not found at {tracking_uri()}; check the run id "
                                  "(or MLFLOW_TRACKING_URI)") from None
        raise


def _log_tags_now(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    for key in tags:
        check_key(key, "tag", MAX_ENTITY_KEY_LENGTH)
    clean = {k: str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}
    for chunk in chunks(clean, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk.items()], synchronous=True)


def _fast_fail_http_defaults() -> None:
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)  # a value the user set wins


def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, RemoteSendError):  # judged in the sender process, where the exception's type is known
        return exc.permanent
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return True
    return isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_CODES
