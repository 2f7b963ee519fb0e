"""The ``dali`` loader backend: `fn.readers.webdataset` over the shards and their index files, then
`fn.decoders.image` ("mixed", i.e. nvJPEG, on a GPU; "cpu" without one), yielding the same `Batch` as the
torch backend.

Epochs and ranks:
- DALI splits the sample list into `num_shards` contiguous parts, part `shard_id` per rank: the same
  [N*r/R, N*(r+1)/R) rule as the torch backend, so every sample is on exactly one rank.
- `pad_last_batch=True` with the iterator's `LastBatchPolicy.PARTIAL` drops the padding, so each sample is
  read exactly once per epoch; `stick_to_shard=True` keeps DALI from wandering into the next part.
- The pipeline is rebuilt for every epoch: the tar order is permuted from (seed, epoch), identically on
  all ranks, so each rank's part holds different samples every epoch, and the reader's shuffle seed is
  derived from (seed, epoch, rank), so an epoch's order does not depend on the epochs read before it
  (resuming gives the same order). Building costs one pass over the index files, about as much as
  reading them.
- The batches are re-sliced to the torch backend's batch sizes (`loader.batch_sizes`), so every rank takes
  the same number of steps and no batch is a single sample.

Shuffling: `random_shuffle` draws from a buffer of `initial_fill` samples read in tar order, so it is local
(the DALI documentation says so); with the tar order permuted per epoch it mixes well when the converter
wrote samples in no particular class order. Samples grouped by class inside the tars shuffle poorly here;
the torch backend's global permutation has no such limit.

Damaged data: DALI's decoder cannot skip a sample. Some damage makes it fail the whole pipeline ("Failed to
decode sample #5"); other damage (bytes that are no known image format, a JPEG whose markers are garbage)
crashes the process with a segmentation fault in DALI 2.4's CPU decoder. So DALI is only handed what was
checked first: `make_loader` scans the split before the first pass (`ShardSet.scan`: the sha256 of every tar
and index file, both copies of the labels, and the structure of every image), and the damaged samples are
left out of the index files DALI reads. Those are written, without the damaged samples' lines, to a private
temporary folder; DALI then never reads those bytes. The samples are reported in `skipped_samples` like the
torch backend's. What the structure check cannot see (damage inside a JPEG's entropy-coded data) decodes to
other pixels, as it does with every decoder; the checksums are what catch it. `ccl check --backend dali`
decodes every image with DALI's own decoder, each shard in a child process, for a pre-flight beyond that.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ccl.errors import UserError
from ccl.pipeline.batch import Batch
from ccl.pipeline.decode import short_side
from ccl.pipeline.plan import Loader, rechunk
from ccl.pipeline.shards import ShardSet

READER = "Reader"
DEFAULT_INITIAL_FILL = 4096  # shuffle buffer, in samples (encoded bytes: ~12 MB at 32 px, ~450 MB at 224 px)


def _import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:  # the wheel exists for Linux x86_64 only
        raise UserError(f"the dali backend needs NVIDIA DALI (pip install nvidia-dali-cuda130): {e}") from None
    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


class DaliLoader(Loader):
    """See the module docstring; constructed by `ccl.pipeline.loader.make_loader(..., backend="dali")`.

    `num_workers` sets DALI's thread count; `strict` makes a damaged sample found by the scan a UserError.
    """

    def __init__(
        self,
        shardset: ShardSet,
        split: str,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        num_workers: int,
        seed: int,
        rank: int,
        world_size: int,
        load_size,
        strict: bool,
        initial_fill: int = DEFAULT_INITIAL_FILL,
    ):
        self._dali = _import_dali()
        scan = shardset.scan(split, verify=True)
        super().__init__(shardset, split, batch_size=batch_size, train=train, device=device, seed=seed, rank=rank,
                         world_size=world_size, load_size=load_size, strict=strict, damaged=scan.damaged)
        # Fixed-size sets hold images of the manifest's size (the converter writes them so, and the scan leaves out
        # any of another size), so resize only on request.
        self.resize = self.variable or tuple(shardset.image_size) != self.hw
        self.root = shardset.root
        self.tars = [str(p) for p in shardset.shards(split)]
        self.idx_files = self._index_files(shardset, split)
        self.initial_fill = max(1, min(int(initial_fill), self.num_samples))
        self.num_threads = max(1, int(num_workers))
        self.gpu = device.type == "cuda"
        self.device_id = None  # DALI's CPU-only mode
        if self.gpu:
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        self.epoch = 0

    def _index_files(self, shardset: ShardSet, split: str) -> list[str]:
        """The index files DALI reads: the shards' own, or copies without the damaged samples' lines."""
        files = [str(p) for p in shardset.index_files(split)]
        if not self.damaged:
            return files
        tmp = Path(tempfile.mkdtemp(prefix="ccl-dali-index-"))
        weakref.finalize(self, shutil.rmtree, tmp, True)  # removed with the loader (or at exit)
        bad = {d.index for d in self.damaged}
        out = []
        for rec, src in zip(shardset.manifest["splits"][split]["shards"], files):
            lines = Path(src).read_bytes().decode("ascii").split("\n")  # verified by the scan
            body = [ln for ln in lines[1:] if ln.strip()]
            kept = [ln for k, ln in enumerate(body) if rec["first_index"] + k not in bad]
            if not kept:  # DALI refuses an empty index; no sample of this shard is read (see _pipeline)
                out.append(None)
                continue
            dst = tmp / Path(src).name
            dst.write_text(f"{lines[0].split()[0]} {len(kept)}\n" + "".join(ln + "\n" for ln in kept))
            out.append(str(dst))
        return out

    def _pipeline(self):
        fn, pipeline_def, types, _, _ = self._dali
        order = np.arange(len(self.tars))
        if self.train:  # the same permutation on every rank: the parts stay disjoint
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.tars))
        order = [i for i in order if self.idx_files[i] is not None]  # shards left with no readable sample
        paths = [self.tars[i] for i in order]
        index_paths = [self.idx_files[i] for i in order]
        # DALI wants a non-negative 63-bit seed; derive it from (seed, epoch, rank) reproducibly.
        dali_seed = int(np.random.default_rng([self.seed, self.epoch, self.rank]).integers(2**62))
        h, w = self.hw

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=dali_seed,
            prefetch_queue_depth=2,
        )
        def pipe():
            jpegs, labels = fn.readers.webdataset(
                paths=paths,
                index_paths=index_paths,
                ext=["jpg;png", "labels.i64"],
                dtypes=[types.UINT8, types.INT64],
                missing_component_behavior="error",
                shard_id=self.rank,
                num_shards=self.world_size,
                random_shuffle=self.train,
                initial_fill=self.initial_fill,
                pad_last_batch=True,
                stick_to_shard=True,
                name=READER,
            )
            images = fn.decoders.image(jpegs, device="mixed" if self.gpu else "cpu", output_type=types.RGB)
            if self.variable:  # keep the aspect: short side to 8/7 of the crop, then centre crop
                images = fn.resize(images, resize_shorter=short_side(self.hw), antialias=True)
                images = fn.crop(images, crop=(h, w))
            elif self.resize:
                images = fn.resize(images, size=(h, w), antialias=True)
            images = fn.transpose(images, perm=[2, 0, 1])  # HWC -> CHW, uint8
            if self.gpu:
                labels = labels.gpu()
            return images, labels

        p = pipe()
        p.build()
        return p

    def _batches(self) -> Iterator[Batch]:
        _, _, _, DALIGenericIterator, LastBatchPolicy = self._dali
        try:
            it = DALIGenericIterator(
                [self._pipeline()],
                ["images", "labels"],
                reader_name=READER,
                last_batch_policy=LastBatchPolicy.PARTIAL,  # with pad_last_batch: drop the padding
                auto_reset=False,
            )
            for out in it:
                d = out[0]
                lab = d["labels"]  # int64 [N, 3]: index, label, clean (-1 unknown)
                yield Batch(images=d["images"], index=lab[:, 0], label=lab[:, 1], clean=lab[:, 2])
        except RuntimeError as e:
            # DALI's message repeats boilerplate around one useful line ("Failed to decode sample #5 : ...").
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if ln.startswith("Failed")), lines[-1] if lines else "")
            raise UserError(
                f"DALI failed reading split '{self.split}': {detail} (`ccl check {self.root} --backend dali` lists the "
                "images DALI cannot decode; the torch backend skips them)"
            ) from None

    def __iter__(self) -> Iterator[Batch]:
        self._begin_pass()
        # The iterator hands out tensors that own their memory (copies, or DLPack views DALI keeps alive), so
        # slices of them stay valid after the next batch is produced.
        for b in rechunk(self._batches(), self.sizes):
            yield b.to(self.device, non_blocking=True)
