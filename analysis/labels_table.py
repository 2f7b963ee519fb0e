"""The table `ccl labels` writes: one row per sample (CSV, or Parquet with pyarrow), read back, and a contact
sheet of the most suspect images."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ccl import files
from ccl.analysis.labels_scoring import refurbished_labels, suggested_labels, suspect_flags, suspicion_order
from ccl.errors import UserError
from ccl.pipeline.shards import SampleLocations


@dataclass
class HeadSummary:
    """What the table needs of one prediction head (a net, or the ensemble), per sample [N]."""

    pred: np.ndarray  # int64: argmax class
    prob: np.ndarray  # float32: probability of pred
    p_given: np.ndarray  # float32: probability of the given label
    ce: np.ndarray  # float32: CE of the given label, -log p_given (the GMM's input)
    alt: np.ndarray  # int64: the most probable class other than the given label
    p_alt: np.ndarray  # float32: its probability


@dataclass
class LabelTable:
    """The rows, sorted most suspect first: `columns` maps a column name to an array of N values."""

    columns: dict[str, np.ndarray]
    classes: list[str]
    w_source: str  # "eval" (fitted on the final nets' eval-view losses) or "run" (the run's own)

    def __len__(self) -> int:
        return len(self.columns["index"])


def build_table(nets: list[HeadSummary], ens: HeadSummary, w: np.ndarray, w_ens: np.ndarray, given: np.ndarray,
                keys: list[str], classes: list[str], w_source: str, rate: float | None = None) -> LabelTable:
    """Assemble the rows from per-net summaries, the ensemble's, each net's w [K, N] and the ensemble's w_ens [N]
    (the one the rows are sorted and flagged by); sort them by suspicion."""
    k, n = w.shape
    if k != len(nets) or n != len(given) or len(keys) != n or w_ens.shape != (n,):
        raise ValueError(f"w is {w.shape} and w_ens {w_ens.shape} for {len(nets)} nets, {len(given)} labels and "
                         f"{len(keys)} keys")
    w_mean = w.mean(0)
    order = suspicion_order(w_ens, ens.p_given)
    suspect = suspect_flags(order, w_ens, rate)
    # Eq. 10 with one target for all nets: the ensemble's confidence and prediction (for a single net, exactly
    # Eq. 10 with its own prediction, having no peer).
    refurb = refurbished_labels(w_ens, given, ens.p_given, ens.alt, ens.p_alt)
    suggested = suggested_labels(suspect, given, ens.alt)
    names = np.asarray(classes, dtype=object)
    cols: dict[str, np.ndarray] = {"rank": np.arange(1, n + 1), "index": order,
                                   "key": np.asarray(keys, dtype=object)[order], "given": given[order],
                                   "given_name": names[given[order]]}
    for m in range(k):
        cols[f"w{m}"] = w[m][order]
    cols["w_mean"] = w_mean[order]
    cols["w_ens"] = w_ens[order]
    for m, h in enumerate(nets):
        cols[f"pred{m}"], cols[f"prob{m}"] = h.pred[order], h.prob[order]
    cols["pred_ens"], cols["prob_ens"], cols["prob_given"] = ens.pred[order], ens.prob[order], ens.p_given[order]
    cols["refurbished"] = refurb[order]
    cols["suggested"] = suggested[order]
    cols["suggested_name"] = names[suggested[order]]
    cols["suspect"] = suspect[order]
    return LabelTable(cols, list(classes), w_source)


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "1" if v else "0"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.9g}"  # 9 significant digits read back as the same float32: the order survives
    return str(v)


def check_out(path: Path) -> str:
    """The table's file name ends in .csv or .parquet; returns that suffix, lower case."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise UserError(f"--out {path}: expected a .csv or .parquet file name")
    return suffix


def write_table(table: LabelTable, path: Path) -> str:
    """Write the rows to `path`: Parquet for a .parquet name (needs pyarrow), CSV for a .csv name."""
    path = Path(path)
    suffix = check_out(path)
    files.make_dir(path.parent)
    if suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"--out {path}: Parquet needs pyarrow (pip install pyarrow), or name a .csv file") from None
        arrays = {k: (v.astype(str) if v.dtype == object else v) for k, v in table.columns.items()}
        files.write_atomic(path, lambda f: pq.write_table(pa.table(arrays), f))
    else:
        names = list(table.columns)

        def rows(f) -> None:
            out = csv.writer(f)
            out.writerow(names)
            for row in zip(*(table.columns[k].tolist() for k in names)):
                out.writerow([_fmt(v) for v in row])

        files.write_text(path, rows)  # a killed write leaves no half table under the final name
    return "parquet" if suffix == ".parquet" else "csv"


def read_table(path: Path) -> dict[str, np.ndarray]:
    """A table written by `write_table`, as column arrays (numbers parsed; the suspect flag as bool)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        return {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    cols = {}
    for j, name in enumerate(header):
        raw = [r[j] for r in body]
        if name in ("key", "given_name", "suggested_name"):
            cols[name] = np.asarray(raw, dtype=object)
        elif name == "suspect" or name.endswith("_issue"):
            cols[name] = np.asarray([v == "1" for v in raw])
        elif name.startswith(("w", "prob", "cleanlab_quality")):
            cols[name] = np.asarray(raw, dtype=np.float64)
        else:
            cols[name] = np.asarray(raw, dtype=np.int64)
    return cols


def default_out(run_dir: Path, split: str) -> Path:
    """RUN/labels-SPLIT.parquet when pyarrow is installed, else .csv."""
    try:
        import pyarrow  # noqa: F401

        ext = "parquet"
    except ImportError:
        ext = "csv"
    return run_dir / f"labels-{split}.{ext}"


# ----------------------------------------------------------------------------------------------------------------
# The contact sheet


def contact_sheet(table: LabelTable, locations: SampleLocations, path: Path, count: int, tile: int = 112,
                  cols: int = 8) -> int:
    """A PNG grid of the `count` most suspect samples: each image with its rank, index, and given -> suggested
    class (red when flagged).
    Returns the number of tiles."""
    from PIL import Image, ImageDraw, ImageFont

    from ccl.pipeline.shards import decode_image

    count = min(count, len(table))
    if count <= 0:
        raise UserError("--grid: no rows to show")
    cols = min(cols, count)
    rows = math.ceil(count / cols)
    caption = 30
    sheet = Image.new("RGB", (cols * tile, rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    c = table.columns
    chars = max(4, tile // 6)  # the default bitmap font is about 6 px per character
    for t in range(count):
        i = int(c["index"][t])
        im = Image.fromarray(decode_image(locations.read(i)))
        # Small images (digits, CIFAR) are enlarged with nearest neighbour so their pixels stay visible.
        scale = tile / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.NEAREST if scale >= 1 else Image.BILINEAR)
        x0, y0 = (t % cols) * tile, (t // cols) * (tile + caption)
        sheet.paste(im, (x0 + (tile - im.width) // 2, y0 + (tile - im.height) // 2))
        line1 = f"#{t + 1}  i{c['index'][t]}"[:chars]
        line2 = f"{c['given_name'][t]} -> {c['suggested_name'][t]}"[:chars]
        draw.text((x0 + 2, y0 + tile + 2), line1, fill="black", font=font)
        draw.text((x0 + 2, y0 + tile + 15), line2, fill="firebrick" if c["suspect"][t] else "black", font=font)
    path = Path(path)
    files.make_dir(path.parent)
    files.write_atomic(path, lambda f: sheet.save(f, format="PNG"))
    return count
