"""The schema of manifest.json, checked whenever a shard set is opened.

A manifest is data, and data is not trusted: every field that the readers act on is typed (strictly: "10" is
not 10, true is not 1), ranged, and cross-checked, and every name that becomes a path is a plain file name, so
nothing read from a manifest can reach outside the shard folder (`/etc/passwd`, `../x`) or move a run directory
(`"dataset": "../escaped"`). `problems` lists every violation, one line each, for `ccl check`; `ShardSet.open`
reports the first and counts the rest.

Fields that only describe the set (noise spec, notes, creation record) are typed loosely: nothing reads them
as paths or sizes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from pydantic import model_validator

FORMAT_VERSION = 1
MANIFEST = "manifest.json"  # the file name of a shard set's manifest, written last
# Names that become parts of paths (a run directory, a shard file) or of file names: a letter or digit first,
# then letters, digits, '.', '_', '-'. No separator, no leading dot, so no '..', no hidden or absolute name.
PLAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
SPLIT_NAME = r"^[A-Za-z0-9_]{1,64}$"  # the converter's output names are SPLIT-NNNNNN.tar
TAR_FILE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.tar$"
IDX_FILE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.idx$"
SHA256_HEX = r"^[0-9a-f]{64}$"
MAX_SIDE = 65535  # JPEG's limit; a fixed image size above it is not a data set this trainer can load
MIN_TAR_BYTES = 1024  # a tar ends with two zero blocks: anything smaller is no tar

Count = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(ge=1)]
Side = Annotated[StrictInt, Field(ge=1, le=MAX_SIDE)]
Unit = Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
# Values in [0, 1] have a standard deviation of at most 0.5; 0 would divide by zero when normalising.
Std = Annotated[StrictFloat, Field(gt=0.0, le=0.5, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ShardRecord(_Strict):
    file: Annotated[StrictStr, Field(pattern=TAR_FILE)]
    index: Annotated[StrictStr, Field(pattern=IDX_FILE)]
    count: Positive
    first_index: Count
    sha256: Annotated[StrictStr, Field(pattern=SHA256_HEX)]
    bytes: Annotated[StrictInt, Field(ge=MIN_TAR_BYTES)]
    # Added with the index checksums; manifests written before have none, and their index files are checked
    # against the tar instead (slower: a walk over the tar headers).
    index_sha256: Optional[Annotated[StrictStr, Field(pattern=SHA256_HEX)]] = None

    @model_validator(mode="after")
    def _pair(self):
        if self.index != self.file[: -len(".tar")] + ".idx":
            raise ValueError(f"index {self.index!r} is not the index of {self.file!r}")
        return self


class Split(_Strict):
    count: Positive
    has_clean: StrictBool
    shards: Annotated[list[ShardRecord], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self):
        expect = 0
        for n, s in enumerate(self.shards):
            if s.first_index != expect:
                raise ValueError(f"shards[{n}].first_index is {s.first_index}, expected {expect} (shards hold "
                                 "consecutive samples)")
            expect += s.count
        if expect != self.count:
            raise ValueError(f"count is {self.count} but the shards hold {expect} samples")
        return self


class SkippedRecord(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    split: StrictStr
    path: StrictStr
    reason: StrictStr


class Manifest(_Strict):
    format_version: Literal[FORMAT_VERSION]
    dataset: Annotated[StrictStr, Field(pattern=PLAIN_NAME)]
    num_classes: Annotated[StrictInt, Field(ge=2, le=1_000_000)]  # one class leaves nothing to learn
    classes: list[StrictStr]
    image_size: Optional[Annotated[list[Side], Field(min_length=2, max_length=2)]]  # [height, width]; null: varies
    mean: Annotated[list[Unit], Field(min_length=3, max_length=3)]  # per RGB channel, of pixels scaled to [0, 1]
    std: Annotated[list[Std], Field(min_length=3, max_length=3)]
    splits: Annotated[dict[Annotated[StrictStr, Field(pattern=SPLIT_NAME)], Split], Field(min_length=1)]
    # Descriptive fields: read by people and reports, never used as paths or sizes.
    order: Optional[StrictStr] = None
    noise: Optional[dict[str, Any]] = None
    num_skipped: Count = 0
    skipped: list[SkippedRecord] = []
    num_reencoded: Count = 0
    reencoded: list[SkippedRecord] = []
    notes: list[StrictStr] = []
    tool_version: Optional[StrictStr] = None
    created: Optional[dict[str, Any]] = None


def _cross_checks(m: Manifest) -> list[str]:
    """What the field types cannot say: the fields that must agree with each other."""
    out = []
    if len(m.classes) != m.num_classes:
        out.append(f"classes: {len(m.classes)} names, but num_classes is {m.num_classes}")
    if m.num_skipped != len(m.skipped):
        out.append(f"num_skipped: {m.num_skipped}, but skipped lists {len(m.skipped)}")
    if m.num_reencoded != len(m.reencoded):
        out.append(f"num_reencoded: {m.num_reencoded}, but reencoded lists {len(m.reencoded)}")
    seen: dict[str, str] = {}
    for name, split in m.splits.items():
        for s in split.shards:
            for f in (s.file, s.index):
                if f in seen:
                    out.append(f"splits.{name}: {f} is listed twice (also by split {seen[f]!r})")
                seen[f] = name
    return out


_PATTERN_WHAT = {
    "dataset": "a plain name (letters, digits, '.', '_', '-'; no path)",
    "file": "a plain SPLIT-NNNNNN.tar file name (no path)",
    "index": "a plain .idx file name (no path)",
    "sha256": "a sha256 (64 lowercase hex digits)",
    "index_sha256": "a sha256 (64 lowercase hex digits)",
}


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (name)"
        elif isinstance(part, str) and not part.isidentifier():
            out += f"[{part!r}]"
        elif part in ("function-after", "list", "tuple", "dict", "str", "int", "float", "bool", "none") or str(
            part
        ).startswith(("function-", "constrained-")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "manifest"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def problems(raw: Any) -> list[str]:
    """Every schema violation of a parsed manifest.json, one line each ("" list when it is valid)."""
    if not isinstance(raw, dict):
        return [f"the manifest is a JSON {type(raw).__name__}, expected an object"]
    try:
        Manifest.model_validate(raw)
    except ValidationError as e:
        out = []
        for err in e.errors(include_url=False):
            msg = err["msg"].removeprefix("Value error, ")
            where = _where(err["loc"])
            field = next((p for p in reversed(err["loc"]) if isinstance(p, str)), "")
            if err["type"] == "string_pattern_mismatch":
                what = _PATTERN_WHAT.get(field, "a plain name (letters, digits, '.', '_', '-')")
                out.append(f"{where}: {_show(err['input'])} is not {what}")
            elif err["type"] in ("missing", "extra_forbidden") or "input" not in err:
                out.append(f"{where}: {msg.lower() if err['type'] == 'missing' else msg}")
            elif err["type"] == "value_error":
                out.append(f"{where}: {msg}")
            else:
                out.append(f"{where}: {msg}, got {_show(err['input'])}")
        return out
    return _cross_checks(Manifest.model_validate(raw))


def parse(raw: Any) -> Manifest:
    """The validated manifest; raises ValueError listing the problems (callers turn it into a UserError)."""
    found = problems(raw)
    if found:
        raise ValueError("\n".join(found))
    return Manifest.model_validate(raw)
