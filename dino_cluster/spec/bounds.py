"""Upper bounds on spec values that become memory, time or a C integer.

A spec is untrusted input: `optim.epochs: 100000000` passed validation and then numpy tried to
allocate 12 GiB for the schedules. Each bound below is far above any published recipe (so no
real run is refused) and low enough that what it sizes cannot take a machine down. The reason
for each is next to it. The one product that cannot be bounded here is the run's length in
steps, epochs x iters_per_epoch: the dataset size is only known when training starts (see
MAX_TOTAL_STEPS).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# -- time: epochs and steps ----------------------------------------------------------------
# Published DINO/iBOT/MAE recipes run 100-1600 epochs; 10,000 leaves room for small-data
# runs with many short epochs. Per-epoch schedules (teacher temperature) are this long.
MAX_EPOCHS = 10_000
# Every per-iteration schedule is one float64 array of epochs x iters_per_epoch values (lr,
# weight decay, momentum, teacher temperature: 32 bytes a step). 10^7 steps is 320 MB, and
# ~25x ImageNet-1k for 300 epochs at batch 1024 (375k steps); DINOv2 trains 625k. Used for
# every field counted in steps; the training start must check epochs x iters_per_epoch
# against it too (the dataset size is unknown here).
MAX_TOTAL_STEPS = 10_000_000
# Retries and restarts that each wait or re-run something: past this a run is not retrying,
# it is stuck.
MAX_RETRIES = 10_000

Epochs = Annotated[int, Field(ge=0, le=MAX_EPOCHS)]
PositiveEpochs = Annotated[int, Field(gt=0, le=MAX_EPOCHS)]
Steps = Annotated[int, Field(ge=0, le=MAX_TOTAL_STEPS)]
PositiveSteps = Annotated[int, Field(gt=0, le=MAX_TOTAL_STEPS)]
Retries = Annotated[int, Field(ge=0, le=MAX_RETRIES)]

# -- memory: batch, crops, model -----------------------------------------------------------
# DINO uses 1024 (up to 4096 in ablations); contrastive work reaches 64k. 2^20 is 16x that.
MAX_GLOBAL_BATCH = 1 << 20
# Crop and model input sides in pixels: DINO uses 224/96, high-resolution fine-tuning 518+.
# 4096 px is a 48 MiB float32 crop: one is fine, a batch of them is the per-rank budget below.
MAX_IMAGE_SIDE = 4096
# DINO uses 6-10 local crops; each crop is a forward pass of the student per step.
MAX_LOCAL_CROPS = 64
# uint8 RGB crops one rank holds per step: (global_batch / world) x (2 x global^2 + n_local x
# local^2) x 3 bytes. ViT-S/16 on one GPU at batch 1024 is 0.6 GB; 16 GiB is a cap on nonsense
# (batch 10^6 of 4096-pixel crops), not a check that it fits a GPU.
MAX_RANK_CROP_BYTES = 16 << 30
# ViT depth / width / heads: ViT-22B is 48 blocks, width 6144, 48 heads.
MAX_DEPTH = 256
MAX_WIDTH = 16_384
MAX_HEADS = 256
MAX_PATCH = 256
# DINO's head: out_dim 65536 (DINOv2 128k), hidden 2048, bottleneck 256. The last layer is
# bottleneck x out_dim weights, so both are bounded.
MAX_OUT_DIM = 1 << 20
MAX_HIDDEN_DIM = 16_384
MAX_BOTTLENECK_DIM = 4_096
# PIL's own decompression-bomb error is at ~179 M pixels; 2^28 (805 MB decoded RGB) is above
# it for very large scans, and a decoded image this size is held by each data worker.
MAX_IMAGE_PIXELS = 1 << 28
# Each data worker holds `shuffle_buffer` samples (encoded bytes, ~110 KB for ImageNet):
# webdataset recipes use 1,000-5,000; 100,000 is ~11 GB per worker, already too much.
MAX_SHUFFLE_BUFFER = 100_000
# Data workers are processes per rank: a node has at most a few hundred cores.
MAX_DATA_WORKERS = 256
# Checkpoints kept (each a full model and optimizer state): a disk-sized count.
MAX_KEEP_LAST = 10_000

Side = Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]

# -- the cluster ----------------------------------------------------------------------------
# The largest training clusters are ~10^4 nodes of 8 GPUs; 64 GPUs a node allows for
# multi-instance GPUs. Processes per node without GPUs: a CPU node's cores.
MAX_NODES = 10_000
MAX_GPUS_PER_NODE = 64
MAX_PROCS_PER_NODE = 1024
MAX_WORKERS = MAX_NODES * MAX_GPUS_PER_NODE
# CPUs of one process or pod, and memory in GB of one job or pod (a 64 TB node is large).
MAX_CPUS = 1024
MAX_MEM_GB = 65_536
# Timeouts and intervals in seconds (floats): a week. Past it a run is not waiting, it is lost.
MAX_WAIT_S = 7 * 24 * 3600.0
# SLURM wall-clock limits in minutes: a year (sites cap far lower).
MAX_TIME_MIN = 365 * 24 * 60
# Kubernetes integer fields are int32.
MAX_INT32 = 2**31 - 1
# A run seed is added to the rank and passed to torch.manual_seed (a 64-bit value).
MAX_SEED = 2**62

Nodes = Annotated[int, Field(gt=0, le=MAX_NODES)]
Cpus = Annotated[int, Field(gt=0, le=MAX_CPUS)]
MemGB = Annotated[int, Field(gt=0, le=MAX_MEM_GB)]
WaitSeconds = Annotated[float, Field(gt=0, le=MAX_WAIT_S)]
Minutes = Annotated[int, Field(gt=0, le=MAX_TIME_MIN)]

# -- evaluation and metrics -----------------------------------------------------------------
# k-NN neighbours (DINO reports 10/20/100/200) select top-k of the bank per query.
MAX_KNN_K = 10_000
MAX_KNN_KS = 16
# Linear probe epochs (DINO: 100) over the labelled set, each a full pass.
MAX_LINEAR_EPOCHS = 10_000
# GPUs of one evaluation process.
MAX_EVAL_GPUS = 64
KnnKs = Annotated[list[Annotated[int, Field(gt=0, le=MAX_KNN_K)]], Field(max_length=MAX_KNN_KS)]
# Metrics every N steps: beyond the longest run it only means "never".
MAX_LOG_EVERY = MAX_TOTAL_STEPS

# -- floats -----------------------------------------------------------------------------------
# Finite is checked for every float (allow_inf_nan=False on every section); these bound what
# is finite but still overflows later. Learning rates: the peak is base_lr x global_batch /
# 256, so base_lr 1e308 is inf after scaling; 10 is ~10^4 x any AdamW recipe.
MAX_LR = 10.0
# Weight decay (DINO: 0.04 -> 0.4) and gradient clipping norms (DINO: 3.0).
MAX_WEIGHT_DECAY = 10.0
MAX_CLIP = 1e6
# Softmax temperatures (DINO: 0.04-0.1, k-NN 0.07): logits are divided by them, so a tiny one
# overflows to inf in bf16/fp32 before the softmax.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 10.0

Temperature = Annotated[float, Field(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)]
LearningRate = Annotated[float, Field(gt=0, le=MAX_LR)]
