"""ccl.train.analyze: the CCL paper's diagnostics of semantic contamination (`ccl analyze`), and the light
tracking hook that training can call every few epochs.

- `metrics`: the measures as pure functions of arrays (Eq. 4, Fig. 2b, Fig. 3, Table 6, Table 8, noise detection);
- `taxonomy`: class trees for the LCA distance (built-in CIFAR-10/100, Animal-10N, digits; files; WordNet offline);
- `collect`: networks -> logits and embeddings; `track` and `TrackSet` for training-time tracking;
- `report`: `analyze(runs, out)` writes analysis.json and the self-contained report.html;
- `cli`: the Typer command and `register(app)`.
"""

from ccl.train.analyze.collect import TrackSet, track
from ccl.train.analyze.report import Settings, analyze

__all__ = ["Settings", "TrackSet", "analyze", "track"]
