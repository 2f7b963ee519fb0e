"""Live curves in the tools people already use: TensorBoard or Weights & Biases (`ccl train --logger NAME`).

One small object, made from the config by `make_logger`, that the loop calls in three places: `log_epoch(record)`
with each epoch's metrics.jsonl record (every numeric value under its own name, at step = the record's epoch),
`log_step(step, values)` with the loss parts the loop reads every `--log-every` steps (the epoch's running means,
as the progress bar shows them, and the lr; step = optimiser steps since the run began, under `step/`), and
`close()`. The config goes in once, as hyperparameters. Only rank 0 logs; every other rank gets the `NullLogger`.

Neither package is needed to install ccl: `pip install 'ccl[tensorboard]'` or `'ccl[wandb]'`. Weights & Biases
runs offline (files in RUN/wandb, `wandb sync` uploads them) unless WANDB_MODE or wandb's own settings files
(`wandb offline`, `wandb disabled`, or `mode = online` under `[default]`) name a mode.
"""

from __future__ import annotations

import configparser
import json
import math
import os
import uuid
from pathlib import Path

from ccl import files
from ccl.errors import UserError

LOGGERS = ("none", "tensorboard", "wandb")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def require(name: str) -> None:
    """A one-line error, before any training, when the logger's package is not installed."""
    if name not in LOGGERS:
        raise UserError(f"unknown logger {name!r}; expected {', '.join(LOGGERS)}")
    if name == "none":
        return
    try:
        if name == "tensorboard":
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        else:
            import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"--logger {name} needs the {_PACKAGE[name]} package: pip install 'ccl[{name}]' "
                        f"(or pip install -e '.[{name}]' in the checkout)") from None


def numeric(record: dict) -> dict[str, float]:
    """The values of a record a curve can show: numbers (booleans as 0/1), finite; None, NaN and text left out."""
    out = {}
    for k, v in record.items():
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    """The config as one level of `section.key` hyperparameters (None as "none", containers as JSON text)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out |= flat_config(v, f"{prefix}{k}.")
        elif v is None:
            out[prefix + k] = "none"
        elif isinstance(v, (bool, int, float, str)):
            out[prefix + k] = v
        else:
            out[prefix + k] = json.dumps(v)
    return out


class NullLogger:
    """No logger (`--logger none`, and every rank but 0)."""

    def log_epoch(self, record: dict) -> None:
        pass

    def log_step(self, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    """Event files in RUN/tensorboard (`tensorboard --logdir runs`)."""

    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        hp = flat_config(config)
        # The HParams dashboard wants the hyperparameters in the run's own directory (add_hparams would open a
        # sub-run); the metrics it shows are the epoch curves of the same names.
        for summary in hparams(hp, {"ens_top1": 0.0, "train_loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log_epoch(self, record: dict) -> None:
        epoch = int(record["epoch"])
        for k, v in numeric(record).items():
            if k != "epoch":
                self.writer.add_scalar(k, v, epoch)
        self.writer.flush()  # an epoch's curves are visible as soon as its line is in metrics.jsonl

    def log_step(self, step: int, values: dict) -> None:
        for k, v in numeric(values).items():
            self.writer.add_scalar(f"step/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str | None:
    """None (wandb decides) when WANDB_MODE or a wandb settings file names a mode; otherwise "offline"."""
    if os.environ.get("WANDB_MODE"):
        return None
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    for path in (config_dir / "settings", Path(os.environ.get("WANDB_DIR") or ".") / "wandb" / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except (OSError, configparser.Error):
            continue
        if parser.has_option("default", "mode"):
            return None
    return "offline"


class WandbLogger(NullLogger):
    """A wandb run in RUN/wandb, named after the run directory; a resumed run continues the same wandb run."""

    def __init__(self, run_dir: Path, config: dict):
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / "wandb-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ccl"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config, mode=wandb_mode())
        files.write_atomic(id_file, run_id + "\n")
        # Two x-axes in one run: the epoch for the epoch records, the optimiser step for the step values.
        self.run.define_metric("epoch")
        self.run.define_metric("step/step")
        self.run.define_metric("step/*", step_metric="step/step")
        self.run.define_metric("*", step_metric="epoch")

    def log_epoch(self, record: dict) -> None:
        self.run.log(numeric(record))

    def log_step(self, step: int, values: dict) -> None:
        self.run.log({"step/step": step} | {f"step/{k}": v for k, v in numeric(values).items()})

    def close(self) -> None:
        self.run.finish()


def make_logger(name: str, run_dir: Path, config: dict, *, main: bool) -> NullLogger:
    """The logger `name` on the main process, a `NullLogger` elsewhere. Every rank checks the package first, so a
    missing one stops them all with the same one-line error."""
    require(name)
    if not main or name == "none":
        return NullLogger()
    return (TensorBoardLogger if name == "tensorboard" else WandbLogger)(run_dir, config)


def global_step(passes, batches: int, epoch: int, steps: int) -> int:
    """Optimiser steps since the run began: `steps` into `epoch`, after every earlier epoch's passes x batches.
    `passes(e)` is the method's pass count of epoch e (twin schedules and warm-up change it)."""
    return sum(passes(e) for e in range(epoch)) * batches + steps
