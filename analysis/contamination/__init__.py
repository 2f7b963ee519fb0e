"""ccl.analysis.contamination: the CCL paper's diagnostics of semantic contamination (`ccl analyze`).

- `ccl.contamination` (outside this package, since training-time tracking uses it too): the measures as pure
  functions of arrays (Eq. 4, Fig. 2b, Fig. 3, Table 6, Table 8, noise detection);
- `taxonomy`: class trees for the LCA distance (built-in CIFAR-10/100, Animal-10N, digits; files; WordNet offline);
- `report`: `analyze(runs, out)` writes analysis.json and the self-contained report.html, from the logits and
  embeddings `ccl.train.track.forward_arrays` collects;
- `cli`: the Typer command and `register(app)`.

Nothing is imported here: `ccl` registers the command through `cli` on every invocation, and `report` loads
matplotlib and the trainer, which only `ccl analyze` needs.
"""
