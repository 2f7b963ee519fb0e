"""The Markdown summary of a check run."""

from __future__ import annotations



# ---------------------------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------------------------


def _summary(r: dict) -> str:
    """One line for an item in the Markdown table."""
    d = r.get("details") or {}
    if r["status"] != "passed":
        return (r.get("reason") or "")[:160].replace("|", "/").replace("\n", " ")
    name = r["name"]
    if name == "versions":
        return f"torch {d['torch']}, CUDA {d['cuda_runtime']}, Triton {d['triton']}, Kornia {d['kornia']}"
    if name == "kernel_correctness":
        cases = d["cases"]
        values = max(c["value_err"] for c in cases)
        grads = max(max(c["grad_rel_a"], c["grad_rel_c"]) for c in cases)
        return f"{len(cases)} cases; largest value error {values:.1e}, largest relative gradient error {grads:.1e}"
    if name == "augment_device":
        frac = max(s["frac_over_1_255"] for c in d["cases"] for s in c["pixels"].values())
        return f"draws equal; largest fraction of values off by more than 1/255: {frac:.1e}"
    if name in ("train_amp", "train_compile"):
        return ", ".join(f"{x['method']} {x['seconds']:.0f} s" for x in d["runs"])
    if name == "resume_cpu":
        return f"{d['epochs_logged']} epochs after resuming on the CPU; eval top-1 {d['eval']['ens_top1']:.1f}"
    return f"{len(d.get('rows', []))} measurements"


def markdown(rep: dict) -> str:
    """A short summary: the items, then the figures in the form of the README's GPU section."""
    gpu = rep.get("gpu") or {}
    where = f"{gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else "CPU (no GPU)"
    verdict = "passed" if rep["passed"] else "FAILED: " + ", ".join(rep["failed"])
    state = "" if rep["finished"] else " (unfinished)"
    lines = [f"# GPU check: {verdict}", "",
             f"{rep['started']}, {where}, mode `{rep['mode']}`, {rep['seconds']:.0f} s{state} "
             f"({rep['cpu_s']:.0f} CPU s, load average {rep['load_average'][0]}), "
             f"commit {str(rep.get('git_sha'))[:10]}",
             "", "| item | status | s | CPU s | summary |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r.get('cpu_s', 0):.0f} | {_summary(r)} |"
              for r in rep["items"]]
    rows = {r["name"]: (r.get("details") or {}).get("rows") or [] for r in rep["items"]}

    train = [x for x in rows["bench_train"] if "images_per_s" in x]
    if train:
        lines += ["", "Training, CCL under AMP, last epoch (images/s per pass; per epoch counts each image once):", "",
                  "| networks | px | batch | schedule | images/s | per epoch | data-wait | peak GPU MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in train:
            mem = x.get("gpu_mem_peak_mb") or x.get("gpu_mem_used_peak_mb_nvidia_smi")
            lines.append(f"| twin {x['arch']} | {x['train_px']} | {x['batch']} | {x['schedule']} | "
                         f"{x['images_per_s']:,.0f} | {x['epoch_images_per_s']:,.0f} | {100 * x['data_wait']:.1f}% | "
                         f"{'-' if mem is None else f'{mem:,.0f}'} |")
    if rows["bench_kernel"]:
        lines += ["", "Contrastive kernel, forward + backward, K = 4:", "",
                  "| N | impl | ms | peak extra MiB |", "|---|---|---|---|"]
        for x in rows["bench_kernel"]:
            mem = x.get("peak_extra_mib")
            lines.append(f"| {x['n']} | {x['impl']} | {x['time_ms']:.2f} | {'-' if mem is None else f'{mem:,.0f}'} |")
    pipe = [x for x in rows["bench_pipeline"] + rows["bench_dali"] if x.get("images_per_s")]
    if pipe:
        lines += ["", "Pipeline, shards to augmented batches:", "",
                  "| set | px | backend | device | images/s |", "|---|---|---|---|---|"]
        lines += [f"| {x['dataset']} | {x['image_size']} | {x['backend']} | {x['device']} | "
                  f"{x['images_per_s']:,.0f} |" for x in pipe]
    skips = [f"- {r['name']}: {s}" for r in rep["items"] for s in r.get("skipped_parts", [])]
    if skips:
        lines += ["", "Not run here:", "", *skips]
    return "\n".join(lines) + "\n"
