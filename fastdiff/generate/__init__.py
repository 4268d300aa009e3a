"""``fastdiff generate``: many images into a folder, sharded over torch.distributed ranks, resumable.

    fastdiff generate --model digits-ddpm --num-images 50000 --outdir out/ --batch 256
    fastdiff generate --nproc 8 --model digits-ddpm -n 50000 --outdir out/ --batch 256        # 8 local workers
    torchrun --nproc_per_node=8 -m fastdiff generate --model digits-ddpm -n 50000 --outdir out/ --batch 256

``--num-images`` (or ``-n``) is the flag torchrun's own parser cannot mistake (the older ``--num`` still works where
torchrun does not parse the line: torchrun reads it as an abbreviation of its ``--numa-binding``). ``--nproc N``
starts N workers on this machine through PyTorch's elastic launcher (:func:`distributed.launch`), exactly as torchrun
would, so a machine with several GPUs needs no torchrun line.

The package: :mod:`.job` (seeds, arguments, the job), :mod:`.outdir` (file names, the manifest, writing an image),
:mod:`.distributed` (the process group, collectives, the local launcher).

**Which image is which.** Image i is made from its own CPU ``torch.Generator`` seeded with :func:`image_seed` (S, i)
(a numpy ``SeedSequence(S, spawn_key=(i,))``, a stable algorithm), and the pipelines draw each row's noise — the
initial x_T and the noise of stochastic samplers (DDPM, Euler ancestral, DDIM with η > 0) at every step — from that
row's generator; class-conditional models get class i mod num_classes. So image i is the same sample whatever the
number of ranks or the batch size. Bit for bit: BLAS/oneDNN pick their kernels by tensor shape, so the same row
computed in batches of different sizes can differ in the last float32 bits. On the CPU the pipeline therefore runs
under :func:`fastdiff.batch_invariant` (linear layers and matrix products on fastdiff's own CPU GEMM, one FMA chain
per element; convolutions in fixed chunks of rows), and the files are byte-identical for any ``--batch``, thread count
and number of ranks on one machine and CPU code path (tested: ``--batch`` 1, 3, 4, 8 and 10 and 1 vs 2 processes
in tests/test_generate.py; ``--batch`` 1, 5 and 12, 1 vs 2 threads and 1 vs 2 processes under each of the six ISA-cap
rows of tests/test_isa_matrix.py the test machine can run). The manifest records what fastdiff knows of the code path
(:func:`fastdiff.batch_invariance.cpu_code_path`) and a resumed run on another one is warned about.
On CUDA the mode is off by default (``--batch-invariant`` turns it on; cuBLAS/cuDNN invariance is not verified
there): files are then identical across ranks at the same ``--batch``, which every call
keeps fixed (min(batch, num) rows, a rank's last call padded with throw-away rows). The manifest records the batch and
the mode; a resumed run with another one is allowed and warned about.

**Files.** One per image: ``outdir/000123.png`` (8-bit grayscale, RGB or RGBA) or ``outdir/000123.npz`` (``image``:
the unquantised float32 (H, W, C) output in [0, 1]; ``index``; ``class_label`` for class-conditional models). One file
per image, not per batch, so neither ``--batch`` nor the number of ranks changes the folder, and a resumed run knows
exactly which images are missing. Each file is written under a temporary name in the same folder
(``.000123.png.<pid>.tmp``, :func:`fastdiff.files.write_atomic`), fsynced and renamed with ``os.replace``: a final
name always holds a complete file.

**Resuming.** Rerunning the same command skips the finished indices (left-over temporaries are deleted) and makes
the rest. ``outdir/manifest.json``, written atomically by rank 0 before any image, records the model (and a digest of
its files), sampler, steps, seed, guidance, classes, count, format and fastdiff version; a rerun whose settings differ
(the batch size and the number of ranks are not settings) is refused with a ValueError (CLI: one line, exit code 2;
under torchrun every rank prints it and torchrun itself exits with 1).

**Ranks.** Under torchrun or ``--nproc`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/MASTER_PORT set) each process
joins a process group — NCCL on GPUs (rank r uses cuda:LOCAL_RANK), gloo on the CPU — unless one is already
initialised, in which case it is used and left alone. Rank 0 checks the folder and writes the manifest, then
broadcasts the missing indices; rank r makes missing[r::world]. Rank 0 shows one progress bar for the whole job (the
images made by all ranks, summed with an all_reduce per batch). The output folder must be on a file system every
rank sees.
"""

from fastdiff.generate.job import SEEDING, check_arguments, format_summary, generate, image_generator, image_seed
from fastdiff.generate.outdir import FORMATS, MANIFEST, image_name

__all__ = ["generate", "check_arguments", "image_seed", "image_generator", "image_name", "format_summary", "FORMATS",
           "MANIFEST", "SEEDING"]
