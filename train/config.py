"""One frozen config tree for a training run: the common options, and one typed section per method.

Each option is defined once, here: a field whose `opt(...)` metadata carries its help, its choices (read from the
one home of each name list: `ccl.train.methods.METHODS`, `ccl.model.ARCHS`, ...) and its range, next to its type
and default. From the fields come `ccl train`'s options and `--help` (`ccl.train.cli`), `--set` and the `--config`
file (`from_dict`, typed by each field's annotation through pydantic), the checks of `validate` (the same for the
CLI, `--set`, a config file and the recipes), the README's option list (`options_markdown`) and the options that
`--resume` lets change (`free_on_resume`).

Filled by the CLI (common flags, `--set SECTION.KEY=VALUE`, `--recipe`), or from a JSON config file of the same
shape (`{"epochs": 50, "ccl": {"tau": 0.3}}`). Unknown keys and values of the wrong type are the user's error,
named in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ccl import files
from ccl.errors import UserError
from ccl.train.losses import Ablation

SCHEDULES = ("alternate", "joint")
OPTIMIZERS = ("adam", "sgd")
CONFIDENCE = ("full", "inline")
CONFIDENCE_VIEWS = ("strong", "weak")
ABLATIONS = tuple(f.name.removeprefix("no_") for f in dataclasses.fields(Ablation))  # Table 7's parts


def opt(default=dataclasses.MISSING, help: str = "", *, factory=None, choices=None, many: bool = False,
        ge=None, gt=None, le=None, lt=None, default_text=None, noun: str | None = None, path: bool = False,
        free: bool = False):
    """A config field with what the CLI, the checks and the README need to know about it.

    help: the option's help text; "{choices}" in it is replaced by the list of choices, which is otherwise
        appended. choices: the allowed names, a tuple or a function that returns them (to read a list from a
        module that imports this one); many: the value is a comma-separated list of them. ge, gt, le, lt: the
        range (a float must also be finite). default_text: what a None default means ("never"), or a function
        giving it. noun: what "unknown ..." calls a bad choice (default: the key). path: a file or folder (the CLI
        takes a PATH). free: `--resume` may change it without --allow-changes.
    """
    meta = {"help": help, "choices": choices, "many": many, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "default_text": default_text, "noun": noun, "path": path, "free": free}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _from(module: str, name: str, *extra: str):
    """The choices of a name list whose home imports this module: read when first needed."""

    def names() -> tuple[str, ...]:
        return (*extra, *getattr(importlib.import_module(module), name))

    return names


def _warmups() -> str:
    from ccl.train.methods import METHODS

    return "the method's (" + ", ".join(f"{n} {m.default_warmup}" for n, m in METHODS.items()) + ")"


@dataclass(frozen=True)
class CCLConfig:
    """CCL (Fan and Li, AAAI 2025). Eq. 15 is w CE + (1 - w)/2 (cvl_weight L_CVL + cml_weight L_CML) +
    div_weight L_div; the paper's weights are all 1.

    CCL has no public code. Where the paper leaves a choice open, each reading is an option; the help of each
    names the paper's sentence and the alternatives. The defaults are the readings the validation sweep chose
    (README, "Does CCL beat RoLR here?")."""

    CML_TARGETS = ("peer", "mean")  # class constants, not options
    PG_PREDICTIONS = ("own_weak", "own_strong", "peer_weak")
    CONFIDENCE_EVERY = ("epoch", "net")

    tau: float = opt(0.5, "Contrastive temperature of ACL, VM, CCLRL and MM (not given; Fig. 6a sweeps 0.05-0.9).",
                     gt=0)
    threshold: float = opt(0.95, "c of Eq. 7 (PG); the appendix's default.", ge=0, le=1)
    sharpen_t: float | None = opt(
        None, "T of Algorithm 1 (\"we set c = 0.95, T = 0.5 as the default value\"), which no CCL equation shows. "
        "When set, it sharpens the cross-model CE's target (Eq. 13's p^w_{1-m}, or Eq. 1's mean with "
        "cml_target=mean).", gt=0, default_text="off")
    cml_target: str = opt(
        "peer", "The target of Eq. 13's CE: {choices}. peer: p^w_{1-m} as Eq. 13 writes it; mean: Eq. 1's "
        "(p^w_m + p^w_{1-m})/2, after \"Combining with the model alignment with logits in Eq. (1)\" (the sentence "
        "that introduces Eq. 13).", choices=CML_TARGETS)
    pg_prediction: str = opt(
        "own_weak", "y_pred of PG (Eqs. 3, 7): {choices}. own_weak: argmax and confidence of the net's own weak "
        "view (FixMatch's way); own_strong: of its strong view, as Eq. 3 writes y_pred = max_i p^s_i (detached); "
        "peer_weak: of the peer's.", choices=PG_PREDICTIONS)
    cvl_weight: float = opt(1.0, "L_CVL = PG + ACL + VM (Eq. 8).", ge=0)
    cml_weight: float = opt(1.0, "L_CML = CE(p^s_m, p^w_1-m) + CCLRL + MM (Eq. 13).", ge=0)
    div_weight: float = opt(1.0, "L_div (Eq. 14).", ge=0)
    contrastive_weight: float = opt(1.0, "Scales the four contrastive terms ACL, VM, CCLRL and MM (1 in Eq. 15).",
                                    ge=0)
    confidence_view: str = opt(
        "strong", "The view whose peer CE feeds the GMM: {choices}. Eq. 16 writes p^s; weak is RoLR's code (the "
        "train-transform view in eval mode, RoLR.py l.186-198), which the paper says it follows.",
        choices=CONFIDENCE_VIEWS)
    confidence_every: str = opt(
        "epoch", "When w is estimated: {choices}. epoch: once after each epoch, before either net trains; net: "
        "Algorithm 1 l.7, before each net trains (under the alternate schedule, a second estimate between net 0's "
        "pass and net 1's).", choices=CONFIDENCE_EVERY)
    ablations: Ablation = opt(factory=Ablation, help="Table 7's ablations, comma-separated: {choices} "
                              "(`--ablate` sets it too).", choices=ABLATIONS, many=True)


@dataclass(frozen=True)
class RoLRConfig:
    """RoLR (Chen et al., AAAI 2023) as its code runs it (chenmc1996/Robust-LR `RoLR.py`, the README's command);
    `variant="paper"` sharpens as the CCL paper's Eq. 1 writes it. The loss is RoLR.py l.130-138:
    CE(p^s, w y^ + (1 - w) target) + lambda_p KL(uniform || batch-mean p^s)."""

    VARIANTS = ("code", "paper")  # a class constant, not an option

    variant: str = opt("code", "What RoLR's target is: {choices}. code: target = mean(p^w_m, p^w_peer)^T, "
                       "normalised (RoLR.py l.125); paper: ^(1/T).", choices=VARIANTS)
    sharpen_t: float | None = opt(None, "T.", gt=0,
                                  default_text="the variant's: 1 for code (README: --T 1, no sharpening), 0.5 paper")
    lambda_p: float = opt(2.0, "Weight of the prior penalty (README: --lambda_p 2; RoLR.py's own default is 1).",
                          ge=0)
    confidence_view: str = opt("weak", "The GMM's per-sample CE: {choices}; weak: the train-transform view in eval "
                               "mode (RoLR.py l.186-198).", choices=CONFIDENCE_VIEWS)
    loss_history: int = opt(1, "GMM on the mean of the last k epochs' normalised losses (RoLR.py l.203-205: 5 at "
                            "r=0.9).", ge=1)
    passes_per_net: int = opt(2, "Passes over the data per net per epoch (RoLR.py l.86-100: each train() reads it "
                              "twice).", ge=1)
    warmup_batch_size: int | None = opt(None, "The warm-up's batch, each net in its own pass (dataloader_cifar.py "
                                        "l.176: 64).", ge=2, default_text="the run's batch size")

    def temperature(self) -> float:
        """T with the variant's default filled in."""
        if self.sharpen_t is not None:
            return self.sharpen_t
        return 1.0 if self.variant == "code" else 0.5


@dataclass(frozen=True)
class TCLConfig:
    """TCL (Huang et al., CVPR 2023) as Hzzone/TCL runs it (models/tcl/tcl.py l.80-84):
    L = ctr_weight L_ctr + cls_weight (L_cross + L_mix) + ent_weight ent + ne_weight ne + align_weight L_align."""

    WARMUP_LOSSES = ("full", "ce")  # a class constant, not an option

    temp: float = opt(0.25, "Temperature of InfoNCE and of the cluster posterior (the configs' `temp`).", gt=0)
    mixup_alpha: float = opt(1.0, "Beta(alpha, alpha) (the configs' `mixup_alpha`).", gt=0)
    ctr_weight: float = opt(1.0, "InfoNCE (unweighted in the code).")
    cls_weight: float = opt(1.0, "--cls_loss_weight: cross-supervision + the mixed batch's classifier CE.")
    ent_weight: float = opt(1.0, "--ent_loss_weight: mean entropy of each prediction.")
    ne_weight: float = opt(1.0, "--ne_loss_weight: negative entropy of the batch-mean prediction.")
    align_weight: float = opt(1.0, "--align_loss_weight: the mixed batch's cluster posterior against its targets.")
    scale1: float | None = opt(None, "Multiplies w in the cross-supervision targets.", ge=0, le=1,
                               default_text="the estimated clean fraction")
    scale2: float | None = opt(None, "The same for the mixup targets; 1 and 1 give the paper's targets.", ge=0, le=1,
                               default_text="the estimated clean fraction")
    sep_gmm: bool = opt(False, "One GMM per noisy class (--sep_gmm; the CIFAR-100 90% config sets it).")
    warmup_loss: str = opt("full", "The warm-up's loss: {choices}. full: the whole loss with w = 1, as the code "
                           "warms up; ce: plain CE, weak view.", choices=WARMUP_LOSSES)
    proj_dim: int = opt(256, "Projector output (the configs' feat_dim).", ge=1)
    dropout: float = opt(0.25, "In the classifier head (tcl_wrapper.py l.32).", ge=0, lt=1)


@dataclass(frozen=True)
class DivideMixConfig:
    """DivideMix (Li, Socher and Hoi, ICLR 2020) as LiJunnan1992/DivideMix's Train_CIFAR.py runs it (its argparse
    defaults, l.20-23): L = Lx + ramp(lambda_u) Lu + prior_weight L_prior. `plus` adds CCL's L_CVL and/or L_CML
    (the CCL paper's Table 5), with the `ccl` section's tau, threshold, weights and ablations."""

    PLUS = ("cvl", "cml")  # class constants, not options
    PLUS_ON = ("labelled", "all")

    p_threshold: float = opt(0.5, "A sample is labelled when its clean probability (peer's GMM) exceeds this.",
                             ge=0, lt=1)
    sharpen_t: float = opt(0.5, "T of co-refinement and co-guessing: p^(1/T), normalised.", gt=0)
    alpha: float = opt(4.0, "Mixup lambda ~ Beta(alpha, alpha), then max(lambda, 1 - lambda).", gt=0)
    lambda_u: float = opt(25.0, "Weight of Lu once ramped up (per setting: the recipes).", ge=0)
    rampup: int = opt(16, "Epochs of Lu's linear ramp after warm-up.", ge=0)
    prior_weight: float = opt(1.0, "The uniform-prior penalty (1 in the code).", ge=0)
    warmup_penalty: bool = opt(False, "Negative-entropy penalty in warm-up (the code adds it on asymmetric noise).")
    loss_history: int = opt(1, "GMM on the mean of the last k refreshes' normalised losses (Train_CIFAR.py "
                            "l.178-181: 5 at r=0.9).", ge=1)
    plus: str = opt("", "CCL's terms to add, comma-separated: {choices}; empty: none.", choices=PLUS, many=True)
    plus_on: str = opt("labelled", "The samples they apply to: {choices}; labelled: the division's labelled part.",
                       choices=PLUS_ON)

    def plus_terms(self) -> frozenset[str]:
        return frozenset(_terms(self.plus))


@dataclass(frozen=True)
class TrainConfig:
    # data
    data: str | None = opt(None, "Shard directory from tools/shard.py.", path=True,
                           default_text="the built-in digits set with --noise/--noise-rate, built into ~/.cache/ccl "
                           "on first use")
    noise: str = opt("sym", "Built-in digits only: the noise type, {choices} (tools/shard.py --help says what each "
                     "is).", choices=_from("ccl.pipeline.convert.noise", "NOISE_TYPES"))
    noise_rate: float = opt(0.4, "Built-in digits only.", ge=0, lt=1)
    num_classes: int | None = opt(None, "Expected class count; checked against the manifest.")
    backend: str = opt("torch", "Loader: {choices}.", choices=_from("ccl.pipeline.loader", "BACKENDS"), free=True)
    workers: int = opt(2, "Loader workers.", ge=0, free=True)
    strict: bool = opt(False, "A corrupt image is an error instead of skipped and counted.", free=True)
    # model
    method: str = opt("ccl", "The method: {choices}.", choices=_from("ccl.train.methods", "METHODS"))
    arch: str = opt("auto", "{choices}; auto takes the paper's choice for the dataset.",
                    choices=_from("ccl.model", "ARCHS", "auto"), noun="architecture")
    compile: bool = opt(False, "torch.compile the networks.", free=True)
    # optimisation
    epochs: int = opt(30, "Epochs in all, warm-up included.", ge=1, free=True)
    warmup: int | None = opt(None, "Warm-up epochs of plain CE.", ge=0, default_text=_warmups)
    batch_size: int = opt(128, "Batch size.", ge=2)  # per process under torchrun
    optimizer: str = opt("adam", "{choices}: adam is the CCL paper's, sgd RoLR's, DivideMix's and TCL's code's "
                         "(their recipes set it).", choices=OPTIMIZERS)
    lr: float = opt(1e-3, "Learning rate.", gt=0)  # the CCL paper's (Adam)
    # SGD's; Adam keeps its betas (0.9, 0.999), the paper's "Adam (momentum=0.9)"
    momentum: float = opt(0.9, "SGD momentum (Adam keeps its betas 0.9, 0.999).", ge=0, lt=1)
    weight_decay: float = opt(0.0, "Weight decay (coupled L2, as torch applies it).", ge=0)
    # The lr, set per epoch (`ccl.train.loop.lr_at`): a linear ramp over the first lr_ramp epochs, then constant
    # or cosine from lr down to lr_floor x lr; times lr_decay from epoch lr_decay_epoch on.
    cosine: bool = opt(False, "Cosine lr decay over the run, per epoch.")
    lr_ramp: int = opt(0, "Epochs of linear lr ramp-up at the start (TCL's code).", ge=0)
    lr_floor: float = opt(0.0, "Where the cosine ends, as a fraction of --lr.", ge=0, le=1)  # TCL's learning_eta_min
    lr_decay_epoch: int | None = opt(None, "From this epoch on (counted from 0, warm-up included) the lr is "
                                     "multiplied by --lr-decay.", ge=0, default_text="never")
    lr_decay: float = opt(0.1, "The factor of that step.", gt=0)  # RoLR's and DivideMix's step: lr / 10
    amp: bool = opt(True, "Mixed precision: bf16 on CPU, fp16 + GradScaler on CUDA.")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.", free=True)
    seed: int = opt(0, "Seed of init, order, augmentation (and the digits noise).", ge=0, lt=2**32)
    # twin methods
    # joint: measured as accurate as the paper's alternate on digits, with 1.5x faster epochs
    schedule: str = opt("joint", "Twin schedule: {choices}; alternate is the paper's (one net trains, the peer is "
                        "fixed, then the reverse), joint trains both in one step.", choices=SCHEDULES)
    confidence: str = opt("full", "Label confidence: {choices}; full: from a pass over the training set after each "
                          "epoch; inline: from the epoch's own steps.", choices=CONFIDENCE)
    kernel: str = opt("auto", "Contrastive kernel: {choices}.", choices=_from("ccl.train.losses.contrastive", "IMPLS"))
    # data parallel under torchrun (ccl.train.dist); batch_size is per process
    dist_backend: str = opt("auto", "Under torchrun: the process group's backend, {choices}; auto: nccl on CUDA, "
                            "gloo on CPU.", choices=_from("ccl.train.dist", "BACKENDS"), free=True)
    sync_bn: bool = opt(False, "Under torchrun: SyncBatchNorm, batch statistics over every process's batch (CUDA "
                        "only).")
    gather_negatives: bool = opt(False, "Under torchrun: contrastive negatives from every rank's batch (the global "
                                 "batch).")
    # per-method sections
    ccl: CCLConfig = field(default_factory=CCLConfig)
    rolr: RoLRConfig = field(default_factory=RoLRConfig)
    tcl: TCLConfig = field(default_factory=TCLConfig)
    dividemix: DivideMixConfig = field(default_factory=DivideMixConfig)
    val_fraction: float = opt(0.0, "Hold out this fraction of the (noisy) training set and choose best.pt on it; 0: "
                              "no best.pt. The test split never picks.", ge=0, le=0.5)
    patience: int = opt(0, "Stop when the held-out accuracy has not improved for this many epochs after warm-up "
                        "(needs --val-fraction); 0: run every epoch.", ge=0, free=True)
    # run
    recipe: str | None = opt(None, "A published setting to start from (`ccl recipes` lists them); options given "
                             "here override it.")
    out: str = opt("runs", "Parent of the run directory.", path=True, free=True)
    name: str | None = opt(None, "Run name.", default_text="DATASET-METHOD-sSEED, numbered if taken", free=True)
    eval_every: int = opt(1, "Epochs between test evaluations (and the last epoch).", ge=1, free=True)
    track_every: int = opt(0, "Epochs between logging M_embed, M_logit and the variance entropy (ccl analyze's "
                           "measures) on a fixed test subset; 0: off.", ge=0)
    track_samples: int = opt(512, "Size of that test subset.", ge=2)
    log_every: int = opt(50, "Steps between reads of the logged losses (one host sync each).", ge=1, free=True)
    logger: str = opt("none", "Live curves: {choices}; tensorboard writes RUN/tensorboard, wandb runs offline unless "
                      "WANDB_MODE or wandb's settings say otherwise; pip install 'ccl[NAME]'.",
                      choices=_from("ccl.train.tracking", "LOGGERS"), free=True)

    def validate(self) -> "TrainConfig":
        check_fields(self)  # every field within its range and among its choices; each section's too
        from ccl.train.tracking import require

        require(self.logger)  # its package installed
        _check(self.patience == 0 or self.val_fraction > 0,
               "patience stops on the held-out accuracy: set --val-fraction too (e.g. 0.1)")
        from ccl.train.rundir import check_name

        check_name(self.name)
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


# ----------------------------------------------------------------------------------------------------------------
# What a field says about itself


def options(cls=TrainConfig) -> list[tuple[dataclasses.Field, typing.Any]]:
    """(field, its type) of every option of cls, in order; a section is not an option (its fields are)."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.name not in SECTIONS]


def base_type(tp) -> tuple[typing.Any, bool]:
    """(T, optional) of a field's type T or T | None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


def choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    names = f.metadata.get("choices")
    return tuple(names() if callable(names) else names) if names is not None else None


def default_text(f: dataclasses.Field) -> str | None:
    """What the field's default means, where its value (None) does not say it."""
    text = f.metadata.get("default_text")
    return text() if callable(text) else text


def help_text(f: dataclasses.Field, with_default: bool = True) -> str:
    """The field's help, its choices filled in and (with_default) what a None default means appended."""
    text = f.metadata.get("help", "")
    names = choices(f)
    if names is not None:
        listed = ", ".join(names) if f.metadata.get("many") else _alternatives(names)
        text = text.replace("{choices}", listed) if "{choices}" in text else f"{text} One of {listed}."
    if with_default and default_text(f):
        text += f" Default: {default_text(f)}."
    return text


def cli_flag(name: str, tp) -> str:
    """`ccl train`'s option for the field `name`: --batch-size; a switch is --amp/--no-amp."""
    flag = name.replace("_", "-")
    return f"--{flag}/--no-{flag}" if base_type(tp)[0] is bool else f"--{flag}"


def free_on_resume() -> tuple[str, ...]:
    """The options a `--resume` may change without --allow-changes (`ccl.train.resume.FREE_ON_RESUME`)."""
    return tuple(f.name for f, _ in options() if f.metadata.get("free"))


def format_default(v) -> str:
    if isinstance(v, Ablation):
        return ",".join(n for n in ABLATIONS if getattr(v, f"no_{n}")) or "none"
    return str(v).lower() if isinstance(v, bool) or v is None else str(v)


# Each type a field may have, in words: (the README's values column, what an error says a value must be).
_WORDS = {bool: ("true or false", "true or false"), int: ("integer", "a whole number"), float: ("number", "a number"),
          str: ("text", "a string")}


def values_text(f: dataclasses.Field, tp) -> str:
    """The values a field takes, for the README: its type and range, or its choices."""
    tp, optional = base_type(tp)
    names = choices(f)
    if names is not None:
        text = ("any of " if f.metadata.get("many") else "") + ", ".join(names)
    else:
        text = "path" if f.metadata.get("path") else _WORDS[tp][0]
        if _has_range(f.metadata):
            text += " " + _range_words(f.metadata, None).removeprefix("be ").removeprefix("lie ")
    return text + (", or none" if optional else "")


# ----------------------------------------------------------------------------------------------------------------
# Checks: one pass over the fields' metadata (types come checked from `from_dict`; a field with a range or
# choices checks its own, for a TrainConfig built directly)


def check_fields(obj, prefix: str = "") -> None:
    """Every field of a config (and of its sections) within its range and among its choices; a float finite. A
    value of another type is refused too (a TrainConfig built directly skips `from_dict`'s typing), but None
    passes where the field's type allows it."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v, key, m = getattr(obj, f.name), prefix + f.name, f.metadata
        if dataclasses.is_dataclass(v) and f.name in SECTIONS and not prefix:
            check_fields(v, f"{f.name}.")  # a method section: its own fields, named SECTION.KEY
            continue
        tp, optional = base_type(hints[f.name])
        if v is None and optional:
            continue
        if _has_range(m):
            _check(isinstance(v, numbers.Real) and not isinstance(v, bool),
                   f"{key} must be {_WORDS[tp][1]}{' (or none)' if optional else ''}, got {v!r}")
        if isinstance(v, float):  # inf passes every range check written as a comparison
            _check(math.isfinite(v), f"{key} must {_range_words(m, v) if _has_range(m) else 'be a finite number'}"
                   f"{' (or none)' if f.default is None else ''}, got {v}")
        if _has_range(m):
            ok = ((m["ge"] is None or v >= m["ge"]) and (m["gt"] is None or v > m["gt"])
                  and (m["le"] is None or v <= m["le"]) and (m["lt"] is None or v < m["lt"]))
            _check(ok, f"{key} must {_range_words(m, v)}{' (or none)' if f.default is None else ''}, got {v}")
        names = choices(f)
        if names is not None and not isinstance(v, Ablation):  # an Ablation holds known parts only
            if m["many"]:
                unknown = [t for t in _terms(v) if t not in names] if isinstance(v, str) else [v]
                _check(not unknown, f"unknown {key} {', '.join(map(repr, unknown))}; expected any of "
                       f"{', '.join(names)}, comma-separated")
            else:
                _check(v in names, f"unknown {m['noun'] or key} {v!r}; expected {_alternatives(names)}")


def _has_range(m) -> bool:
    return any(m.get(k) is not None for k in ("ge", "gt", "le", "lt"))


def _range_words(m, v) -> str:
    """'lie in [0, 1)', 'be a positive finite number', 'be at least 2', ... (v: the value, None for the README)."""
    ge, gt, le, lt = (_num(m[k]) for k in ("ge", "gt", "le", "lt"))
    if (ge or gt) and (le or lt):
        return f"lie in {'[' + ge if ge else '(' + gt}, {le + ']' if le else lt + ')'}"
    if v is None:
        return f">= {ge}" if ge else f"> {gt}" if gt else f"<= {le}" if le else f"< {lt}"
    finite = " finite" if isinstance(v, float) else ""
    if gt == "0":
        return f"be a positive{finite} number"
    if gt:
        return f"be a{finite} number > {gt}"
    if ge:
        return f"be a finite number >= {ge}" if finite else f"be at least {ge}"
    return f"be a{finite} number {'<= ' + le if le else '< ' + lt}"


def _num(x) -> str:
    """A bound as the messages write it: 0.5, 2, 2^32 (None: no bound)."""
    if x is None:
        return ""
    if isinstance(x, int) and x >= 2**16 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return str(x)


def _alternatives(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _terms(text: str) -> list[str]:
    return [t.strip().lower() for t in text.split(",") if t.strip()]


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


# ----------------------------------------------------------------------------------------------------------------
# Values: a config file, config.json and `--set` strings, typed by each field's annotation


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


@functools.cache
def _adapter(tp):
    from pydantic import TypeAdapter

    return TypeAdapter(tp)


def _value(tp, v, key: str):
    """v as type tp, or a one-line error naming the key. A string is parsed (`--set` gives strings: "3", "1e-3",
    "true", "none"); any other value must have the type already (a JSON number is no bool, 3.5 is no int)."""
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
    tp, optional = base_type(tp)
    if optional and (v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null"))):
        return None
    if tp not in _WORDS:
        raise TypeError(f"config field {key} has a type the parser does not know: {tp}")
    from pydantic import ValidationError

    try:
        return _adapter(tp).validate_python(v, strict=not isinstance(v, str))
    except ValidationError:
        raise UserError(f"{key} must be {_WORDS[tp][1]}{' (or none)' if optional else ''}, got {v!r}") from None


def parse_ablations(text: str) -> Ablation:
    """`mimicry,cml` (or `no_mimicry,no_cml`) -> Ablation; empty or `none` (the default, as `--help` shows it) ->
    the full method."""
    names = [n.strip().replace("-", "_") for n in text.split(",") if n.strip() and n.strip().lower() != "none"]
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
    d = files.read_json(p, "config file")
    if not isinstance(d, dict):
        raise UserError(f"config file {p} must hold a JSON object of options")
    return d


# ----------------------------------------------------------------------------------------------------------------
# The README's option list


def options_markdown() -> str:
    """The README's list of `ccl train`'s options and the method settings, made from the fields (a test checks
    that README.md holds exactly this between its `<!-- options:start -->` and `<!-- options:end -->` lines)."""
    lines = ["| option | default | values | on `--resume` | what it sets |", "|---|---|---|---|---|"]
    for f, tp in options():
        lines.append(_row(f"`{cli_flag(f.name, tp)}`", f, tp, "free" if f.metadata.get("free") else "checked"))
    lines += ["", "Method settings: `--set SECTION.KEY=VALUE`, or `{\"SECTION\": {\"KEY\": VALUE}}` in a `--config` "
              "file (each is checked on `--resume`).", "",
              "| setting | default | values | what it sets |", "|---|---|---|---|"]
    for section, cls in SECTIONS.items():
        for f, tp in options(cls):
            lines.append(_row(f"`{section}.{f.name}`", f, tp))
    return "\n".join(lines) + "\n"


def _row(name: str, f: dataclasses.Field, tp, *resume: str) -> str:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if default is None and default_text(f):
        shown = default_text(f)
    else:
        shown = f"`{format_default(default)}`" if default != "" else "empty"
    cells = [name, shown, values_text(f, tp), *resume, help_text(f, with_default=False)]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
