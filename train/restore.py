"""A finished (or interrupted) run rebuilt from its files: the config a `--resume` continues, the networks of a
checkpoint (`restore`, for evaluation and analysis) and `ccl eval` (`evaluate_checkpoint`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ccl import files
from ccl.errors import UserError
from ccl.pipeline.shards import ShardSet
from ccl.train import checkpoint as ckpt
from ccl.train import dist, rundir
from ccl.train.config import TrainConfig
from ccl.train.loop import Run, evaluate, precision, resolve_data, setup, split_loader


def saved_config(cfg: TrainConfig) -> dict:
    """The config a `--resume` continues: that of the run which `cfg` names (its config.json; read by rank 0)."""
    dist.init(cfg.dist_backend, cfg.device)
    return dist.rank0_call(_saved_config, cfg)


def _saved_config(cfg: TrainConfig) -> dict:
    data_dir = resolve_data(cfg)
    dataset = ShardSet.open(data_dir).manifest["dataset"]
    run_dir = rundir.find(cfg, dataset)
    if run_dir is None:
        raise UserError(f"nothing to resume: no checkpoint under {Path(cfg.out) / rundir.default_base(cfg, dataset)}")
    path = run_dir / "config.json"
    record = files.read_json(path, "run config")  # missing, unreadable or not JSON: one line saying which
    try:
        return record["config"]
    except (KeyError, TypeError):
        raise UserError(f"cannot read {path}: the run to resume has no readable config") from None


def restore(checkpoint: Path, data: Path | None = None, device: str = "auto") -> tuple[Run, dict]:
    """Rebuild a finished (or interrupted) run from one of its checkpoints, for evaluation and analysis.

    Returns the `Run` (its method holds the checkpoint's networks and per-sample state, in eval mode) and the
    checkpoint dict. ``data`` overrides the shard directory the run trained on.
    """
    state = ckpt.load(Path(checkpoint))
    cfg = TrainConfig.from_dict(state["config"])
    cfg = replace(cfg, device=device, data=str(data) if data else cfg.data)
    run = setup(cfg, resolve_data(cfg))
    # Evaluation needs the same networks, not the same training set or schedule.
    ckpt.check_identity(state["identity"], run.identity, Path(checkpoint), ("method", "arch", "num_classes"))
    path = Path(checkpoint)
    if state["identity"].get("num_train") == run.identity["num_train"]:
        ckpt.load_method_state(run.method, state["method"], path)
    else:  # evaluated on other data: the networks, without the training set's per-sample state
        ckpt.load_method_state(run.method, {k: v for k, v in state["method"].items() if k.startswith("nets.")}, path,
                               strict=False)
    run.method.eval()
    return run, state


def evaluate_checkpoint(checkpoint: Path, data: Path | None, split: str = "test", device: str = "auto") -> dict:
    """`ccl eval`: rebuild the run from the checkpoint's config and evaluate it on a split."""
    run, state = restore(checkpoint, data, device)
    if split not in run.shards.manifest["splits"]:
        raise UserError(f"split {split!r} not in {run.shards.root}; it has {', '.join(run.shards.manifest['splits'])}")
    ctx, _ = precision(run.device, run.cfg.amp)
    result = evaluate(run, split_loader(run, split, train=False), ctx)
    return {"checkpoint": str(checkpoint), "epoch": state["epoch"] + 1, "split": split, **result}
