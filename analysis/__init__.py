"""ccl.analysis: everything that reads finished runs, and never runs inside training.

- `runs`: runs side by side (`ccl runs`), the one summariser of run directories;
- `table`: a methods x grid x noise x seeds sweep, trained and then summarised (`ccl table`);
- `contamination`: the CCL paper's diagnostics of semantic contamination (`ccl analyze`);
- `labels`: which labels look wrong, ranked, with a suggested fix (`ccl labels`), scored by `labels_scoring` and
  written by `labels_table`; `crossval` gives it the out-of-sample probabilities for the cleanlab comparison;
- `predict`: a trained run on new images (`ccl predict`) and its networks as safetensors (`ccl export`);
- `inference`: the checkpoint a run path names, and its networks' logits over a split.

Imports run from here into `ccl.train` (to restore and train runs), never the other way.
"""
