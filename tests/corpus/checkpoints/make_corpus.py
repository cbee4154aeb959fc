"""Writes the malformed-checkpoint corpus next to this file (run once; the output is committed).

Each case is a checkpoint root `<case>/` with step folders the way a bucket could hold them
after a bug, a bad upload or a hostile writer: every one must end in "no usable checkpoint"
or a fallback to the good step 1, never in code running or a traceback.

    python tests/corpus/checkpoints/make_corpus.py
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FORMAT = "dino-cluster-checkpoint/1"


class _RunsCode:
    """A pickle that would create a marker file if anything ever unpickled it."""

    def __reduce__(self):  # noqa: ANN204
        return (exec, ("open('UNPICKLED-MARKER', 'w').write('ran')",))


def _tensor_bytes(value: object) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _good_state(v: float) -> dict[str, bytes]:
    return {
        "teacher": _tensor_bytes({"backbone.w": torch.full((4, 4), v)}),
        "meta": _tensor_bytes({"step": int(v), "world_size": 1}),
    }


def _step(root: Path, step: int, objects: dict[str, bytes], manifest: object | None) -> None:
    folder = root / f"step-{step:09d}"
    folder.mkdir(parents=True)
    for name, data in objects.items():
        (folder / name).write_bytes(data)
    if manifest is not None:
        text = manifest if isinstance(manifest, str | bytes) else json.dumps(manifest)
        (folder / "manifest.json").write_bytes(text.encode() if isinstance(text, str) else text)


def _manifest(step: int, state: dict[str, bytes], **over: object) -> dict:
    doc = {
        "format": FORMAT,
        "step": step,
        "time": 1.0e9 + step,
        "world_size": 1,
        "meta": {},
        "objects": [
            {"name": f"{k}.pt", "key": k, "size": len(v), "sha256": hashlib.sha256(v).hexdigest()}
            for k, v in state.items()
        ],
    }
    doc.update(over)
    return doc


def _case(name: str, build) -> None:  # noqa: ANN001
    root = HERE / name
    shutil.rmtree(root, ignore_errors=True)
    good = _good_state(1.0)
    _step(root, 1, {f"{k}.pt": v for k, v in good.items()}, _manifest(1, good))
    build(root)


def main() -> None:
    bad = _good_state(2.0)
    files = {f"{k}.pt": v for k, v in bad.items()}

    def put(root: Path, manifest: object, objects: dict[str, bytes] | None = None) -> None:
        _step(root, 2, files if objects is None else objects, manifest)

    _case("manifest-not-json", lambda r: put(r, "{not json"))
    _case("manifest-wrong-format", lambda r: put(r, _manifest(2, bad, format="other/9")))
    _case("manifest-step-mismatch", lambda r: put(r, {**_manifest(2, bad), "step": 7}))
    _case("manifest-no-objects", lambda r: put(r, _manifest(2, bad, objects=[])))
    _case("manifest-escaping-name", lambda r: put(r, _manifest(2, bad, objects=[
        {"name": "../../evil.pt", "size": 1, "sha256": "0" * 64}])))  # fmt: skip
    _case("manifest-negative-size", lambda r: put(r, _manifest(2, bad, objects=[
        {"name": "teacher.pt", "size": -5, "sha256": "0" * 64}])))  # fmt: skip
    _case("manifest-meta-not-object", lambda r: put(r, _manifest(2, bad, meta=[1, 2])))
    _case("object-missing", lambda r: put(r, _manifest(2, bad), {"meta.pt": files["meta.pt"]}))
    truncated = {"teacher.pt": files["teacher.pt"][:40], "meta.pt": files["meta.pt"]}
    _case("object-truncated", lambda r: put(r, _manifest(2, bad), truncated))
    flipped = bytearray(files["teacher.pt"])
    flipped[len(flipped) // 2] ^= 0xFF
    flipped_files = {**files, "teacher.pt": bytes(flipped)}
    _case("object-flipped-byte", lambda r: put(r, _manifest(2, bad), flipped_files))
    code = pickle.dumps(_RunsCode())
    evil = {"teacher": code, "meta": bad["meta"]}
    evil_files = {f"{k}.pt": v for k, v in evil.items()}
    _case("object-pickle-that-runs-code", lambda r: put(r, _manifest(2, evil), evil_files))
    nan = {"teacher": _tensor_bytes({"backbone.w": torch.full((4, 4), float("nan"))}),
           "meta": bad["meta"]}  # fmt: skip
    _case("object-nan-weights", lambda r: put(r, _manifest(2, nan),
                                              {f"{k}.pt": v for k, v in nan.items()}))  # fmt: skip
    junk = {"teacher": b"this is not a torch file", "meta": bad["meta"]}
    _case("object-not-torch", lambda r: put(r, _manifest(2, junk),
                                            {f"{k}.pt": v for k, v in junk.items()}))  # fmt: skip
    _case("no-manifest-at-all", lambda r: put(r, None))
    _case("manifest-only", lambda r: put(r, _manifest(2, bad), {}))


if __name__ == "__main__":
    main()
