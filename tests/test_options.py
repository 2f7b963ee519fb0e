"""Each option of `ccl train` is defined once, as a field of TrainConfig (ccl.train.config): its Typer option, the
default that --help shows, `--set` and the config file's typing, the range and choice checks, the README's option
list and the options a --resume may change all come from it, and every name list is read from its one home."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ccl.errors import UserError
from ccl.train import config
from ccl.train.config import SECTIONS, TrainConfig, apply_overrides, format_default

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def help_rows() -> dict[str, str]:
    """`ccl train --help` at 400 columns: each option's row (wrapped lines joined), by its first flag."""
    from ccl.cli import app

    out = CliRunner().invoke(app, ["train", "--help"], env={**os.environ, "COLUMNS": "400"})
    assert out.exit_code == 0, out.output
    rows: dict[str, str] = {}
    last = None
    for line in out.output.splitlines():
        m = re.match(r"[│|]\s+(--[\w-]+)", line)
        if m:
            last = m.group(1)
            rows[last] = line.strip("│| ")
        elif last and re.match(r"[│|]\s{10,}\S", line):  # a wrapped help text's next line
            rows[last] += " " + line.strip("│| ")
    return {k: " ".join(v.split()) for k, v in rows.items()}


def _shown_default(f: dataclasses.Field) -> str | None:
    """The default --help must show for a field: None where the field's default is None (its help says what that
    means instead)."""
    if f.default is None:
        return None
    if isinstance(f.default, bool):
        return f.name.replace("_", "-") if f.default else "no-" + f.name.replace("_", "-")
    return str(f.default)


def test_help_shows_each_fields_help_and_default(help_rows):
    """A help text's default cannot drift from the code's: both are the field's."""
    for f, tp in config.options():
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_rows, f"no option for TrainConfig.{f.name}"
        row = help_rows[flag]
        assert " ".join(config.help_text(f).split()) in row, (f.name, row)  # every word kept (no markup eaten)
        shown = re.findall(r"\[default: ([^\]]*)\]", row)
        want = _shown_default(f)
        assert shown == ([want] if want is not None else []), (f.name, shown, want)
        if f.default is None:
            assert config.default_text(f) is None or f"Default: {config.default_text(f)}." in row, f.name


def test_the_command_options_take_the_field_defaults():
    import typer.main

    from ccl.cli import app

    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    for f, _ in config.options():
        default = params[f.name].default
        assert (str(default) if isinstance(default, Path) else default) == f.default, f.name
    own = {"set_", "ablate", "config", "resume", "allow_changes", "overwrite", "quiet"}
    assert set(params) == {f.name for f, _ in config.options()} | own  # no option outside the fields but these


def test_name_lists_are_read_from_their_homes(help_rows):
    from ccl.model import ARCHS
    from ccl.pipeline.convert.noise import NOISE_TYPES
    from ccl.pipeline.loader import BACKENDS
    from ccl.train import dist, tracking
    from ccl.train.losses.contrastive import IMPLS
    from ccl.train.methods import METHODS

    assert "dividemix" in METHODS
    for name, method in METHODS.items():
        assert re.search(rf"\b{name}\b", help_rows["--method"]), name
        assert f"{name} {method.default_warmup}" in help_rows["--warmup"], name
    homes = {"--arch": ("auto", *ARCHS), "--noise": NOISE_TYPES, "--backend": BACKENDS, "--kernel": IMPLS,
             "--dist-backend": dist.BACKENDS, "--logger": tracking.LOGGERS, "--optimizer": config.OPTIMIZERS,
             "--schedule": config.SCHEDULES, "--confidence": config.CONFIDENCE, "--ablate": config.ABLATIONS}
    for flag, names in homes.items():
        for name in names:
            assert re.search(rf"(?<![\w-]){name}(?![\w-])", help_rows[flag]), (flag, name)
    fields = {f.name: f for f, _ in config.options()}
    assert config.choices(fields["method"]) == tuple(METHODS)
    assert config.choices(fields["arch"]) == ("auto", *ARCHS)
    for section, cls in SECTIONS.items():  # the --set help: every setting with its default
        for f in dataclasses.fields(cls):
            assert f"{f.name}={config.format_default(getattr(cls(), f.name))}" in help_rows["--set"], (section, f.name)


def test_the_readme_option_list_is_the_generated_one():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- options:start -->\n(.*?)<!-- options:end -->", text, re.S)
    assert m, "README.md has no <!-- options:start --> ... <!-- options:end --> block"
    assert m.group(1) == config.options_markdown(), (
        "README.md's option list is out of date: replace the block with ccl.train.config.options_markdown()")
    for f, tp in config.options():
        assert f"`{config.cli_flag(f.name, tp)}`" in m.group(1)
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{section}.{f.name}`" in m.group(1)


def _every_field():
    """(key, field, type) of every option and method setting."""
    out = [(f.name, f, tp) for f, tp in config.options()]
    for section, cls in SECTIONS.items():
        out += [(f"{section}.{f.name}", f, tp) for f, tp in config.options(cls)]
    return out


def _outside(f: dataclasses.Field, tp) -> list:
    """Values just outside a field's range."""
    m, (base, _) = f.metadata, config.base_type(tp)
    bad = []
    step = 1 if base is int else 1e-6
    if m.get("ge") is not None:
        bad.append(m["ge"] - step)
    if m.get("gt") is not None:
        bad.append(m["gt"])
    if m.get("le") is not None:
        bad.append(m["le"] + step)
    if m.get("lt") is not None:
        bad.append(m["lt"])
    if base is float:
        bad += [float("inf"), float("nan")]
    return bad


@pytest.mark.parametrize("key,f,tp", _every_field(), ids=[k for k, _, _ in _every_field()])
def test_each_field_has_help_and_its_checks_come_from_it(key, f, tp):
    assert f.metadata.get("help"), f"{key} has no help text"
    TrainConfig.from_dict(apply_overrides({}, [f"{key}={_as_text(f)}"])).validate()  # the default, as --set text
    for v in _outside(f, tp):
        with pytest.raises(UserError, match=rf"^{re.escape(key)} must"):
            TrainConfig.from_dict(apply_overrides({}, [f"{key}={v}"])).validate()
    if config.choices(f) is not None and key != "ccl.ablations":  # ablations: parsed by Ablation.from_names
        with pytest.raises(UserError, match=rf"^unknown {re.escape(f.metadata['noun'] or key)} 'nope'"):
            TrainConfig.from_dict(apply_overrides({}, [f"{key}=nope"])).validate()


def _as_text(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return "" if isinstance(default, config.Ablation) else config.format_default(default)


def test_set_values_are_typed_by_the_fields_annotation():
    values = apply_overrides({}, ["epochs=7", "lr=1e-2", "amp=no", "warmup=none", "num_classes=10", "noise=pair",
                                  "rolr.sharpen_t=0.5", "rolr.warmup_batch_size=null", "tcl.sep_gmm=true"])
    cfg = TrainConfig.from_dict(values).validate()
    assert (cfg.epochs, cfg.lr, cfg.amp, cfg.warmup, cfg.num_classes, cfg.noise) == (7, 0.01, False, None, 10, "pair")
    assert cfg.rolr.sharpen_t == 0.5 and cfg.rolr.warmup_batch_size is None and cfg.tcl.sep_gmm is True
    for setting, words in (("epochs=1.5", "epochs must be a whole number"), ("amp=maybe", "must be true or false"),
                           ("lr=fast", "lr must be a number"), ("ccl.tau=x", "ccl.tau must be a number"),
                           ("warmup=some", r"warmup must be a whole number \(or none\)")):
        with pytest.raises(UserError, match=words):
            TrainConfig.from_dict(apply_overrides({}, [setting]))
    # A config file's JSON values must have the type already: no bool as a number, no number as a string.
    for bad, words in (({"epochs": True}, "epochs must be a whole number"), ({"epochs": 3.5}, "whole number"),
                       ({"method": 5}, "method must be a string"), ({"amp": 1}, "amp must be true or false"),
                       ({"ccl": {"tau": False}}, "ccl.tau must be a number")):
        with pytest.raises(UserError, match=words):
            TrainConfig.from_dict(bad)
    assert TrainConfig.from_dict({"lr": 1, "epochs": 3}).lr == 1.0  # an int is a number


def test_a_config_built_directly_is_checked_for_type_too():
    """TrainConfig(...) skips from_dict's typing: a value of another type in a field with choices or a range is
    still a one-line error naming the option, and None still passes where the field's type allows it."""
    for values, words in (({"method": 5}, "unknown method 5; expected ccl"),
                          ({"epochs": "3"}, "epochs must be a whole number, got '3'"),
                          ({"lr": None}, "lr must be a number, got None")):
        with pytest.raises(UserError, match=re.escape(words)):
            TrainConfig(**values).validate()
    TrainConfig(warmup=None, lr_decay_epoch=None, rolr=config.RoLRConfig(sharpen_t=None)).validate()


def _run_cli(monkeypatch, *args):
    """`ccl train ARGS` with the training replaced: the config it would train with."""
    from ccl.cli import app
    from ccl.train import loop

    seen = {}

    def fake_train(cfg, **kw):
        seen["cfg"] = cfg.validate()
        return {"method": cfg.method, "dataset": "digits", "arch": cfg.arch}

    monkeypatch.setattr(loop, "train", fake_train)
    res = CliRunner().invoke(app, ["train", *args])
    return res, seen.get("cfg")


def test_only_options_typed_on_the_command_line_override_a_config_file(monkeypatch, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 5, "lr": 0.01, "amp": False, "out": "elsewhere", "ccl": {"tau": 0.3}}))
    res, cfg = _run_cli(monkeypatch, "--config", str(path), "--lr", "0.02", "--set", "ccl.threshold=0.9",
                        "--ablate", "cml", "--gather-negatives", "--quiet")
    assert res.exit_code == 0, res.output
    assert (cfg.epochs, cfg.lr, cfg.amp, cfg.out) == (5, 0.02, False, "elsewhere")  # untyped options: the file's
    assert cfg.ccl.tau == 0.3 and cfg.ccl.threshold == 0.9 and cfg.ccl.ablations.no_cml and cfg.gather_negatives
    res, cfg = _run_cli(monkeypatch, "--recipe", "rolr-cifar10", "--epochs", "3", "--data", str(tmp_path))
    from ccl.train import recipes

    recipe = recipes.load("rolr-cifar10")["config"]
    assert cfg.recipe == "rolr-cifar10" and cfg.epochs == 3 and cfg.data == str(tmp_path)
    assert cfg.lr == recipe["lr"] and cfg.method == recipe["method"]


@pytest.mark.parametrize("args,words", [(["--epochs", "0"], "epochs must be at least 1, got 0"),
                                        (["--method", "mixmatch"], "unknown method 'mixmatch'; expected ccl, ce"),
                                        (["--set", "dividemix.plus=cvl,acl"], "unknown dividemix.plus 'acl'"),
                                        (["--lr", "inf"], "lr must be a positive finite number")])
def test_a_bad_value_is_a_one_line_error_naming_the_option(monkeypatch, args, words):
    res, _ = _run_cli(monkeypatch, *args)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and lines == [f"error: {lines[0][7:]}"] and words in lines[0], res.output


def test_resume_may_change_the_options_whose_field_says_so():
    from ccl.train.resume import FREE_ON_RESUME, config_changes

    assert {"epochs", "workers", "device", "out", "name"} <= set(FREE_ON_RESUME) and "lr" not in FREE_ON_RESUME
    saved = TrainConfig().to_dict()
    assert config_changes(saved, TrainConfig(epochs=99, workers=0), allow=False) == {}
    with pytest.raises(UserError, match="lr"):
        config_changes(saved, TrainConfig(lr=0.5), allow=False)


def test_the_gpu_check_trains_every_method():
    """tools/gpu_check.py takes its methods from METHODS (DivideMix included), not from a list of its own."""
    from ccl.train.methods import METHODS

    sys.path.insert(0, str(ROOT / "tools"))  # as tools/gpu_check.py puts its parts on the path
    try:
        from gpucheck import children, items, settings
    finally:
        sys.path.remove(str(ROOT / "tools"))
    every = (*METHODS, "ccl-alternate")
    for mode, cfg in settings.MODES.items():
        assert cfg["train_methods"] == settings.ALL_METHODS, mode
        assert cfg["compile_methods"] == settings.ALL_METHODS or set(cfg["compile_methods"]) <= set(every), mode

    class Run:  # what _method_specs reads of a run: the versions item's report
        results = {"versions": {"details": {"methods": children.child_versions({}, cuda=False)[0]["methods"]}}}

    assert items._method_specs(Run(), settings.ALL_METHODS, ("ccl",)) == [every, ("ccl",)]


def test_ablations_read_back_what_the_help_shows_as_their_default():
    from ccl.train.losses import Ablation

    assert format_default(TrainConfig().ccl.ablations) == "none"
    for text in ("none", "", "None"):
        assert TrainConfig.from_dict(apply_overrides({}, [f"ccl.ablations={text}"])).ccl.ablations == Ablation()
    assert TrainConfig.from_dict(apply_overrides({}, ["ccl.ablations=cvl"])).ccl.ablations == Ablation(no_cvl=True)
