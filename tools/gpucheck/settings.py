"""Settings of tools/gpu_check.py: the modes (sizes, budgets), the tolerances, the items, and the two outcomes of
an item besides passing."""

from __future__ import annotations

import os
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
SELF = ROOT / "tools" / "gpu_check.py"  # the driver: children run it with --child

# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------

# Synthetic shard sets: name -> (side px, image format, train images, test images). Noise: 40% symmetric, so the
# label-confidence path (GMM, detection metrics) runs as on real noisy data.
_SETS_FULL = {
    "tiny32": (32, "png", 128, 64),  # the correctness runs: a few steps per epoch at batch 32
    "cifar32": (32, "png", 10240, 512),  # ResNet-18 throughput: 80 steps of 128 per epoch
    "animal64": (64, "jpg", 4096, 256),  # pipeline benchmark, Animal-10N-like
    "img224": (224, "jpg", 3072, 128),  # ResNet-50 throughput: 24 steps of 128 per epoch
}

# The training items' method specs: ALL_METHODS is every method of ccl.train.methods.METHODS (the one list of
# method names, as the versions item's child reports them; `_method_specs`), then "ccl-alternate" (ccl under the alternate schedule).
ALL_METHODS = "all"

MODES = {
    "full": dict(
        budget_s=450,  # the driver's budget; the wrapper's installs (seconds) come on top, 8 minutes in all
        sets=_SETS_FULL,
        kernel_ns=(128, 4096), kernel_dtypes=("float32", "bfloat16", "float16"),
        aug_cases=(("cifar", 64, (32, 32), 32), ("imagenet", 16, (180, 240), 224)),  # style, N, input HxW, size
        train_methods=ALL_METHODS,
        compile_methods=ALL_METHODS,
        steps_batch=32, steps_epochs=2, jobs_timeout_s=300,
        bench_kernel_ns=(128, 1024, 4096, 16384, 32768), bench_kernel_d=128,
        bench_train=(("resnet50", "img224", "joint"), ("resnet50", "img224", "alternate"),
                     ("resnet18", "cifar32", "joint")),
        # epoch 0 is the CE warm-up, epoch 1 CCL's first (it compiles the Triton kernels), epoch 2 is the one timed
        train_batch=128, train_epochs=3,
        pipeline_sets=("cifar32", "animal64", "img224"), pipeline_steps=30, pipeline_rounds=3,
        dali_sets=("animal64", "img224"),  # JPEGs: nvJPEG's formats (DALI decodes PNGs on its CPU threads)
    ),
    "quick": dict(
        budget_s=170,
        sets={"tiny32": _SETS_FULL["tiny32"], "cifar32": (32, "png", 5120, 256), "img224": (224, "jpg", 1536, 128)},
        kernel_ns=(128, 4096), kernel_dtypes=("float32", "float16"),  # fp16: the dtype of AMP on CUDA
        aug_cases=(("cifar", 64, (32, 32), 32), ("imagenet", 16, (180, 240), 224)),
        train_methods=ALL_METHODS,
        compile_methods=("ccl",),
        steps_batch=32, steps_epochs=2, jobs_timeout_s=150,
        bench_kernel_ns=(4096, 32768), bench_kernel_d=128,
        bench_train=(("resnet50", "img224", "joint"), ("resnet18", "cifar32", "joint")),
        train_batch=128, train_epochs=3,
        pipeline_sets=("cifar32", "img224"), pipeline_steps=20, pipeline_rounds=2,
        dali_sets=("img224",),
    ),
    "smoke": dict(
        budget_s=900,  # not a target: smoke skips nothing for time; a bound on a stuck run
        # img224 stands for the 224 px sets: any set over 64 px trains on 224 px crops, which costs the CPU most
        sets={"tiny32": (32, "png", 96, 32), "cifar32": (32, "png", 48, 16), "img224": (80, "jpg", 8, 8)},
        kernel_ns=(32, 128), kernel_dtypes=("float32", "bfloat16", "float16"),
        aug_cases=(("cifar", 16, (32, 32), 32), ("imagenet", 8, (60, 80), 64)),
        train_methods=ALL_METHODS,
        # torch.compile's graph capture and AOT autograd run for ccl; see SMOKE_COMPILE_BACKEND for the codegen.
        compile_methods=("ccl",),
        steps_batch=32, steps_epochs=2, jobs_timeout_s=240,
        bench_kernel_ns=(48,), bench_kernel_d=32,
        # resnet_tiny stands in for ResNet-50/18: the same loop and 224/32 px data paths, both schedules
        bench_train=(("resnet_tiny", "img224", "joint"), ("resnet_tiny", "cifar32", "alternate")),
        train_batch=16, train_epochs=2,  # a few steps per pass: small batches cost the CPU per step, not per image
        pipeline_sets=("cifar32", "img224"), pipeline_steps=2, pipeline_rounds=1,
        dali_sets=(),
    ),
}

# Rough seconds of each benchmark on one H100/H200-class GPU, for the budget: a benchmark starts only when the
# budget still holds this much. Guesses until a GPU run replaces them with measured figures.
ESTIMATE_S = {"bench_kernel": 45, "pipeline_set": 20, "dali_set": 20,
              ("resnet50", "joint"): 45, ("resnet50", "alternate"): 60,
              ("resnet18", "joint"): 30}

TAU = 0.5  # contrastive temperature of the kernel check (the training default)
# Kernel check tolerances against the fp64 reference on the same (rounded) inputs: (max absolute error of the ce
# and kl values, relative Frobenius error of each gradient). fp32 runs at IEEE precision (no TF32). bf16/fp16
# gradients come back in the input dtype and the Triton backward casts dS to it before its second product, so
# their error is of the order of that dtype's rounding (2^-8 for bf16, 2^-11 for fp16).
KERNEL_TOL = {"float32": (1e-3, 1e-4), "bfloat16": (1e-3, 2e-2), "float16": (1e-3, 4e-3)}
INTERPRETER_MAX_N = 32  # interpreted Triton (smoke) costs about a second per call at N = 32, and grows as N^2
# Pixel agreement of a CUDA view with the CPU view of the same draws, in units of the pixel range [0, 1]: at most
# AUG_FRAC_TOL of the values may differ by more than 1/255 (a nearest-neighbour warp picks a neighbouring source
# pixel where a coordinate rounds the other way; a quantising op, posterize or solarize's threshold, moves a value
# by a whole step where the two devices round it the other way: on the first H200 run 0.125% of the strong view's
# values differed, by at most 4/255, a 6-bit posterize step), and the mean absolute difference stays under
# AUG_MEAN_TOL. A wrong op or wrong draw differs on a large part of the image, far above either bound.
AUG_FRAC_TOL = 5e-3
AUG_MEAN_TOL = 5e-4
# Float parameters (crop boxes in px, op values in their units) are computed on the device from the same uniform
# draws, partly through exp/sqrt: equal up to float rounding.
AUG_PARAM_TOL = 1e-3
# Smoke: Inductor's C++ code generation for the CPU takes about 90 s for one tiny twin run on 2 cores, and it is not
# the GPU's code generator (Triton) anyway, so smoke compiles with AOT autograd and eager kernels: the same Dynamo
# graph capture and AOT autograd tracing that fail on unsupported code, without the codegen.
SMOKE_COMPILE_BACKEND = ">=0:aot_eager"

# The order they run in. The benchmarks go by value, so that a short budget costs the training figures last.
ITEMS = ("versions", "kernel_correctness", "augment_device", "train_amp", "train_compile", "resume_cpu",
         "bench_train", "bench_kernel", "bench_pipeline", "bench_dali")
CHECKS = ("versions", "kernel_correctness", "augment_device", "train_amp", "train_compile", "resume_cpu")
REQUIRED = ("kornia", "webdataset")  # declared dependencies that a bare GPU image may lack (the wrapper installs)
BREAK = set(filter(None, os.environ.get("CCL_GPU_CHECK_BREAK", "").split(",")))  # deliberately broken checks


class Skip(Exception):
    """The item (or a part of it) cannot run here; the message says why."""


class Fail(Exception):
    """The item ran and found something wrong."""

    def __init__(self, reason: str, details: dict | None = None):
        super().__init__(reason)
        self.details = details or {}
