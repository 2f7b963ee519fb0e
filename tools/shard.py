#!/usr/bin/env python
"""Convert a raw data set into WebDataset shards plus manifest.json (the format ccl reads).

    python tools/shard.py digits OUT
    python tools/shard.py cifar10 path/to/cifar-10-batches-py OUT --noise sym --noise-rate 0.5 --seed 1
    python tools/shard.py cifar10 path/to/cifar-10-batches-py OUT --labels CIFAR-10_human.pt --label-key worse_label

The engine lives in ccl.pipeline.convert; this file only parses arguments and reports.
"""

from __future__ import annotations

import argparse
import sys

FORMAT_HELP = """\
formats (SRC layout):
  digits     scikit-learn's bundled 8x8 digits, upscaled to 32x32 RGB; no SRC (leave it out or pass '-')
  cifar10    cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)
  cifar100   cifar-100-python/ (train, test, meta)
  animal10n  training/ and testing/ folders of <label>_<id>.jpg
  webvision  WebVision 1.0: info/train_filelist_google.txt (and _flickr), info/val_filelist.txt,
             val_images_256/; --num-classes 50 for mini-WebVision; --imagenet-val adds split val_imagenet
  folder     ROOT/<class>/<image>; with ROOT/train/ and ROOT/test/ (or val/) those are the splits,
             otherwise --test-fraction of each class is held out (seeded)

Output: OUT/{split}-NNNNNN.tar, a DALI index .idx per tar, OUT/manifest.json (written last, with the sha256
of every tar and index file). Undecodable images are skipped and listed in the manifest (--strict: an
error); images that decode in PIL but fail the loaders' structure check (or are not JPEG/PNG) are stored as
PNG and listed under 'reencoded'. A file list naming a missing image is an error (--skip-missing: skipped
and listed). Bad input exits with status 2. Check a converted set with `ccl check OUT`.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/shard.py",
        usage="python tools/shard.py FORMAT [SRC] OUT [options]",
        description="Convert a raw data set into WebDataset shards plus manifest.json.",
        epilog=FORMAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ccl.pipeline.convert import FORMATS
    from ccl.pipeline.convert.noise import NOISE_TYPES

    p.add_argument("format", choices=FORMATS)
    p.add_argument("paths", nargs="+", metavar="[SRC] OUT", help="source folder (none for digits) and output folder")
    p.add_argument("--labels", metavar="FILE",
                   help="train labels from a file: CIFAR-N *_human.pt, DivideMix/RoLR .json, TCL .npy")
    p.add_argument("--label-key", metavar="KEY", help="the array to take from --labels (e.g. worse_label, noisy_label)")
    p.add_argument("--noise", default="none", choices=NOISE_TYPES,
                   help="sym (DivideMix/RoLR/TCL): int(R*N) relabelled from all classes, true one included; sym_exclusive: never")
    p.add_argument("--noise-rate", type=float, default=0.0, metavar="R", help="noise rate in [0, 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the split and order never depend on it)")
    p.add_argument("--num-classes", type=int, metavar="N", help="webvision: keep classes < N (50: mini-WebVision)")
    p.add_argument("--shard-size", type=int, default=5000, metavar="N", help="samples per shard (default 5000)")
    p.add_argument("--workers", type=int, metavar="N", help="encoder processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete shard set in OUT")
    p.add_argument("--strict", action="store_true", help="an undecodable image is an error, not a skipped sample")
    p.add_argument("--skip-missing", action="store_true",
                   help="skip (and list) file-list entries whose image is missing instead of failing")
    p.add_argument("--max-image-bytes", type=int, default=None, metavar="N",
                   help="skip (and list) an image file larger than N bytes (default 256 MiB); only regular files "
                   "are read: devices, FIFOs and sockets are skipped and listed")
    p.add_argument("--allow-empty-classes", action="store_true",
                   help="folder: keep class folders that hold no images (an error otherwise)")
    p.add_argument("--test-fraction", type=float, default=0.2, metavar="F",
                   help="folder without train/ and test/: held-out fraction per class (default 0.2)")
    p.add_argument("--webvision-lists", default="google", metavar="google[,flickr]",
                   help="webvision train file lists to use (default google, as in mini-WebVision)")
    p.add_argument("--imagenet-val", metavar="DIR",
                   help="webvision: ILSVRC12 val images (with val.txt, or class folders) as split val_imagenet")
    p.add_argument("--imagenet-labels", metavar="FILE", help="label file for --imagenet-val (default DIR/val.txt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ccl import errors
    from ccl.errors import UserError

    try:
        from ccl.pipeline.convert import ConvertOptions, convert

        if len(args.paths) > 2:
            raise UserError(f"expected [SRC] OUT, got {len(args.paths)} paths: {' '.join(args.paths)}")
        src, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
        opts = ConvertOptions(
            labels=args.labels,
            label_key=args.label_key,
            noise=args.noise,
            noise_rate=args.noise_rate,
            seed=args.seed,
            num_classes=args.num_classes,
            shard_size=args.shard_size,
            workers=args.workers,
            overwrite=args.overwrite,
            strict=args.strict,
            skip_missing=args.skip_missing,
            test_fraction=args.test_fraction,
            webvision_lists=tuple(s.strip() for s in args.webvision_lists.split(",") if s.strip()),
            imagenet_val=args.imagenet_val,
            imagenet_labels=args.imagenet_labels,
            progress=not args.no_progress and sys.stderr.isatty(),
            allow_empty_classes=args.allow_empty_classes,
            **({} if args.max_image_bytes is None else {"max_image_bytes": args.max_image_bytes}),
        )
        result = convert(args.format, src, out, opts, log=lambda s: print(s, file=sys.stderr))
    except errors.Stop as e:  # bad input (exit 2), or a conversion that cannot go on: one line, its exit code
        print(errors.message(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: OUT has no manifest.json; rerun to convert again", file=sys.stderr)
        return 130
    m = result["manifest"]
    counts = ", ".join(f"{name} {s['count']}" for name, s in m["splits"].items())
    noise = m["noise"]
    rate = "" if noise.get("actual_rate") is None else f", measured noise rate {noise['actual_rate']:.4f}"
    print(f"{m['dataset']}: {counts} images, {m['num_classes']} classes, noise {noise['type']}{rate} -> {out}")
    print(f"converted {result['images']} images in {result['seconds']:.2f} s: {result['images_per_s']:.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
