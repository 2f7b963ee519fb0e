"""The parts of tools/gpu_check.py, the driver: settings, procs (the job runner), run (a run's state), data
(synthetic shards, the import shim), children (checks in child processes), items (the checks and the
benchmarks), report (the summary)."""
