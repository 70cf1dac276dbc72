"""Experiment tracking: where the trainer's metrics go (``training.report_to``).

``report_to`` lists the trackers a run logs to, each through its own library's client:

- ``tensorboard`` (the default): torch's ``SummaryWriter`` under ``<run_dir>/tensorboard/``, the
  same scalar tags (``train/<metric>``, ``eval/<metric>``) at the same steps as the trainer always
  wrote, plus the run's config and fingerprint as two text entries (``run/config``,
  ``run/fingerprint``) written once, when the log directory is new;
- ``wandb``: ``wandb.init`` with the run's id kept in ``<run_dir>/wandb/pyalign-run.json``, the
  config and fingerprint as the run's config; ``WANDB_MODE=offline`` writes the run to files
  only (upload later with ``wandb sync``); files go under ``<run_dir>/wandb/`` unless
  ``WANDB_DIR`` says otherwise; project ``pyalign`` unless ``WANDB_PROJECT`` is set;
- ``mlflow``: ``MlflowClient`` on ``MLFLOW_TRACKING_URI`` or, when that is unset, a SQLite store
  ``<run_dir>/mlflow/mlflow.db`` (artifacts beside it); experiment ``pyalign`` unless
  ``MLFLOW_EXPERIMENT_NAME`` is set; the config and fingerprint as flattened params and as the
  JSON artifacts ``pyalign/config.json`` and ``pyalign/fingerprint.json``; the run's id kept in
  ``<run_dir>/mlflow/pyalign-run.json``.

Only process 0 logs (the trainer opens no tracker elsewhere), but every process checks that the
clients named are installed, so a missing one stops every process with the same message.

**Resuming.** A killed run resumes from its last checkpoint, and the steps it logged after that
checkpoint are trained again. Each tracker ends with exactly one point per step:

- tensorboard: ``purge_step`` = first step trained again; TensorBoard drops every older event at
  or after it, so the new values replace the killed run's;
- wandb: the same run id is resumed (``resume="allow"``). wandb's steps only go forward (a point
  at a step the run already holds is dropped), so the tracker sends each step once: a step's row
  (its train and eval points together) is sent when the next step's first point arrives, or when
  the run ends normally, and the last step sent is kept in the state file; a resumed run skips
  steps up to it. A row not sent when the run died is sent by the attempt that trains it again.
  Offline, each attempt is its own directory; their steps do not overlap, so ``wandb sync``
  (which syncs a run's directories in order of start time) rebuilds one run;
- mlflow: the same run id; its metric history is read when the run is reopened, and a (metric,
  step) point it already holds is not logged again (MLflow keeps every point logged and cannot
  delete one).

The points trained again are the same as the killed run's (data order and dropout masks are
functions of the step), except the wall time ``step_s``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import secrets
import textwrap
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pyalign.io import read_json, write_json_atomic

logger = logging.getLogger("pyalign.train")

FIELD = "training.report_to"
TRACKERS = ("tensorboard", "wandb", "mlflow")
STATE_FILE = "pyalign-run.json"
DEFAULT_EXPERIMENT = "pyalign"  # wandb project / MLflow experiment unless the environment names one
# MLflow's limits (mlflow.utils.validation): 100 params per batch, 6000 characters per param value.
MLFLOW_PARAMS_PER_BATCH = 100
MLFLOW_MAX_PARAM_LENGTH = 6000


# ----------------------------------------------------------------------------- which trackers

def _requirements(name: str) -> tuple[tuple[str, ...], str]:
    """(modules ``name`` imports, what to install) for one tracker."""
    if name == "tensorboard":
        return ("tensorboard",), "pip install tensorboard"
    if name == "wandb":
        return ("wandb",), 'pip install "pyalign[wandb]"'
    # mlflow-skinny (or mlflow) is the client; the local store under the run dir is SQLite, which
    # MLflow reaches through SQLAlchemy and migrates with alembic (mlflow-skinny ships neither).
    # A tracking server (MLFLOW_TRACKING_URI=http://...) needs neither.
    local_store = not os.environ.get("MLFLOW_TRACKING_URI")
    return (("mlflow", "sqlalchemy", "alembic") if local_store else ("mlflow",)), 'pip install "pyalign[mlflow]"'


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-imported package counts as missing
        return False


def _missing_message(name: str, missing: list[str], install: str) -> str:
    what = f"the {missing[0]} package" if len(missing) == 1 else f"the {', '.join(missing)} packages"
    return f"{FIELD}: {name} needs {what}: {install}"


def check_report_to(report_to: Iterable[str]) -> list[str]:
    """``report_to`` as a list, checked: known names, none twice, each one's client installed.
    Errors name the field (``training.report_to: ...``)."""
    if isinstance(report_to, str):  # "wandb" would otherwise read as five one-letter names
        raise ValueError(f"{FIELD}: expected a list of {', '.join(TRACKERS)}, got the string {report_to!r}")
    names = list(report_to)
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"{FIELD}: unknown tracker {name!r}; expected a list of {', '.join(TRACKERS)}")
        if names.count(name) > 1:
            raise ValueError(f"{FIELD}: {name} is listed twice")
    for name in names:
        modules, install = _requirements(name)
        missing = [module for module in modules if not _installed(module)]
        if missing:
            raise ImportError(_missing_message(name, missing, install))
    return names


def report_to_of(training) -> list[str]:
    """The trackers a training config asks for, checked (:func:`check_report_to`).

    ``training.report_to`` when the config has that field; a config without it says where logs go
    with its ``tensorboard`` bool (True: tensorboard, False: nowhere)."""
    names = getattr(training, "report_to", None)
    if names is None:
        names = ["tensorboard"] if getattr(training, "tensorboard", True) else []
    return check_report_to(names)


def _import(name: str, module: str):
    """Import a tracker's client; a failure names the field and what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        _, install = _requirements(name)
        raise ImportError(f"{_missing_message(name, [module], install)} ({error})") from error


# ----------------------------------------------------------------------------- what is attached

def plain(config: Any) -> Any:
    """A config (pydantic model, dataclass, mapping) as JSON-ready plain data."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    elif hasattr(config, "__dataclass_fields__"):
        import dataclasses  # noqa: PLC0415

        config = dataclasses.asdict(config)
    # the JSON round trip turns paths, tuples, ... into what every tracker stores
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def fingerprint_digest(fingerprint: Mapping) -> str:
    """A short hash of a run's fingerprint: equal digests, runs of the same settings."""
    text = json.dumps(plain(dict(fingerprint)), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _flatten(data: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _as_param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    # the whole value is in the JSON artifacts; a param only has to identify it
    return text if len(text) <= MLFLOW_MAX_PARAM_LENGTH else text[: MLFLOW_MAX_PARAM_LENGTH - 3] + "..."


def _read_state(file: Path) -> dict:
    return read_json(file) if file.is_file() else {}


# ----------------------------------------------------------------------------- the trackers

class Tracker:
    """One tracker of one run (process 0): ``log`` scalars of a split at a step, then ``close``.

    Opened with ``(run_dir, run_name, config, fingerprint, start_step)``: ``config`` and
    ``fingerprint`` are plain dicts attached to the run; ``start_step`` is the step the run
    starts (or resumes) from."""

    name = ""

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, config: dict, fingerprint: dict, start_step: int):
        _import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        logdir = run_dir / "tensorboard"
        new = not any(logdir.glob("events.out.tfevents.*"))  # before the writer creates its file
        # purge_step drops events a killed run logged after its last checkpoint.
        self.writer = SummaryWriter(str(logdir), purge_step=start_step + 1)
        if new:  # once per run: a resumed run's writer would add a second copy at step 0
            self.writer.add_text("run/config", _as_markdown(config), 0)
            self.writer.add_text("run/fingerprint", _as_markdown(fingerprint), 0)

    def log(self, split, step, metrics):
        for name, value in metrics.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)

    def close(self, failed=False):
        self.writer.close()


def _as_markdown(data: dict) -> str:
    # TensorBoard renders text as Markdown: indented, the JSON is shown verbatim as a code block
    return textwrap.indent(json.dumps(data, indent=2, sort_keys=True), "    ")


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, config: dict, fingerprint: dict, start_step: int):
        wandb = _import("wandb", "wandb")
        self.state_file = run_dir / "wandb" / STATE_FILE
        self.digest = fingerprint_digest(fingerprint)
        state = _read_state(self.state_file)
        if state.get("fingerprint_digest") != self.digest:
            state = {}  # other settings in a reused run dir: a run of their own, not a resume
        # the id is made here and kept in the run dir, so every attempt of the run resumes it
        self.run_id = state.get("run_id") or secrets.token_hex(8)
        self.sent_through = int(state.get("sent_through", 0))  # steps an earlier attempt sent
        self.pending: dict[int, dict[str, float]] = {}
        self._save_state()
        try:
            self.run = wandb.init(
                # None: wandb reads WANDB_PROJECT / WANDB_DIR itself (a value given here would win)
                project=None if os.environ.get("WANDB_PROJECT") else DEFAULT_EXPERIMENT,
                dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
                id=self.run_id, name=run_name, resume="allow",
                config={**config, "fingerprint": fingerprint, "fingerprint_digest": self.digest},
                # settings outside the fingerprint (log_every, ...) may change between attempts
                allow_val_change=True,
                # a run of its own even when the caller has a wandb run open (this one is finished in close)
                reinit="create_new",
            )
        except Exception as error:  # noqa: BLE001 - wandb raises many types; each means no run
            raise RuntimeError(
                f"{FIELD}: wandb could not start run {self.run_id} ({type(error).__name__}: {error}); log in "
                f"(`wandb login` or WANDB_API_KEY), or set WANDB_MODE=offline and upload later with `wandb sync`"
            ) from error

    def _save_state(self) -> None:
        write_json_atomic(self.state_file, {"run_id": self.run_id, "sent_through": self.sent_through,
                                            "fingerprint_digest": self.digest})

    def log(self, split, step, metrics):
        if step <= self.sent_through:
            return  # an earlier attempt sent this step; wandb would drop it as a step gone back
        for earlier in sorted(s for s in self.pending if s < step):
            self._send(earlier)
        self.pending.setdefault(step, {}).update({f"{split}/{name}": value for name, value in metrics.items()})

    def _send(self, step: int) -> None:
        self.run.log(self.pending.pop(step), step=step, commit=True)
        self.sent_through = step
        self._save_state()

    def close(self, failed=False):
        if failed:
            # the step the run died in may lack its eval: the attempt that trains it again sends it whole
            self.pending.clear()
        for step in sorted(self.pending):
            self._send(step)
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, config: dict, fingerprint: dict, start_step: int):
        _import("mlflow", "mlflow")
        from mlflow import MlflowClient  # noqa: PLC0415
        from mlflow.entities import Metric, Param  # noqa: PLC0415
        from mlflow.exceptions import MlflowException  # noqa: PLC0415

        self._metric = Metric
        local = (run_dir / "mlflow").resolve()
        local.mkdir(parents=True, exist_ok=True)
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.state_file = local / STATE_FILE
        state = _read_state(self.state_file)
        digest = fingerprint_digest(fingerprint)
        run = None
        # the same run when the same store holds it under the same settings (a reused run dir
        # with other settings gets a run of its own)
        if (state.get("run_id") and state.get("tracking_uri") == tracking_uri
                and state.get("fingerprint_digest") == digest):
            try:
                run = self.client.get_run(state["run_id"])
            except MlflowException as error:  # deleted from the store: start a new run
                logger.warning("%s: mlflow run %s not found in %s (%s); starting a new run",
                               FIELD, state["run_id"], tracking_uri, error)
        if run is None:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            experiment = self.client.get_experiment_by_name(experiment_name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:  # the local store keeps its artifacts beside it; a server decides for itself
                artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (local / "artifacts").as_uri()
                experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifacts)
            run = self.client.create_run(experiment_id, run_name=run_name, tags={
                "pyalign.run_dir": str(run_dir.resolve()), "pyalign.fingerprint_digest": digest})
            # params cannot change once logged, so they are logged when the run is made
            params = [Param(key, _as_param(value))
                      for key, value in _flatten({**config, "fingerprint": fingerprint})]
            for first in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
                self.client.log_batch(run.info.run_id, params=params[first : first + MLFLOW_PARAMS_PER_BATCH])
            write_json_atomic(self.state_file, {"run_id": run.info.run_id, "tracking_uri": tracking_uri,
                                                "fingerprint_digest": digest})
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        # every (metric, step) point the run holds: a resumed run does not log them again
        self.logged = {(key, point.step) for key in run.data.metrics
                       for point in self.client.get_metric_history(self.run_id, key)}
        self.client.log_dict(self.run_id, config, "pyalign/config.json")
        self.client.log_dict(self.run_id, fingerprint, "pyalign/fingerprint.json")

    def log(self, split, step, metrics):
        now_ms = int(time.time() * 1000)
        points = [self._metric(f"{split}/{name}", float(value), now_ms, step) for name, value in metrics.items()
                  if (f"{split}/{name}", step) not in self.logged]
        if points:
            self.client.log_batch(self.run_id, metrics=points)
            self.logged.update((point.key, step) for point in points)

    def close(self, failed=False):
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


BACKENDS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers(Tracker):
    """Several trackers as one (none: logs nowhere). As a context manager it closes them on
    exit, marking the run failed when the block raised."""

    name = "trackers"

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, split, step, metrics):
        if metrics:
            for tracker in self.trackers:
                tracker.log(split, step, metrics)

    def close(self, failed=False):
        errors = []
        for tracker in self.trackers:  # each one closed even when another fails to
            try:
                tracker.close(failed)
            except Exception as error:  # noqa: BLE001 - raised below, after the others are closed
                errors.append(error)
        self.trackers = []
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        try:
            self.close(failed=exc_type is not None)
        except Exception:
            if exc_type is None:
                raise
            logger.exception("%s: closing the trackers after a failure failed too", FIELD)
        return False


def open_trackers(report_to: Iterable[str], run_dir: str | Path, *, run_name: str, config: dict,
                  fingerprint: Mapping, start_step: int) -> Trackers:
    """Open the trackers ``report_to`` names (already checked) for the run in ``run_dir``,
    starting at ``start_step``; call on process 0 only."""
    run_dir = Path(run_dir)
    config, fingerprint = plain(config), plain(dict(fingerprint))
    opened: list[Tracker] = []
    try:
        for name in report_to:
            opened.append(BACKENDS[name](run_dir, run_name, config, fingerprint, start_step))
    except BaseException:
        try:  # the error that stopped the opening is the one to see
            Trackers(opened).close(failed=True)
        except Exception:
            logger.exception("%s: closing the trackers opened so far failed", FIELD)
        raise
    return Trackers(opened)
