"""Class taxonomies for the LCA distance (Table 8): the built-in trees, user files, and WordNet read offline.

A taxonomy file is JSON::

    {
      "name": "wordnet",                       # a short name shown in the report
      "source": "where the tree comes from",   # cited in the report
      "paths": {                               # every class of the data set, by its manifest name
        "cat": ["entity", "animal", "mammal", "feline", "cat"],
        "dog": ["entity", "animal", "mammal", "canine", "dog"]
      }
    }

Each path runs from the root down to the class itself: all paths start at the same root, the last element is the
class name, and a node has one parent wherever it appears (the paths form a tree). Names are matched ignoring case
and treating spaces, hyphens and underscores alike. Classes outside the data set may appear; every class of the
data set must. Further keys (the built-in files keep the WordNet synset of each class under "synsets") are kept for
reference and ignored.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ccl import files
from ccl.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "taxonomies"
WNID = re.compile(r"^n(\d{8})\b")


def norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower())


@dataclass(frozen=True)
class Taxonomy:
    """A rooted tree over named nodes whose leaves include the data set's classes."""

    name: str
    source: str
    classes: tuple[str, ...]  # the data set's classes, in label order
    paths: tuple[tuple[str, ...], ...]  # per class: root ... class (normalised names)
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_paths(cls, name: str, source: str, paths: dict, classes: list[str], where: str = "taxonomy") -> "Taxonomy":
        """Validate a {class: [root, ..., class]} mapping against the data set's classes (UserError if it fails)."""
        if not isinstance(paths, dict) or not paths:
            raise UserError(f"{where}: expected a non-empty object under \"paths\" ({{class: [root, ..., class]}})")
        by_norm = {}
        for key, path in paths.items():
            if not isinstance(path, list) or not path or not all(isinstance(p, str) for p in path):
                raise UserError(f"{where}: the path of {key!r} must be a non-empty list of node names")
            if norm(path[-1]) != norm(key):
                raise UserError(f"{where}: the path of {key!r} must end with the class itself, not {path[-1]!r}")
            by_norm[norm(key)] = tuple(norm(p) for p in path)
        missing = [c for c in classes if norm(c) not in by_norm]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise UserError(f"{where}: {len(missing)} of the data set's {len(classes)} classes are missing: {shown}")
        chosen = tuple(by_norm[norm(c)] for c in classes)
        roots = {p[0] for p in chosen}
        if len(roots) != 1:
            raise UserError(f"{where}: the paths start at different roots ({', '.join(sorted(roots))}); expected one")
        parent: dict[str, str | None] = {}
        for p in chosen:
            for depth, node in enumerate(p):
                up = p[depth - 1] if depth else None
                if parent.setdefault(node, up) != up:
                    raise UserError(f"{where}: node {node!r} has two parents ({parent[node]!r} and {up!r}); "
                                    "the paths must form a tree")
        leaves = {p[-1] for p in chosen}
        inner = {n for p in chosen for n in p[:-1]}
        if leaves & inner:
            raise UserError(f"{where}: class {sorted(leaves & inner)[0]!r} is also an ancestor of another class")
        return cls(name, source, tuple(classes), chosen)

    @cached_property
    def leaf_count(self) -> dict[str, int]:
        """How many of the data set's classes lie under each node."""
        count: dict[str, int] = {}
        for p in self.paths:
            for node in p:
                count[node] = count.get(node, 0) + 1
        return count

    def score(self, path: tuple[str, ...], depth: int, kind: str) -> float:
        """f(node) of Shi et al.: its depth (edges from the root), or its information content -log2 of the share
        of classes below it (a uniform prior over the classes)."""
        if kind == "depth":
            return float(depth)
        if kind == "ic":
            return -math.log2(self.leaf_count[path[depth]] / len(self.paths))
        raise ValueError(f"unknown LCA score {kind!r}")

    def distance_matrix(self, kind: str = "depth") -> np.ndarray:
        """D [C, C] with D[a, b] = f(a) - f(LCA(a, b)) (Shi et al. 2024, Eq. 1): how far above class a its lowest
        common ancestor with b lies. Zero on the diagonal; not symmetric when leaves sit at different depths."""
        c = len(self.paths)
        d = np.zeros((c, c))
        for a, pa in enumerate(self.paths):
            for b, pb in enumerate(self.paths):
                k = 0
                while k < min(len(pa), len(pb)) and pa[k] == pb[k]:
                    k += 1
                d[a, b] = self.score(pa, len(pa) - 1, kind) - self.score(pa, k - 1, kind)  # LCA = pa[k - 1]
        return d

    def describe(self) -> dict:
        depths = [len(p) - 1 for p in self.paths]
        return {"name": self.name, "source": self.source, "nodes": len({n for p in self.paths for n in p}),
                "leaf_depth_min": min(depths), "leaf_depth_max": max(depths)}


def load_taxonomy(path: str | Path, classes: list[str]) -> Taxonomy:
    """A taxonomy file (format in the module docstring), checked against the data set's classes."""
    p = Path(path)
    data = files.read_json(p, "taxonomy file")
    if not isinstance(data, dict) or "paths" not in data:
        raise UserError(f"taxonomy file {p}: expected an object with \"paths\" (see `ccl analyze --help`)")
    tax = Taxonomy.from_paths(str(data.get("name", p.stem)), str(data.get("source", str(p))), data["paths"],
                              classes, where=f"taxonomy file {p}")
    return tax


def builtin_taxonomies(classes: list[str]) -> list[Taxonomy]:
    """The shipped trees whose classes cover the data set's (CIFAR-10/10N, CIFAR-100/100N, Animal-10N, digits)."""
    out = []
    for f in sorted(BUILTIN_DIR.glob("*.json")):
        data = json.loads(f.read_text())
        if {norm(c) for c in classes} <= {norm(k) for k in data["paths"]}:
            out.append(Taxonomy.from_paths(data["name"], data["source"], data["paths"], classes, where=str(f.name)))
    return out


def resolve_taxonomies(classes: list[str], user_file: str | Path | None) -> tuple[list[Taxonomy], str | None]:
    """The taxonomies to measure LCA with, and a note saying why there are none when there are none.

    --taxonomy FILE wins; else the built-in trees that cover the classes; else, for classes named by WordNet ids
    (WebVision, ImageNet), the WordNet hypernym tree when a WordNet database is found offline.
    """
    if user_file is not None:
        return [load_taxonomy(user_file, classes)], None
    found = builtin_taxonomies(classes)
    if found:
        return found, None
    if classes and all(WNID.match(c) for c in classes):
        wn = WordNet.find()
        if wn is None:
            return [], ("the classes are WordNet ids but no WordNet database was found offline (searched "
                        f"{', '.join(str(d) for d in wordnet_dirs())}); install one (Debian: wordnet-base) or pass "
                        "--taxonomy FILE")
        return [wn.taxonomy(classes)], None
    return [], "no built-in taxonomy covers these classes; pass --taxonomy FILE to measure LCA"


# --------------------------------------------------------------------------------------------------------------
# WordNet, read from its own database files (no download, no extra package)
# --------------------------------------------------------------------------------------------------------------


def wordnet_dirs() -> list[Path]:
    """Where a WordNet 3.0 database (data.noun) is looked for: $WNSEARCHDIR, $WNHOME/dict, Debian's wordnet-base,
    and NLTK's data folders (an unpacked corpora/wordnet or corpora/wordnet.zip)."""
    dirs = []
    if os.environ.get("WNSEARCHDIR"):
        dirs.append(Path(os.environ["WNSEARCHDIR"]))
    if os.environ.get("WNHOME"):
        dirs.append(Path(os.environ["WNHOME"]) / "dict")
    dirs.append(Path("/usr/share/wordnet"))
    nltk = [Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    nltk += [Path.home() / "nltk_data", Path("/usr/share/nltk_data"), Path("/usr/local/share/nltk_data"),
             Path("/usr/lib/nltk_data"), Path("/usr/local/lib/nltk_data")]
    dirs += [p / "corpora" / "wordnet" for p in nltk] + [p / "corpora" / "wordnet.zip" for p in nltk]
    return dirs


class WordNet:
    """The noun hypernym hierarchy of a WordNet 3.0 database (its data.noun file), read by byte offset."""

    def __init__(self, data_noun: bytes, where: str):
        self.data = data_noun
        self.where = where

    @classmethod
    def find(cls) -> "WordNet | None":
        for d in wordnet_dirs():
            if d.suffix == ".zip" and d.is_file():
                with zipfile.ZipFile(d) as z:
                    name = next((n for n in z.namelist() if n.endswith("data.noun")), None)
                    if name:
                        return cls(z.read(name), str(d))
            elif (d / "data.noun").is_file():
                return cls((d / "data.noun").read_bytes(), str(d))
        return None

    def synset(self, offset: int) -> tuple[str, list[int]]:
        """(first lemma, hypernym offsets: '@' then '@i', in file order) of the noun synset at ``offset``."""
        end = self.data.find(b"\n", offset)
        line = self.data[offset:end].decode("utf-8")
        fields = line.split(" | ", 1)[0].split()
        if not fields or fields[0] != f"{offset:08d}":
            raise UserError(f"WordNet ({self.where}): no noun synset at offset {offset:08d}")
        words = int(fields[3], 16)
        k = 4 + 2 * words
        pointers = [fields[k + 1 + 4 * i : k + 5 + 4 * i] for i in range(int(fields[k]))]
        hyper = [int(p[1]) for p in pointers if p[0] in ("@", "@i") and p[2] == "n"]
        return fields[4], hyper

    def path(self, offset: int) -> list[str]:
        """Root ... synset, following each synset's first hypernym (WordNet lists the principal one first)."""
        nodes = []
        seen = set()
        while True:
            if offset in seen:
                raise ValueError(f"WordNet hypernym cycle at {offset:08d}")
            seen.add(offset)
            lemma, hyper = self.synset(offset)
            nodes.append(f"{lemma} (n{offset:08d})")
            if not hyper:
                return nodes[::-1]
            offset = hyper[0]

    def class_paths(self, synsets: dict[str, str]) -> dict[str, list[str]]:
        """{class: [root, ..., class]} from {class: WordNet id}. A class's synset node becomes the class leaf; when
        another class's synset lies below it, the class hangs as a leaf under its synset node instead."""
        raw = {c: self.path(int(WNID.match(s).group(1))) for c, s in synsets.items()}
        inner = {n for p in raw.values() for n in p[:-1]}
        return {c: (p + [c] if p[-1] in inner else p[:-1] + [c]) for c, p in raw.items()}

    def taxonomy(self, classes: list[str]) -> Taxonomy:
        """The tree of classes named by WordNet ids (e.g. WebVision's 'n01440764 tench, Tinca tinca')."""
        synsets = {c: WNID.match(c).group(0) for c in classes}
        return Taxonomy.from_paths("wordnet", f"WordNet 3.0 noun hypernyms (first hypernym), read from {self.where}",
                                   self.class_paths(synsets), classes, where="WordNet")
