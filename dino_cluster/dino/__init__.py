"""The DINO method in plain PyTorch: networks, loss, schedules, optimisation, augmentation.

No I/O, no cluster code, no YAML: tensors and plain arguments in, tensors out. Import what
you need from its module (model, loss, schedules, optim, augment, keys); this package file
imports nothing, so `dino_cluster.dino.keys` costs no timm.
"""
