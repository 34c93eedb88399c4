"""The optional Weights & Biases sink of `RunLogger` (`logging.wandb` in a config; extra `kdlab[wandb]`).

It gets exactly the scalars and images TensorBoard gets, under the same names, plus the resolved config.
TensorBoard steps differ per tag family (train/ by optimizer step, val/ and epoch/ by epoch), while a W&B
run has one `_step`; so each prefix gets its own step metric (`train/*` is plotted against `train_step`,
`val/*` against `val_step`, ...) via `define_metric`, and logging never passes `step=` (which W&B requires
to increase). The W&B run id is kept in logs/wandb_run_id.txt, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.config.schema import WandbConfig
from kdlab.errors import KdlabInputError, KdlabRunFailure

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install kdlab[wandb]"
RUN_ID_FILE = "wandb_run_id.txt"


def import_wandb() -> Any:
    """The wandb module, or one KdlabInputError line naming the extra to install."""
    try:
        import wandb
    except ImportError:
        raise KdlabInputError(
            f"logging.wandb is set but the wandb package is not installed: {INSTALL_HINT} "
            "(or set logging.wandb=null)"
        ) from None
    return wandb


def step_metric(prefix: str) -> str:
    """The W&B step metric of one tag family: 'train/' -> 'train_step', '' -> 'step'."""
    family = prefix.strip("/").replace("/", "_")
    return f"{family}_step" if family else "step"


class WandbSink:
    """One W&B run beside a run directory's TensorBoard events."""

    def __init__(
        self, cfg: WandbConfig, logs_dir: Path, run_name: str, config: dict[str, Any] | None
    ) -> None:
        wandb = import_wandb()
        self._wandb = wandb
        id_file = logs_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        # WANDB_DIR when set, else the run's logs/ (the run's files live with its other logs). Passed on every
        # init: wandb reads the environment only once per process.
        wandb_dir = os.environ.get("WANDB_DIR") or str(logs_dir)
        try:
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, mode=cfg.mode, name=run_name, id=run_id,
                resume="allow", config=config or {}, dir=wandb_dir,
            )  # fmt: skip
        except Exception as exc:  # no network in online mode, bad credentials, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KdlabRunFailure(
                f"W&B run could not start (logging.wandb.mode={cfg.mode}): {reason}; "
                "use logging.wandb.mode=offline and `wandb sync` later"
            ) from exc
        id_file.write_text(run_id + "\n")
        self._defined: set[str] = set()

    def _define(self, prefix: str) -> str:
        metric = step_metric(prefix)
        if prefix not in self._defined:
            self.run.define_metric(metric, hidden=True)
            self.run.define_metric(f"{prefix}*", step_metric=metric)
            self._defined.add(prefix)
        return metric

    def _log(self, data: dict[str, Any]) -> None:
        try:
            self.run.log(data)
        except Exception as exc:  # logging must never end a training run
            log.warning("W&B logging failed (%s); TensorBoard and metrics.csv still have it", exc)

    def scalars(self, values: dict[str, float], step: int, prefix: str) -> None:
        if values:
            self._log({self._define(prefix): step, **{f"{prefix}{k}": v for k, v in values.items()}})

    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        prefix = tag.rsplit("/", 1)[0] + "/" if "/" in tag else ""
        self._log({self._define(prefix): step, tag: self._wandb.Image(image_hwc)})

    def close(self) -> None:
        try:
            self.run.finish()
        except Exception as exc:  # pragma: no cover - closing must not hide the run's own outcome
            log.warning("W&B run did not finish cleanly: %s", exc)
