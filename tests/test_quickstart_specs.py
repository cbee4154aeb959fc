"""The shipped quickstart and its evaluation spec fit together.

Whether the quickstart's teacher clearly beats a randomly initialised backbone (issue 7) is
measured by `python benchmarks/quickstart_knn.py`, which trains the shipped recipe and prints
the trained, random-init and raw-pixel k-NN top-1 side by side. Today it does not (about 61 %
against 60 %), so that comparison is not asserted here; see the README's Evaluation section."""

from __future__ import annotations

from pathlib import Path

from dino_cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
EVAL_SPEC = REPO / "jobs" / "eval-knn.yaml"


def test_eval_spec_matches_the_quickstart_model() -> None:
    # The eval spec rebuilds the backbone from its own model section and loads the
    # checkpoint strictly, so the two must describe the same backbone.
    train, ev = load_spec(QUICKSTART), load_spec(EVAL_SPEC)
    backbone = ("arch", "patch_size", "img_size", "depth", "embed_dim", "num_heads")
    assert {k: getattr(ev.model, k) for k in backbone} == {
        k: getattr(train.model, k) for k in backbone
    }
    assert ev.method.crops.global_size == train.method.crops.global_size
    assert ev.run.seed == train.run.seed  # `--init random` is then the run's own start
