"""Evaluation of checkpoints (k-NN, linear probe) and the queue that runs them.

knn.py      weighted k-NN on streamed features (bank never held whole; rank-sharded)
linear.py   linear probe on frozen features
features.py backbones, feature recipes, loading teacher weights, cross-rank gathers
runner.py   evaluate one checkpoint (`python -m dino_cluster.evaluate.runner`)
queue.py    exclusive claims with leases + status records in the checkpoint store
submit.py   Submitter protocol: local subprocess, inline callable
watcher.py  every committed checkpoint evaluated exactly once per kind
cli.py      `dino-cluster eval knn|linear|watch`
"""
