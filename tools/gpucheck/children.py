"""The checks that run inside a fresh child process (`tools/gpu_check.py --child NAME`): versions, the kernel
against its fp64 reference, device augmentation against the CPU, checkpoints read back."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import time
import traceback
from pathlib import Path

from gpucheck.settings import (
    AUG_FRAC_TOL, AUG_MEAN_TOL, AUG_PARAM_TOL, BREAK, INTERPRETER_MAX_N, KERNEL_TOL, MODES, REQUIRED, ROOT, TAU, Fail,
    Skip,
)  # fmt: skip
from gpucheck.run import atomic_write


# ---------------------------------------------------------------------------------------------------------------
# Child items (run inside a fresh process by `--child NAME`)
# ---------------------------------------------------------------------------------------------------------------


def child_versions(cfg: dict, cuda: bool) -> tuple[dict, list[str]]:
    import importlib
    import importlib.metadata as md
    import platform

    import torch

    def version(module: str, dist: str):
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # a broken install is a finding, not a crash
            return None if isinstance(e, ImportError) else f"import failed: {type(e).__name__}: {e}"
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return getattr(mod, "__version__", "?")

    d = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torchvision": version("torchvision", "torchvision"),
        "triton": version("triton", "triton"),
        "kornia": version("kornia", "kornia"),
        "webdataset": version("webdataset", "webdataset"),
        "dali": version("nvidia.dali", "nvidia-dali-cuda130"),
        "cpus": os.cpu_count(),
        "cuda_available": cuda,
        "gpu": None,
    }
    import ccl.train
    from ccl.train.methods import METHODS

    d["methods"] = list(METHODS)  # what the training items train (`items._method_specs`)
    d["ccl_source"] = str(Path(ccl.train.__file__).parent)
    d["ccl_code"] = str(Path(ccl.train.__file__).resolve().parent)
    d["install"] = os.environ.get("CCL_GPU_CHECK_INSTALL_REPORT", "")
    skipped = []
    if cuda:
        p = torch.cuda.get_device_properties(0)
        d["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count(),
                    "driver": nvidia_smi("driver_version")}
    else:
        skipped.append("GPU name and memory: no CUDA device")
    problems = [f"{m} is {d[m] or 'not installed'}" for m in REQUIRED if not d[m] or str(d[m]).startswith("import")]
    if problems:
        problems[-1] += " (fill .whl/ as the README's GPU section says)"
    if d["ccl_code"] != str(ROOT / "train"):
        problems.append(f"ccl imports from {d['ccl_code']}, not from this checkout ({ROOT})")
    if problems:
        raise Fail("; ".join(problems), d)
    return d, skipped


def nvidia_smi(field: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def child_kernel(cfg: dict, cuda: bool) -> tuple[dict, list[str]]:
    import torch
    import torch.nn.functional as F
    from ccl.train.losses import contrastive_triton as ct
    from ccl.train.losses.contrastive import pair_losses, reference_pair_losses

    dev = torch.device("cuda" if cuda else "cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    skipped, impls = [], ["torch"]
    if cuda:
        if ct.triton is None:
            raise Fail("triton is not importable, so the GPU kernel cannot run")
        if ct.interpreted():
            raise Fail("the Triton kernels were defined for the interpreter (TRITON_INTERPRET=1): unset it")
        impls.append("triton")
    else:
        skipped.append("compiled Triton kernels: need CUDA (the interpreter runs them on the CPU instead)")
        if ct.triton is not None and ct.interpreted():
            impls.append("triton")
        else:
            skipped.append("interpreted Triton: triton is not installed")
    d = 128 if cuda else 32  # the embedding width the training uses; smaller under the CPU interpreter

    def inputs(n, dtype):
        g = torch.Generator().manual_seed(n)
        a = F.normalize(torch.randn(4, n, d, generator=g), dim=-1)  # [K, N, D]
        c = F.normalize(torch.randn(4, n, d, generator=g), dim=-1)  # [K, N, D]
        labels = torch.randint(0, 10, (2, n), generator=g)  # [2, N] refurbished-label classes
        classes = torch.cat([torch.arange(n).expand(2, n), labels])  # [K, N]: ACL/VM, then CCLRL/MM, as CCL uses it
        w = torch.randn(2, 4, n, generator=g)  # [2, K, N] upstream gradient weights of ce and kl
        to = lambda t: t.to(dev, dtype).requires_grad_()
        return to(a), to(c), classes.to(dev), w.to(dev)

    def values_and_grads(fn, a, c, w):
        ce, kl = fn(a, c)  # [K, N] each
        da, dc = torch.autograd.grad((ce * w[0]).sum() + (kl * w[1]).sum(), [a, c])
        return ce.detach().double(), kl.detach().double(), da.double(), dc.double()

    if "bfloat16" not in cfg["kernel_dtypes"]:
        skipped.append("bf16: the full run checks it (training on CUDA autocasts to fp16)")
    cases = []
    ns = cfg["kernel_ns"]
    for n in ns:
        for dname in cfg["kernel_dtypes"]:
            # detach_target=False is the other compiled variant of the backward: once, at the smallest N, fp32.
            for detach in (True, False) if (n == min(ns) and dname == "float32") else (True,):
                a, c, classes, w = inputs(n, dtypes[dname])
                a64, c64 = a.detach().double().requires_grad_(), c.detach().double().requires_grad_()
                ref = functools.partial(reference_pair_losses, classes=classes, tau=TAU, detach_target=detach)
                want = values_and_grads(ref, a64, c64, w)
                for impl in impls:
                    if impl == "triton" and not cuda:
                        if n > INTERPRETER_MAX_N:
                            skipped.append(f"interpreted Triton at N={n}: the interpreter is for N <= "
                                           f"{INTERPRETER_MAX_N}")
                            continue
                        if dname == "bfloat16":
                            skipped.append("interpreted Triton in bf16: Triton's CPU interpreter computes tl.dot of "
                                           "bf16 operands wrongly (a 16x16 product is off by ~1e10), so bf16 Triton "
                                           "is checked compiled, on CUDA")
                            continue
                    t0 = time.perf_counter()
                    fn = functools.partial(pair_losses, classes=classes, tau=TAU, impl=impl, detach_target=detach)
                    got = values_and_grads(fn, a, c, w)
                    seconds = time.perf_counter() - t0
                    if "kernel_correctness" in BREAK:
                        got = (got[0] + 0.01,) + got[1:]
                    errs = _kernel_errors(got, want)
                    val_tol, grad_tol = KERNEL_TOL[dname]
                    ok = errs["value_err"] <= val_tol and max(errs["grad_rel_a"], errs["grad_rel_c"]) <= grad_tol
                    cases.append({"n": n, "d": d, "dtype": dname, "impl": impl, "detach_target": detach,
                                  "compiled": impl != "triton" or cuda, **errs, "value_tol": val_tol,
                                  "grad_tol": grad_tol, "seconds": round(seconds, 3), "ok": ok})
    details = {"device": dev.type, "tau": TAU, "cases": cases}
    bad = [c for c in cases if not c["ok"]]
    if bad:
        first = bad[0]
        raise Fail(f"{len(bad)} of {len(cases)} cases out of tolerance, e.g. {first['impl']} {first['dtype']} "
                   f"N={first['n']}: value error {first['value_err']:.2e}, gradient errors "
                   f"{first['grad_rel_a']:.2e}/{first['grad_rel_c']:.2e}", details)
    return details, sorted(set(skipped))


def _kernel_errors(got, want) -> dict:
    import torch

    ce, kl, da, dc = got
    ce0, kl0, da0, dc0 = want
    finite = all(bool(torch.isfinite(t).all()) for t in got)
    rel = lambda x, y: float((x - y).norm() / y.norm().clamp_min(1e-30))
    value = max(float((ce - ce0).abs().max()), float((kl - kl0).abs().max()))
    return {"value_err": value if finite else math.inf, "grad_rel_a": rel(da, da0) if finite else math.inf,
            "grad_rel_c": rel(dc, dc0) if finite else math.inf, "finite": finite}


def child_augment(cfg: dict, cuda: bool) -> tuple[dict, list[str]]:
    import torch
    from ccl.pipeline.augment import Augment

    dev = torch.device("cuda" if cuda else "cpu")
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    std_cpu = torch.tensor(std).view(1, 3, 1, 1)
    skipped = [] if cuda else ["the CUDA side: needs CUDA (the CPU draws and views were compared with themselves)"]
    cases, problems = [], []
    for style, n, in_hw, size in cfg["aug_cases"]:
        seed = 1234 + n
        x = _smooth_batch(n, in_hw, seed)  # uint8 [N, 3, H, W]
        x_cpu, x_dev = Augment.to_float(x), Augment.to_float(x.to(dev))
        aug_cpu = Augment(mean, std, size, style=style)
        aug_dev = Augment(mean, std, size, style=style).to(dev)
        draws, dev_repeat, dev_vs_cpu, pixels = {}, {}, {}, {}
        for view in ("weak", "strong", "contrastive"):

            def sample(aug, g, d, view=view, n=n, in_hw=in_hw):
                return getattr(aug, f"sample_{view}")(n, in_hw, generator=g, device=d)

            # The same seed in a CPU generator: the parameters are drawn on the CPU and moved to the device.
            p_cpu = sample(aug_cpu, torch.Generator().manual_seed(seed), "cpu")
            p_dev = sample(aug_dev, torch.Generator().manual_seed(seed), dev)
            draws[view] = _param_diffs(p_cpu, p_dev)
            # The loop seeds a generator on the run's device: it must repeat itself. Whether its stream is the CPU's
            # is recorded (CUDA's Philox and the CPU's Mersenne Twister differ, so it is not expected to be).
            g_dev = [sample(aug_dev, torch.Generator(device=dev).manual_seed(seed), dev) for _ in range(2)]
            dev_repeat[view] = _param_diffs(g_dev[0], g_dev[1])
            dev_vs_cpu[view] = all(v is True for v in _param_diffs(p_cpu, g_dev[0]).values())
            # The views from the same draws, in pixel-range units (the normalised ones times std).
            want = getattr(aug_cpu, f"apply_{view}")(x_cpu, p_cpu)
            got = getattr(aug_dev, f"apply_{view}")(x_dev, p_dev).float().cpu()
            if view != "weak":  # apply_weak stops before normalising
                want, got = want * std_cpu, got * std_cpu
            if "augment_device" in BREAK:
                got = got + 0.01
            diff = (got - want).abs()
            pixels[view] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                            "frac_over_1_255": float((diff > 1.0 / 255).float().mean()),
                            "finite": bool(torch.isfinite(got).all())}
        # The public path the loop calls, with autocast on around it as in a training step: float32, finite.
        with torch.autocast(dev.type, enabled=True):
            weak, strongs = aug_dev.views(x.to(dev), n_strong=2, generator=torch.Generator(device=dev).manual_seed(0))
        views_ok = all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) and t.shape == (n, 3, size, size)
                       for t in (weak, *strongs))
        cases.append({"style": style, "n": n, "input_hw": list(in_hw), "size": size, "device": dev.type,
                      "cpu_generator_draws": draws, "device_generator_repeats": dev_repeat,
                      "device_generator_matches_cpu_stream": dev_vs_cpu, "pixels": pixels,
                      "views_float32_finite": views_ok})
        tag = f"{style} (N={n}, {in_hw[0]}x{in_hw[1]} -> {size})"
        for view in draws:
            if not all(v is True for v in draws[view].values()):
                problems.append(f"{tag}: {view} draws from a CPU generator differ on {dev.type}: {draws[view]}")
            if not all(v is True for v in dev_repeat[view].values()):
                problems.append(f"{tag}: {view} draws from a {dev.type} generator do not repeat")
            s = pixels[view]
            if not s["finite"] or s["frac_over_1_255"] > AUG_FRAC_TOL or s["mean_abs"] > AUG_MEAN_TOL:
                problems.append(f"{tag}: the {view} view differs: {s}")
        if not views_ok:
            problems.append(f"{tag}: Augment.views under autocast is not float32, finite and of the expected shape")
    details = {"tolerance": {"frac_over_1_255": AUG_FRAC_TOL, "mean_abs": AUG_MEAN_TOL, "float_params": AUG_PARAM_TOL},
               "cases": cases,
               "note": "the loop draws from torch.Generator(device=the run's device): the same --seed draws other "
                       "augmentations on CUDA than on the CPU unless device_generator_matches_cpu_stream is true"}
    if problems:
        raise Fail("; ".join(problems)[:1500], details)
    return details, skipped


def _smooth_batch(n: int, hw, seed: int):
    """uint8 [N, 3, H, W] photo-like images (bilinear colour blobs + noise) from a seed."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 255  # [N, 3, 4, 4]
    img = F.interpolate(coarse, size=tuple(hw), mode="bilinear", align_corners=False)  # [N, 3, H, W]
    img = img + 8 * torch.randn(img.shape, generator=g)
    return img.round().clamp(0, 255).to(torch.uint8)


def _param_diffs(p, q, prefix: str = "") -> dict:
    """Every field of two parameter dataclasses (nested ones too): True when equal (integers and booleans exactly,
    floats within AUG_PARAM_TOL in their own units), else how they differ."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(p):
        a, b, key = getattr(p, f.name), getattr(q, f.name), prefix + f.name
        if dataclasses.is_dataclass(a):
            out |= _param_diffs(a, b, key + ".")
        elif a is None or b is None:
            out[key] = a is None and b is None
        elif a.shape != b.shape:
            out[key] = f"shapes {list(a.shape)} vs {list(b.shape)}"
        else:
            a, b = a.cpu(), b.cpu()
            tol = AUG_PARAM_TOL if a.is_floating_point() else 0.0
            err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
            out[key] = True if err <= tol else err
    return out


def child_checkpoints(paths: list[str]) -> dict:
    """On the CPU: what each checkpoint holds (method, scaler state, state-dict keys free of compile prefixes)."""
    import torch

    info = {}
    for p in paths:
        try:
            state = torch.load(p, map_location="cpu", weights_only=False)  # our own files, written by this run
        except Exception as e:  # reported as that run's finding
            info[p] = {"error": f"{type(e).__name__}: {e}"}
            continue
        scaler = state.get("scaler")
        keys = list(state.get("method", {}).keys()) if isinstance(state.get("method"), dict) else []
        info[p] = {
            "keys": sorted(state),
            "has_scaler": "scaler" in state,
            "scaler": {k: (float(v) if isinstance(v, (int, float)) else str(v)) for k, v in (scaler or {}).items()},
            "compile_prefixed_keys": sum("_orig_mod" in k for k in keys),
            "method_keys": len(keys),
            "epoch": state.get("epoch"),
        }
    return info


CHILD = {"versions": child_versions, "kernel_correctness": child_kernel, "augment_device": child_augment}


def child_main(name: str, out: Path, mode: str) -> int:
    import torch

    cuda = mode != "smoke" and torch.cuda.is_available()
    path = out / "items" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        details, skipped = CHILD[name](MODES[mode], cuda)
        result = {"status": "passed", "details": details, "skipped_parts": skipped}
    except Skip as e:
        result = {"status": "skipped", "reason": str(e)}
    except Fail as e:
        result = {"status": "failed", "reason": str(e), "details": e.details}
    except Exception as e:
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
                  "details": {"traceback": traceback.format_exc()[-3000:]}}
    atomic_write(path, json.dumps(result, indent=1, default=str) + "\n")
    return 0
