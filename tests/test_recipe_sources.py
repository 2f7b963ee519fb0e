"""Every number a recipe takes from a baseline's official code is checked against the line it comes from.

TABLE holds, per recipe, one row per (value, file, line): `Line(key, value, repo, path, line, says)`, where `says`
tells in words what that line of the official repository reads and, for a value the recipe derives (RoLR's 15 + 500
epochs, TCL's 0.03 x 1024 / 256), how the value follows. Each row was read in the repository at the commit READ_AT
names (chenmc1996/Robust-LR, Hzzone/TCL, LiJunnan1992/DivideMix). The test of a recipe checks, for every row:

(a) the recipe's value for the key equals the row's value (a bool stays a bool, an unset value stays None), and
(b) the recipe's `sources` text for that key names the file and the line: the file's name followed by `l.N`, or by
    a range `l.A-B` that holds N (a later `l.M` with no file named in between belongs to the same file).

So changing a value, or a citation, without the other fails here, and so does adding a number without a row.

CCL has no public code: its recipes' rows are `Paper(key, value, paper, section, quote)`, the CCL paper's section and
the words the recipe quotes from it, and (b) checks that the source names that section and holds those words. They
are not checked against a repository. Values the paper does not state (ccl.tau; the epochs for Animal-10N and
WebVision) have no row; their sources say "not stated". DivideMix's lambda_u per noise rate is also a Paper row
(its paper's Table 7, which the code's one default of 25 does not cover).
"""

from __future__ import annotations

import copy
import re
from typing import NamedTuple

import pytest

from ccl.train import recipes


class Line(NamedTuple):
    key: str  # the recipe's config key, sections dotted ("tcl.temp")
    value: object  # what the recipe must hold for it
    repo: str
    path: str  # in repo
    line: int  # 1-based, at the commit READ_AT names
    says: str  # what the line reads, in words


class Paper(NamedTuple):
    key: str
    value: object
    paper: str
    section: str  # must appear in the key's source text
    quote: str  # the words the source quotes for the value; must appear in it too


ROLR, TCL, DIVIDEMIX = "chenmc1996/Robust-LR", "Hzzone/TCL", "LiJunnan1992/DivideMix"
TCL_PY, TCL_WRAPPER, TEMPLATE = "models/tcl/tcl.py", "models/tcl/tcl_wrapper.py", "models/basic_template.py"
C10_90, C100_90 = "models/tcl/configs/cifar10_90_prer18.yml", "models/tcl/configs/cifar100_90_prer18.yml"

# Where each file's lines were read (the stored copy of the official repository at that commit).
READ_AT = {
    (ROLR, "RoLR.py"): "ce7f6a9b43c6e5b552a1a0b69873727c799d73d3",
    (ROLR, "dataloader_cifar.py"): "ce7f6a9b43c6e5b552a1a0b69873727c799d73d3",
    (ROLR, "README.md"): "8e5ed3130e977de2d4bc6d427e8673a7efd90fcf",  # at ce7f6a9 the command is l.13
    (TCL, TCL_PY): "d34ae3d1e3bf6e64670b1c579fa7a3b16d082b15",
    (TCL, TCL_WRAPPER): "d34ae3d1e3bf6e64670b1c579fa7a3b16d082b15",
    (TCL, TEMPLATE): "d34ae3d1e3bf6e64670b1c579fa7a3b16d082b15",
    (TCL, C10_90): "d34ae3d1e3bf6e64670b1c579fa7a3b16d082b15",
    (TCL, C100_90): "d34ae3d1e3bf6e64670b1c579fa7a3b16d082b15",
    (DIVIDEMIX, "Train_CIFAR.py"): "39740b267147466bac0779de91d969909ab3b65f",
}

# --- RoLR: RoLR.py, dataloader_cifar.py and the README's command; the same for CIFAR-10 and CIFAR-100 ---------------
ROLR_ROWS = [
    Line("epochs", 515, ROLR, "RoLR.py", 19, "--warm_up defaults to 15: the warm-up epochs"),
    Line("epochs", 515, ROLR, "RoLR.py", 27, "--num_epochs defaults to 500: the epochs after warm-up; 15 + 500"),
    Line("epochs", 515, ROLR, "README.md", 12, "the command passes --num_epochs 500"),
    Line("epochs", 515, ROLR, "RoLR.py", 263, "the warm-up loop, over warm_up epochs"),
    Line("epochs", 515, ROLR, "RoLR.py", 281, "the main loop, over num_epochs epochs"),
    Line("warmup", 15, ROLR, "RoLR.py", 19, "--warm_up defaults to 15"),
    Line("batch_size", 448, ROLR, "RoLR.py", 18, "--batch_size defaults to 64"),
    Line("batch_size", 448, ROLR, "dataloader_cifar.py", 138, "u is 7"),
    Line("batch_size", 448, ROLR, "dataloader_cifar.py", 186, "the training loader batches batch_size x u: 448"),
    Line("lr", 0.02, ROLR, "RoLR.py", 20, "--lr defaults to 0.02"),
    Line("lr", 0.02, ROLR, "RoLR.py", 266, "the warm-up sets net 1's lr to 0.02"),
    Line("momentum", 0.9, ROLR, "RoLR.py", 242, "net 1's SGD: momentum 0.9"),
    Line("momentum", 0.9, ROLR, "RoLR.py", 243, "net 2's SGD: momentum 0.9"),
    Line("weight_decay", 0.0005, ROLR, "RoLR.py", 242, "net 1's SGD: weight decay 5e-4"),
    Line("weight_decay", 0.0005, ROLR, "RoLR.py", 243, "net 2's SGD: weight decay 5e-4"),
    Line("cosine", False, ROLR, "RoLR.py", 283, "a step, not a cosine: lr / 10 in the last 100 epochs"),
    Line("lr_decay_epoch", 416, ROLR, "RoLR.py", 283, "lr / 10 while num_epochs - epoch < 100: from epoch 401"),
    Line("lr_decay_epoch", 416, ROLR, "RoLR.py", 19, "after the 15 warm-up epochs: 15 + 401"),
    Line("lr_decay", 0.1, ROLR, "RoLR.py", 284, "lr divided by 10"),
    Line("rolr.sharpen_t", 1.0, ROLR, "README.md", 12, "the command passes --T 1"),
    Line("rolr.sharpen_t", 1.0, ROLR, "RoLR.py", 26, "--T defaults to 1"),
    Line("rolr.sharpen_t", 1.0, ROLR, "RoLR.py", 125, "the mean prediction raised to T"),
    Line("rolr.lambda_p", 2.0, ROLR, "README.md", 12, "the command passes --lambda_p 2"),
    Line("rolr.lambda_p", 2.0, ROLR, "RoLR.py", 138, "the loss weighs the prior penalty by lambda_p"),
    Line("rolr.loss_history", 1, ROLR, "RoLR.py", 203, "the 5-epoch loss history only when r is 0.9"),
    Line("rolr.loss_history", 1, ROLR, "RoLR.py", 208, "otherwise this epoch's losses alone"),
    Line("rolr.passes_per_net", 2, ROLR, "RoLR.py", 86, "I = 2: train() reads its loader twice"),
    Line("rolr.warmup_batch_size", 64, ROLR, "dataloader_cifar.py", 176, "the warm-up loader's batch size is 64"),
]

# --- TCL: the configs, tcl.py, tcl_wrapper.py and basic_template.py ---------------------------------------------------
def tcl_rows(config: str, *, batch_size: int, lr: float, mixup_line: int) -> list:
    """The rows every TCL recipe shares: the values its CIFAR config and the code set. Lines 1-28 of cifar10_20,
    cifar10_90 and cifar100_90_prer18.yml differ only in dataset and label_file (l.8, l.10); mixup_alpha is l.29 in
    the CIFAR-10 configs, l.31 in the CIFAR-100 one, after its sep_gmm and scale2. No config sets scale1."""
    rows = [
        Line("epochs", 200, TCL, config, 12, "epochs: 200"),
        Line("epochs", 200, TCL, TEMPLATE, 407, "the loop ends once cur_epoch passes epochs"),
        Line("warmup", 19, TCL, config, 23, "warmup_epochs: 20"),
        Line("warmup", 19, TCL, TCL_PY, 67, "warm-up while cur_epoch < warmup_epochs"),
        Line("warmup", 19, TCL, TEMPLATE, 36, "cur_epoch starts at 1: epochs 1 to 19 warm up"),
        Line("batch_size", batch_size, TCL, config, 1, "batch_size: 256 per process"),
        Line("lr", lr, TCL, config, 15, "learning_rate: 0.03"),
        Line("lr", lr, TCL, TEMPLATE, 33, "learning_rate times the total batch / 256"),
        Line("momentum", 0.9, TCL, TCL_PY, 37, "SGD with momentum opt.momentum"),
        Line("momentum", 0.9, TCL, TEMPLATE, 70, "--momentum defaults to 0.9"),
        Line("weight_decay", 0.001, TCL, config, 24, "weight_decay: 0.001"),
        Line("cosine", True, TCL, TEMPLATE, 453, "after the ramp, a cosine from the lr down to min_lr"),
        Line("lr_ramp", 20, TCL, config, 23, "warmup_epochs: 20, the lr's ramp too"),
        Line("lr_ramp", 20, TCL, TEMPLATE, 451, "during the ramp, lr x epoch / warmup_epochs"),
        Line("lr_floor", 0.01, TCL, config, 16, "learning_eta_min: 0.01"),
        Line("lr_floor", 0.01, TCL, TEMPLATE, 447, "min_lr is the lr times learning_eta_min"),
        Line("tcl.temp", 0.25, TCL, config, 21, "temp: 0.25"),
        Line("tcl.temp", 0.25, TCL, TCL_WRAPPER, 163, "InfoNCE built with the temperature T"),
        Line("tcl.mixup_alpha", 1.0, TCL, config, mixup_line, "mixup_alpha: 1.0"),
        Line("tcl.proj_dim", 256, TCL, config, 13, "feat_dim: 256"),
        Line("tcl.dropout", 0.25, TCL, TCL_WRAPPER, 32, "the classifier's dropout defaults to 0.25"),
        Line("tcl.scale1", None, TCL, TCL_PY, 51, "--scale1 has no default"),
        Line("tcl.scale1", None, TCL, TCL_PY, 177, "an unset scale1 becomes the estimated clean fraction"),
    ]
    if batch_size == 1024:
        rows.append(Line("batch_size", 1024, TCL, config, 2, "num_devices: 4, so 4 x 256 in all"))
    return rows


TCL_CODE_DEFAULTS = [  # sep_gmm and scale2 where a config leaves them unset
    Line("tcl.sep_gmm", False, TCL, TCL_PY, 48, "--sep_gmm is a store_true flag: off unless given"),
    Line("tcl.scale2", None, TCL, TCL_PY, 52, "--scale2 has no default"),
    Line("tcl.scale2", None, TCL, TCL_PY, 179, "an unset scale2 becomes the estimated clean fraction"),
]
TCL_CIFAR100_90 = [  # set only by the CIFAR-100 90% config
    Line("tcl.sep_gmm", True, TCL, C100_90, 29, "sep_gmm: true"),
    Line("tcl.sep_gmm", True, TCL, TCL_PY, 212, "with sep_gmm, one GMM per noisy class"),
    Line("tcl.scale2", 1.0, TCL, C100_90, 30, "scale2: 1."),
]

# --- DivideMix: Train_CIFAR.py's defaults and code ----------------------------------------------------------------
DIVIDEMIX_ROWS = [
    Line("epochs", 301, DIVIDEMIX, "Train_CIFAR.py", 24, "--num_epochs defaults to 300"),
    Line("epochs", 301, DIVIDEMIX, "Train_CIFAR.py", 242, "the loop runs num_epochs + 1 epochs, warm-up included"),
    Line("batch_size", 128, DIVIDEMIX, "Train_CIFAR.py", 17, "--batch_size 64: 64 labelled + 64 unlabelled"),
    Line("lr", 0.02, DIVIDEMIX, "Train_CIFAR.py", 18, "--lr defaults to 0.02"),
    Line("momentum", 0.9, DIVIDEMIX, "Train_CIFAR.py", 232, "net 1's SGD: momentum 0.9"),
    Line("momentum", 0.9, DIVIDEMIX, "Train_CIFAR.py", 233, "net 2's SGD: momentum 0.9"),
    Line("weight_decay", 0.0005, DIVIDEMIX, "Train_CIFAR.py", 232, "net 1's SGD: weight decay 5e-4"),
    Line("weight_decay", 0.0005, DIVIDEMIX, "Train_CIFAR.py", 233, "net 2's SGD: weight decay 5e-4"),
    Line("lr_decay_epoch", 150, DIVIDEMIX, "Train_CIFAR.py", 244, "lr / 10 once epoch >= 150"),
    Line("lr_decay", 0.1, DIVIDEMIX, "Train_CIFAR.py", 245, "lr divided by 10"),
    Line("dividemix.alpha", 4.0, DIVIDEMIX, "Train_CIFAR.py", 20, "--alpha defaults to 4"),
    Line("dividemix.p_threshold", 0.5, DIVIDEMIX, "Train_CIFAR.py", 22, "--p_threshold defaults to 0.5"),
    Line("dividemix.sharpen_t", 0.5, DIVIDEMIX, "Train_CIFAR.py", 23, "--T defaults to 0.5"),
    Line("dividemix.prior_weight", 1.0, DIVIDEMIX, "Train_CIFAR.py", 113, "the loss adds the penalty unweighted"),
    Line("dividemix.warmup_penalty", False, DIVIDEMIX, "Train_CIFAR.py", 132, "the warm-up penalty: asym noise only"),
    Line("dividemix.rampup", 16, DIVIDEMIX, "Train_CIFAR.py", 192, "linear_rampup's rampup_length defaults to 16"),
]
DIVIDEMIX_PAPER = "DivideMix (Li, Socher and Hoi, ICLR 2020)"

# --- CCL: no public code; the paper's Appendix ---------------------------------------------------------------------
CCL_PAPER, DETAILS = "CCL (Fan and Li, AAAI 2025)", "Appendix 'Implementation Details'"
CCL_ROWS = [
    Paper("batch_size", 128, CCL_PAPER, DETAILS, "set to 128 and 500"),
    Paper("lr", 0.001, CCL_PAPER, DETAILS, "initial learning rate of 0.001"),
    Paper("ccl.threshold", 0.95, CCL_PAPER, DETAILS, "c = 0.95"),
]
CCL_CIFAR = CCL_ROWS + [Paper("epochs", 500, CCL_PAPER, DETAILS, "500 for CIFAR-10, CIFAR-100")]
CCL_IMAGENET_LIKE = CCL_ROWS + [Paper("warmup", 80, CCL_PAPER, "Appendix 'Warm-up'", "first 80 epochs")]

TABLE = {
    "rolr-cifar10": ROLR_ROWS,
    "rolr-cifar100": ROLR_ROWS,
    "tcl-cifar10": tcl_rows(C10_90, batch_size=1024, lr=0.12, mixup_line=29) + TCL_CODE_DEFAULTS,
    "tcl-cifar100": tcl_rows(C100_90, batch_size=1024, lr=0.12, mixup_line=31) + TCL_CODE_DEFAULTS,
    "tcl-cifar100-90": tcl_rows(C100_90, batch_size=1024, lr=0.12, mixup_line=31) + TCL_CIFAR100_90,
    # no WebVision config: the CIFAR one's values, at a batch of 256 (one GPU's) and so lr 0.03 x 256 / 256
    "tcl-webvision": tcl_rows(C10_90, batch_size=256, lr=0.03, mixup_line=29) + TCL_CODE_DEFAULTS,
    "dividemix-cifar10": DIVIDEMIX_ROWS + [
        Line("warmup", 10, DIVIDEMIX, "Train_CIFAR.py", 219, "warm_up is 10 for cifar10"),
        Line("dividemix.lambda_u", 25.0, DIVIDEMIX, "Train_CIFAR.py", 21, "--lambda_u defaults to 25"),
        Paper("dividemix.lambda_u", 25.0, DIVIDEMIX_PAPER, "Appendix B Table 7", "lambda_u = 25"),
    ],
    "dividemix-cifar100": DIVIDEMIX_ROWS + [
        Line("warmup", 30, DIVIDEMIX, "Train_CIFAR.py", 221, "warm_up is 30 for cifar100"),
        Paper("dividemix.lambda_u", 150.0, DIVIDEMIX_PAPER, "Appendix B Table 7", "lambda_u = 150"),
    ],
    "ccl-cifar10": CCL_CIFAR + [Paper("warmup", 10, CCL_PAPER, DETAILS, "10 epochs for CIFAR-10")],
    "ccl-cifar100": CCL_CIFAR + [Paper("warmup", 30, CCL_PAPER, DETAILS, "30 epochs for CIFAR-100")],
    "ccl-animal10n": CCL_IMAGENET_LIKE,
    "ccl-webvision": CCL_IMAGENET_LIKE,
}

# A file named in a source (its last path part), or a line reference after it: l.19, l.242-243.
_CITATION = re.compile(r"(?P<file>[\w./-]+\.(?:py|yml|md))\b|\bl\.(?P<lo>\d+)(?:-(?P<hi>\d+))?")


def cited_lines(text: str) -> dict[str, set[int]]:
    """{file name: the lines the text cites in it}; a line reference belongs to the last file named before it."""
    cited: dict[str, set[int]] = {}
    current = None
    for m in _CITATION.finditer(text):
        if m["file"]:
            current = m["file"].rsplit("/", 1)[-1]
            cited.setdefault(current, set())
        elif current is not None:
            lo = int(m["lo"])
            cited[current] |= set(range(lo, int(m["hi"] or lo) + 1))
    return cited


def _values(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        out.update(_values(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _same(value, expected) -> bool:
    if expected is None or value is None:
        return value is expected
    return isinstance(value, bool) == isinstance(expected, bool) and value == expected


def mismatches(recipe: dict, rows: list) -> list[str]:
    """What in the recipe disagrees with its rows: a value, or a source that no longer cites the row's line."""
    values, sources = _values(recipe["config"]), recipe["sources"]
    wrong = []
    for row in rows:
        if row.key not in values:
            wrong.append(f"{row.key}: not in the recipe, but the table has a row for it")
            continue
        where = (f"{row.repo} {row.path} l.{row.line} ({row.says})" if isinstance(row, Line)
                 else f"{row.paper}, {row.section}: '{row.quote}'")
        if not _same(values[row.key], row.value):
            wrong.append(f"{row.key} = {values[row.key]!r}, but {where} gives {row.value!r}")
        text = sources.get(row.key, "")
        if isinstance(row, Line):
            name = row.path.rsplit("/", 1)[-1]
            cited = cited_lines(text).get(name)
            if cited is None or row.line not in cited:
                wrong.append(f"{row.key}: its source does not cite {name} l.{row.line}, the line of {where}; "
                             f"it cites {sorted(cited) if cited else 'no line of ' + name}")
        else:
            missing = [s for s in (row.section, row.quote) if s not in text]
            if missing:
                wrong.append(f"{row.key}: its source lacks {' and '.join(repr(s) for s in missing)} ({where})")
    return wrong


@pytest.mark.parametrize("name", recipes.names())
def test_each_value_is_the_one_on_the_line_its_recipe_cites(name):
    assert name in TABLE, f"recipe {name} has no rows in TABLE: add the (value, file, line) of each number it sets"
    wrong = mismatches(recipes.load(name), TABLE[name])
    assert not wrong, f"recipe {name} drifted from its sources:\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("name", recipes.names())
def test_every_number_of_a_recipe_has_a_row(name):
    """A number, flag or unset value with no row is unchecked: each needs one, unless its source says the paper
    does not state it."""
    recipe = recipes.load(name)
    covered = {row.key for row in TABLE.get(name, [])}
    loose = [k for k, v in _values(recipe["config"]).items()
             if (v is None or isinstance(v, (bool, int, float))) and k not in covered
             and not recipe["sources"][k].startswith("not stated")]
    assert not loose, f"recipe {name}: no row for {', '.join(loose)}"


def test_every_row_names_a_file_read_at_a_known_commit():
    for name, rows in TABLE.items():
        for row in rows:
            if isinstance(row, Line):
                assert (row.repo, row.path) in READ_AT, f"{name} {row.key}: {row.repo} {row.path} is not in READ_AT"
                assert row.line >= 1


def test_changing_a_value_or_its_citation_alone_fails():
    recipe = recipes.load("rolr-cifar10")
    assert not mismatches(recipe, TABLE["rolr-cifar10"])
    value = copy.deepcopy(recipe)
    value["config"]["warmup"] = 16
    assert any(m.startswith("warmup = 16") for m in mismatches(value, TABLE["rolr-cifar10"]))
    citation = copy.deepcopy(recipe)
    citation["sources"]["lr_decay"] = "RoLR.py l.283: lr /= 10."  # the line before the one that divides
    assert any("does not cite RoLR.py l.284" in m for m in mismatches(citation, TABLE["rolr-cifar10"]))
    paper = copy.deepcopy(recipes.load("ccl-cifar10"))
    paper["sources"]["ccl.threshold"] = paper["sources"]["ccl.threshold"].replace("c = 0.95", "c = 0.9")
    assert any("lacks 'c = 0.95'" in m for m in mismatches(paper, TABLE["ccl-cifar10"]))


def test_cited_lines_reads_files_lines_and_ranges():
    text = ("Hzzone/TCL models/basic_template.py l.449-451 with models/tcl/configs/cifar10_90_prer18.yml l.23; "
            "tcl.py l.67, l.176-178 and tcl_wrapper.py l.32")
    assert cited_lines(text) == {"basic_template.py": {449, 450, 451}, "cifar10_90_prer18.yml": {23},
                                 "tcl.py": {67, 176, 177, 178}, "tcl_wrapper.py": {32}}
