"""One frozen config tree for a training run: the common options, and one typed section per method.

Filled by the CLI (common flags, `--set SECTION.KEY=VALUE`, `--recipe`), or from a JSON config file of the same
shape (`{"epochs": 50, "ccl": {"tau": 0.3}}`). Unknown keys and values of the wrong type are the user's error,
named in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ccl.errors import UserError
from ccl.train.losses import Ablation

SCHEDULES = ("alternate", "joint")
OPTIMIZERS = ("adam", "sgd")
CONFIDENCE = ("full", "inline")
CONFIDENCE_VIEWS = ("strong", "weak")


@dataclass(frozen=True)
class CCLConfig:
    """CCL (Fan and Li, AAAI 2025). Eq. 15 is w CE + (1 - w)/2 (cvl_weight L_CVL + cml_weight L_CML) +
    div_weight L_div; the paper's weights are all 1.

    CCL has no public code. Where the paper leaves a choice open, each reading is an option; the comment on each
    names the paper's sentence and the alternatives. The defaults are the readings the validation sweep chose
    (README, "Does CCL beat RoLR here?")."""

    tau: float = 0.5  # contrastive temperature of ACL, VM, CCLRL and MM (not given; Fig. 6a sweeps 0.05-0.9)
    threshold: float = 0.95  # c of Eq. 7 (PG); the appendix's default
    # T of Algorithm 1 ("we set c = 0.95, T = 0.5 as the default value"), which no CCL equation shows. When set, it
    # sharpens the cross-model CE's target (Eq. 13's p^w_{1-m}, or Eq. 1's mean with cml_target="mean"); none: off.
    sharpen_t: float | None = None
    # The target of Eq. 13's CE. "peer": p^w_{1-m} as Eq. 13 writes it; "mean": Eq. 1's (p^w_m + p^w_{1-m})/2,
    # after "Combining with the model alignment with logits in Eq. (1)" (the sentence that introduces Eq. 13).
    cml_target: str = "peer"
    # y_pred of PG (Eqs. 3, 7). "own_weak": argmax and confidence of the net's own weak view (FixMatch's way);
    # "own_strong": of its strong view, as Eq. 3 writes y_pred = max_i p^s_i (detached); "peer_weak": of the peer's.
    pg_prediction: str = "own_weak"
    cvl_weight: float = 1.0  # L_CVL = PG + ACL + VM (Eq. 8)
    cml_weight: float = 1.0  # L_CML = CE(p^s_m, p^w_1-m) + CCLRL + MM (Eq. 13)
    div_weight: float = 1.0  # L_div (Eq. 14)
    contrastive_weight: float = 1.0  # scales the four contrastive terms ACL, VM, CCLRL and MM (1 in Eq. 15)
    # The view whose peer CE feeds the GMM: Eq. 16 writes p^s; "weak" is RoLR's code (the train-transform view in
    # eval mode, RoLR.py l.186-198), which the paper says it follows.
    confidence_view: str = "strong"
    # When w is estimated. "epoch": once after each epoch, before either net trains; "net": Algorithm 1 l.7, before
    # each net trains (under the alternate schedule, a second estimate between net 0's pass and net 1's).
    confidence_every: str = "epoch"
    ablations: Ablation = field(default_factory=Ablation)  # Table 7
    CML_TARGETS = ("peer", "mean")  # class constants, not options
    PG_PREDICTIONS = ("own_weak", "own_strong", "peer_weak")
    CONFIDENCE_EVERY = ("epoch", "net")

    def validate(self) -> None:
        _check(math.isfinite(self.tau) and self.tau > 0, "ccl.tau must be a positive finite number")
        _check(0 <= self.threshold <= 1, "ccl.threshold must lie in [0, 1]")
        _check(self.sharpen_t is None or (math.isfinite(self.sharpen_t) and self.sharpen_t > 0),
               "ccl.sharpen_t must be a positive finite number (or none)")
        for key in ("cvl_weight", "cml_weight", "div_weight", "contrastive_weight"):
            v = getattr(self, key)
            _check(math.isfinite(v) and v >= 0, f"ccl.{key} must be a finite number >= 0, got {v}")
        _check(self.cml_target in self.CML_TARGETS, f"ccl.cml_target must be {' or '.join(self.CML_TARGETS)}")
        _check(self.pg_prediction in self.PG_PREDICTIONS,
               f"ccl.pg_prediction must be one of {', '.join(self.PG_PREDICTIONS)}")
        _check(self.confidence_view in CONFIDENCE_VIEWS, f"ccl.confidence_view must be {' or '.join(CONFIDENCE_VIEWS)}")
        _check(self.confidence_every in self.CONFIDENCE_EVERY,
               f"ccl.confidence_every must be {' or '.join(self.CONFIDENCE_EVERY)}")


@dataclass(frozen=True)
class RoLRConfig:
    """RoLR (Chen et al., AAAI 2023) as its code runs it (chenmc1996/Robust-LR `RoLR.py`, the README's command);
    `variant="paper"` sharpens as the CCL paper's Eq. 1 writes it. The loss is RoLR.py l.130-138:
    CE(p^s, w y^ + (1 - w) target) + lambda_p KL(uniform || batch-mean p^s)."""

    variant: str = "code"  # "code": target = mean(p^w_m, p^w_peer)^T, normalised (RoLR.py l.125); "paper": ^(1/T)
    sharpen_t: float | None = None  # T; none = the variant's: 1 for code (README: --T 1, no sharpening), 0.5 paper
    lambda_p: float = 2.0  # weight of the prior penalty (README: --lambda_p 2; RoLR.py's own default is 1)
    confidence_view: str = "weak"  # the GMM's per-sample CE: train-transform view in eval mode (RoLR.py l.186-198)
    loss_history: int = 1  # GMM on the mean of the last k epochs' normalised losses (RoLR.py l.203-205: 5 at r=0.9)
    passes_per_net: int = 2  # passes over the data per net per epoch (RoLR.py l.86-100: each train() reads it twice)
    # the warm-up's batch, each net in its own pass (dataloader_cifar.py l.176: 64); none = the run's batch size
    warmup_batch_size: int | None = None
    VARIANTS = ("code", "paper")  # a class constant, not an option

    def temperature(self) -> float:
        """T with the variant's default filled in."""
        if self.sharpen_t is not None:
            return self.sharpen_t
        return 1.0 if self.variant == "code" else 0.5

    def validate(self) -> None:
        _check(self.variant in self.VARIANTS, f"rolr.variant must be {' or '.join(self.VARIANTS)}")
        _check(self.sharpen_t is None or self.sharpen_t > 0, "rolr.sharpen_t must be positive (or none)")
        _check(self.lambda_p >= 0, "rolr.lambda_p must be >= 0")
        _check(self.confidence_view in CONFIDENCE_VIEWS, f"rolr.confidence_view must be {' or '.join(CONFIDENCE_VIEWS)}")
        _check(self.loss_history >= 1, "rolr.loss_history must be at least 1")
        _check(self.passes_per_net >= 1, "rolr.passes_per_net must be at least 1")
        _check(self.warmup_batch_size is None or self.warmup_batch_size >= 2,
               "rolr.warmup_batch_size must be at least 2 (or none)")


@dataclass(frozen=True)
class TCLConfig:
    """TCL (Huang et al., CVPR 2023) as Hzzone/TCL runs it (models/tcl/tcl.py l.80-84):
    L = ctr_weight L_ctr + cls_weight (L_cross + L_mix) + ent_weight ent + ne_weight ne + align_weight L_align."""

    temp: float = 0.25  # temperature of InfoNCE and of the cluster posterior (the configs' `temp`)
    mixup_alpha: float = 1.0  # Beta(alpha, alpha) (the configs' `mixup_alpha`)
    ctr_weight: float = 1.0  # InfoNCE (unweighted in the code)
    cls_weight: float = 1.0  # --cls_loss_weight: cross-supervision + the mixed batch's classifier CE
    ent_weight: float = 1.0  # --ent_loss_weight: mean entropy of each prediction
    ne_weight: float = 1.0  # --ne_loss_weight: negative entropy of the batch-mean prediction
    align_weight: float = 1.0  # --align_loss_weight: the mixed batch's cluster posterior against its targets
    scale1: float | None = None  # multiplies w in the cross-supervision targets; none = the estimated clean fraction
    scale2: float | None = None  # the same for the mixup targets; 1 and 1 give the paper's targets
    sep_gmm: bool = False  # one GMM per noisy class (--sep_gmm; the CIFAR-100 90% config sets it)
    warmup_loss: str = "full"  # "full": the whole loss with w = 1, as the code warms up; "ce": plain CE, weak view
    proj_dim: int = 256  # projector output (the configs' feat_dim)
    dropout: float = 0.25  # in the classifier head (tcl_wrapper.py l.32)
    WARMUP_LOSSES = ("full", "ce")  # a class constant, not an option

    def validate(self) -> None:
        _check(self.temp > 0, "tcl.temp must be positive")
        _check(self.mixup_alpha > 0, "tcl.mixup_alpha must be positive")
        for key in ("scale1", "scale2"):
            v = getattr(self, key)
            _check(v is None or 0 <= v <= 1, f"tcl.{key} must lie in [0, 1] (or none)")
        _check(self.warmup_loss in self.WARMUP_LOSSES, f"tcl.warmup_loss must be {' or '.join(self.WARMUP_LOSSES)}")
        _check(self.proj_dim >= 1, "tcl.proj_dim must be at least 1")
        _check(0 <= self.dropout < 1, "tcl.dropout must lie in [0, 1)")


@dataclass(frozen=True)
class DivideMixConfig:
    """DivideMix (Li, Socher and Hoi, ICLR 2020) as LiJunnan1992/DivideMix's Train_CIFAR.py runs it (its argparse
    defaults, l.20-23): L = Lx + ramp(lambda_u) Lu + prior_weight L_prior. `plus` adds CCL's L_CVL and/or L_CML
    (the CCL paper's Table 5), with the `ccl` section's tau, threshold, weights and ablations."""

    p_threshold: float = 0.5  # a sample is labelled when its clean probability (peer's GMM) exceeds this
    sharpen_t: float = 0.5  # T of co-refinement and co-guessing: p^(1/T), normalised
    alpha: float = 4.0  # mixup lambda ~ Beta(alpha, alpha), then max(lambda, 1 - lambda)
    lambda_u: float = 25.0  # weight of Lu once ramped up (per setting: the recipes)
    rampup: int = 16  # epochs of Lu's linear ramp after warm-up
    prior_weight: float = 1.0  # the uniform-prior penalty (1 in the code)
    warmup_penalty: bool = False  # negative-entropy penalty in warm-up (the code adds it on asymmetric noise)
    loss_history: int = 1  # GMM on the mean of the last k refreshes' normalised losses (Train_CIFAR.py l.178-181: 5 at r=0.9)
    plus: str = ""  # CCL's terms to add: "", "cvl", "cml" or "cvl,cml"
    plus_on: str = "labelled"  # the samples they apply to: "labelled" (the division's labelled part) or "all"
    PLUS = ("cvl", "cml")  # a class constant, not an option
    PLUS_ON = ("labelled", "all")

    def plus_terms(self) -> frozenset[str]:
        return frozenset(t.strip().lower() for t in self.plus.split(",") if t.strip())

    def validate(self) -> None:
        _check(0 <= self.p_threshold < 1, "dividemix.p_threshold must lie in [0, 1)")
        _check(self.sharpen_t > 0, "dividemix.sharpen_t must be positive")
        _check(self.alpha > 0, "dividemix.alpha must be positive")
        _check(self.lambda_u >= 0 and self.prior_weight >= 0, "dividemix.lambda_u and prior_weight must be >= 0")
        _check(self.rampup >= 0, "dividemix.rampup must be >= 0")
        _check(self.loss_history >= 1, "dividemix.loss_history must be at least 1")
        unknown = sorted(self.plus_terms() - set(self.PLUS))
        _check(not unknown, f"dividemix.plus takes cvl, cml or cvl,cml; unknown: {', '.join(unknown)}")
        _check(self.plus_on in self.PLUS_ON, f"dividemix.plus_on must be {' or '.join(self.PLUS_ON)}")


@dataclass(frozen=True)
class TrainConfig:
    # data
    data: str | None = None  # shard directory; None = the built-in digits set
    noise: str = "sym"  # for the built-in digits set only
    noise_rate: float = 0.4  # for the built-in digits set only
    num_classes: int | None = None  # checked against the manifest when given
    backend: str = "torch"
    workers: int = 2
    strict: bool = False  # corrupt images are errors instead of skipped
    # model
    method: str = "ccl"
    arch: str = "auto"
    compile: bool = False
    # optimisation
    epochs: int = 30
    warmup: int | None = None  # None = the method's default
    batch_size: int = 128
    optimizer: str = "adam"  # the CCL paper's; "sgd" is RoLR's, DivideMix's and TCL's (their recipes)
    lr: float = 1e-3  # the CCL paper's (Adam)
    momentum: float = 0.9  # SGD's; Adam keeps its betas (0.9, 0.999), the paper's "Adam (momentum=0.9)"
    weight_decay: float = 0.0  # coupled L2, as torch's Adam and SGD apply it
    # The lr, set per epoch (`ccl.train.loop.lr_at`): a linear ramp over the first lr_ramp epochs, then constant
    # or cosine from lr down to lr_floor x lr; times lr_decay from epoch lr_decay_epoch on.
    cosine: bool = False
    lr_ramp: int = 0  # TCL's code ramps the lr up over its warm-up epochs
    lr_floor: float = 0.0  # the cosine's end, a fraction of lr (TCL's learning_eta_min)
    lr_decay_epoch: int | None = None  # RoLR's and DivideMix's step: lr / 10 from an epoch on
    lr_decay: float = 0.1
    amp: bool = True  # bf16 autocast on CPU, fp16 + GradScaler on CUDA
    device: str = "auto"
    seed: int = 0
    # twin methods
    schedule: str = "joint"  # measured: as accurate as the paper's alternate on digits, 1.5x faster epochs
    confidence: str = "full"
    kernel: str = "auto"
    # data parallel under torchrun (ccl.train.dist); batch_size is per process
    dist_backend: str = "auto"  # nccl on CUDA, gloo on CPU
    sync_bn: bool = False  # BatchNorm statistics over the global batch (CUDA only)
    gather_negatives: bool = False  # contrastive negatives from every rank's batch (the global batch)
    # per-method sections
    ccl: CCLConfig = field(default_factory=CCLConfig)
    rolr: RoLRConfig = field(default_factory=RoLRConfig)
    tcl: TCLConfig = field(default_factory=TCLConfig)
    dividemix: DivideMixConfig = field(default_factory=DivideMixConfig)
    val_fraction: float = 0.0  # held out of the (noisy) training set to choose best.pt on; 0: no best.pt
    # Stop once the held-out accuracy (val_ens_top1) has not improved for this many epochs (needs val_fraction,
    # counts from the end of warm-up); 0: train all the epochs.
    patience: int = 0
    # run
    recipe: str | None = None  # the recipe the values came from (`ccl recipes`), checked against the data
    out: str = "runs"
    name: str | None = None
    eval_every: int = 1
    track_every: int = 0  # epochs between the contamination measures on a test subset (ccl analyze's); 0: off
    track_samples: int = 512
    log_every: int = 50  # steps between host reads of the logged losses (and the non-finite check)
    logger: str = "none"  # live curves: none, tensorboard or wandb (ccl.train.tracking; rank 0 only)

    def validate(self) -> "TrainConfig":
        from ccl.pipeline.loader import BACKENDS
        from ccl.train.losses.contrastive import IMPLS
        from ccl.train.methods import METHODS

        _check(self.method in METHODS, f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        _check(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; expected {' or '.join(SCHEDULES)}")
        _check(self.confidence in CONFIDENCE, f"unknown confidence {self.confidence!r}; expected {' or '.join(CONFIDENCE)}")
        _check(self.backend in BACKENDS, f"unknown backend {self.backend!r}; expected {' or '.join(BACKENDS)}")
        _check(self.kernel in IMPLS, f"unknown kernel {self.kernel!r}; expected one of {', '.join(IMPLS)}")
        _check(self.dist_backend in ("auto", "nccl", "gloo"),
               f"unknown dist backend {self.dist_backend!r}; expected auto, nccl or gloo")
        _check(self.epochs >= 1, "epochs must be at least 1")
        _check(self.warmup is None or 0 <= self.warmup, "warmup must be >= 0")
        _check(self.batch_size >= 2, "batch size must be at least 2")
        _check(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive finite number, got {self.lr}")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight decay must be >= 0")
        _check(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; expected {' or '.join(OPTIMIZERS)}")
        _check(0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}")
        _check(self.lr_ramp >= 0, "lr ramp must be >= 0 epochs")
        _check(0 <= self.lr_floor <= 1, f"lr floor must lie in [0, 1], got {self.lr_floor}")
        _check(self.lr_decay_epoch is None or self.lr_decay_epoch >= 0, "lr decay epoch must be >= 0")
        _check(math.isfinite(self.lr_decay) and self.lr_decay > 0, f"lr decay must be positive, got {self.lr_decay}")
        _check(0 <= self.noise_rate < 1, f"noise rate must lie in [0, 1), got {self.noise_rate}")
        _check(self.workers >= 0, "workers must be >= 0")
        _check(0 <= self.val_fraction <= 0.5, f"val fraction must lie in [0, 0.5], got {self.val_fraction}")
        _check(self.eval_every >= 1 and self.log_every >= 1, "eval_every and log_every must be at least 1")
        from ccl.train.tracking import require

        require(self.logger)  # a known name, its package installed
        _check(self.track_every >= 0 and self.track_samples >= 2, "track_every must be >= 0, track_samples >= 2")
        _check(self.patience >= 0, "patience must be >= 0")
        _check(self.patience == 0 or self.val_fraction > 0,
               "patience stops on the held-out accuracy: set --val-fraction too (e.g. 0.1)")
        _check(0 <= self.seed < 2**32, f"seed must lie in [0, 2^32), got {self.seed}")
        from ccl.train.rundir import check_name

        check_name(self.name)
        for key, v in _floats(self):  # inf passes every range check written as a comparison
            _check(math.isfinite(v), f"{key} must be a finite number, got {v}")
        for section in SECTIONS:
            getattr(self, section).validate()
        if self.method == "ccl" and self.ccl.confidence_every == "net":
            _check(self.schedule == "alternate" and self.confidence == "full",
                   "ccl.confidence_every=net re-estimates w between the nets' passes: it needs --schedule alternate "
                   "and --confidence full")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from plain values (a JSON file, config.json): every key known, every value of its type."""
        return _build(cls, d, "")


# The per-method sections of TrainConfig: `--set SECTION.KEY=VALUE` and the JSON file's nested objects.
SECTIONS = {"ccl": CCLConfig, "rolr": RoLRConfig, "tcl": TCLConfig, "dividemix": DivideMixConfig}


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


def _floats(obj, prefix: str = ""):
    """(key, value) of every float option of a config and its sections (`ccl.tau`, `lr`, ...)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _floats(v, f"{prefix}{f.name}.")
        elif isinstance(v, float):
            yield prefix + f.name, v


def _build(cls, d, prefix: str):
    if not isinstance(d, dict):
        raise UserError(f"config {prefix.rstrip('.') or 'file'} must be an object of options, got {d!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown config key{'s' if len(unknown) > 1 else ''}: "
                        f"{', '.join(prefix + k for k in unknown)} (see `ccl train --help`)")
    return cls(**{k: _value(hints[k], v, prefix + k) for k, v in d.items()})


def _value(tp, v, key: str):
    """v as type tp, or a one-line error naming the key. Strings are parsed (they come from `--set`)."""
    if tp is Ablation:
        if isinstance(v, Ablation):
            return v
        if isinstance(v, dict):  # config.json's form: {"no_cml": true, ...}
            return _build(Ablation, v, key + ".")
        if isinstance(v, str):  # --set ccl.ablations=mimicry,cml
            return parse_ablations(v)
        raise UserError(f"{key} must be a list of ablations such as mimicry,cml; got {v!r}")
    if dataclasses.is_dataclass(tp):
        return v if isinstance(v, tp) else _build(tp, v, key + ".")
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null")):
            return None
        (tp,) = [a for a in args if a is not type(None)]
    if tp is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return v.lower() in ("true", "1", "yes", "on")
        raise UserError(f"{key} must be true or false, got {v!r}")
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
            return int(v)
        raise UserError(f"{key} must be a whole number, got {v!r}")
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
        raise UserError(f"{key} must be a number, got {v!r}")
    if tp is str:
        if isinstance(v, str):
            return v
        raise UserError(f"{key} must be a string, got {v!r}")
    raise TypeError(f"config field {key} has a type the parser does not know: {tp}")


def parse_ablations(text: str) -> Ablation:
    """`mimicry,cml` (or `no_mimicry,no_cml`) -> Ablation; empty -> none."""
    names = [n.strip().replace("-", "_") for n in text.split(",") if n.strip()]
    return Ablation.from_names(n if n.startswith("no_") else f"no_{n}" for n in names)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Merge `SECTION.KEY=VALUE` (or `KEY=VALUE`) strings into a nested dict of config values."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set takes KEY=VALUE or SECTION.KEY=VALUE, got {item!r}")
        section, dot, name = key.partition(".")
        if not dot:
            out[key] = value
        elif section in SECTIONS and "." not in name:
            out.setdefault(section, {})
            if not isinstance(out[section], dict):
                out[section] = dataclasses.asdict(out[section])
            out[section][name] = value
        else:
            raise UserError(f"unknown config section in {key!r}; sections are {', '.join(SECTIONS)}")
    return out


def load_config_file(path: str | Path) -> dict:
    """A JSON file of TrainConfig fields (sections as nested objects); the CLI's explicit options override it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {p} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"config file {p} must hold a JSON object of options")
    return d
