"""Multi-crop augmentation (2 global + N local views with the paper's photometrics).

reference.py    the paper's pipeline: PIL + torchvision, one image at a time (`data.augment:
                reference`), and the evaluation transform
batched.py      the same distributions, photometric ops batched over a worker's chunk, or on
                the training device (`data.augment: batched | gpu`); batched_ops.py: the ops
fast.py         the reference's ops bit-exact per operation as compiled kernels
                (fast_kernels.py, numba) with libjpeg-turbo decode (`data.augment: fast`, and
                the CPU side of the GPU path)
"""
