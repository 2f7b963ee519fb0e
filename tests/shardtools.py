"""Test helpers that read shard files (no test here: pytest collects test_*.py only)."""

from pathlib import Path

from ccl.pipeline.tarshard import parse_index_text


def parse_index(path: Path, tar_size: int | None = None) -> list[dict[str, tuple[int, int]]]:
    """Per sample, {component: (data offset, size)} of a DALI index file, through the package's one index parser."""
    raw = Path(path).read_bytes()
    return [{c: (f.offset, f.size) for c, f in s.items()} for s in parse_index_text(raw, str(path), tar_size)]
