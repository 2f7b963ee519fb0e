"""Recipes: the published settings of each method and dataset, as config files shipped inside the package.

A recipe file is JSON: `description` (one line), `dataset` (the shard layout it is for: the manifest's
`dataset` name, or "any"), `config` (TrainConfig values, method sections as nested objects) and `sources`
(for every value, the line of the paper, README or config file it comes from). `ccl train --recipe NAME` loads
one; options given on the command line override it.
"""

from __future__ import annotations

import json
from importlib import resources

from ccl.errors import UserError

FIELDS = {"description", "dataset", "config", "sources"}


def names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load(name: str) -> dict:
    """The recipe NAME, checked: every config key known and every value sourced."""
    from ccl.train.config import TrainConfig

    available = names()
    if name not in available:
        raise UserError(f"unknown recipe {name!r}; available: {', '.join(available)} (see `ccl recipes`)")
    recipe = json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text())
    if set(recipe) != FIELDS:
        raise UserError(f"recipe {name} must have exactly the keys {', '.join(sorted(FIELDS))}")
    TrainConfig.from_dict(recipe["config"]).validate()  # unknown keys and bad values: one line, naming the key
    unsourced = sorted(set(_flat(recipe["config"])) - set(recipe["sources"]))
    if unsourced:
        raise ValueError(f"recipe {name}: no source given for {', '.join(unsourced)}")
    return recipe


def check_dataset(name: str, recipe: dict, dataset: str) -> None:
    """A recipe is for one shard layout: running it on another is the user's mistake."""
    if recipe["dataset"] not in ("any", dataset):
        raise UserError(f"recipe {name} is for {recipe['dataset']} shards, but the data is {dataset!r}")


def _flat(config: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return keys
