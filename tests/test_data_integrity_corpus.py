"""Our own corpus of malformed shards (tests/corpus/shards/, written by its make_corpus.py) run
through the training stream, the evaluation reader and `dino-cluster data inspect`: every case
ends in a counted skip with the expected reason, or in one of the documented errors with a
message (ValueError for an unusable index or too few samples, DataError when no sample at all
can be used); good samples next to the bad ones are still delivered; no traceback, nothing
unpickled, nothing executed.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin

from dino_cluster.data import DataError, build_train_stream
from dino_cluster.data import shards as shards_module
from dino_cluster.data.labelled import build_labelled_reader

CORPUS = Path(__file__).resolve().parent / "corpus" / "shards"
_spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
assert _spec is not None and _spec.loader is not None
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)


def _keys(*names: str) -> set[str]:
    return set(names)


def _range(prefix: str, n: int) -> set[str]:
    return {f"{prefix}{i:02d}" for i in range(n)}


# case -> (bad samples in training, bad samples in evaluation, keys training delivers, keys
# evaluation delivers). Training takes images without a usable label, unlabelled.
Expect = tuple[dict[str, int], dict[str, int], set[str], set[str]]


def both(bad: dict[str, int], keys: set[str]) -> Expect:
    """The same outcome in training and evaluation (every good sample is labelled)."""
    return bad, bad, keys, keys


CUT = {"truncated_shard": 1}
OK2 = _range("ok", 2)
OK1 = _keys("ok00")
EXPECT: dict[str, Expect] = {
    "truncated-no-end.tar": both(CUT, _range("cut", 4)),
    "cut-mid-member.tar": both(CUT, _range("cut", 2)),
    "cut-in-header.tar": both(CUT, _range("cut", 2)),
    "member-size-lies.tar": (CUT, {**CUT, "missing_label": 1}, OK2 | {"liar"}, OK2),
    "corrupt-header.tar": both(CUT, OK2),
    "links.tar": both({"link_member": 2}, OK2),
    "devices.tar": both({"unsafe_member": 3}, OK2),
    "escaping-names.tar": both({"unsafe_member": 3}, OK2),
    "pickle-members.tar": ({}, {"missing_label": 1}, _keys("p00", "p01"), _keys("p00")),
    "only-non-images.tar": both({"missing_image": 3}, set()),
    "empty.tar": both({}, set()),
    "zero-bytes.tar": both({"unreadable_shard": 1}, set()),
    "bomb-png.tar": both({"image_too_large": 1}, OK1),
    "huge-dims-jpeg.tar": both({"image_too_large": 1}, OK1),
    "truncated-jpeg.tar": both({"bad_image": 1}, OK1),
    "not-an-image.tar": both({"bad_image": 1}, OK1),
    "eps-as-jpg.tar": both({"bad_image": 1}, OK1),
    "tiff-as-jpg.tar": both({"bad_image": 1}, OK1),
    "bad-labels.tar": ({"bad_label": 8}, {"bad_label": 8}, _range("l", 9), _keys("l08")),
    "duplicate-keys.tar": (
        {"duplicate_key": 3},
        {"duplicate_key": 3, "missing_label": 2},
        _range("d", 5),
        _range("d", 3),
    ),
    "gzip-ok.tgz": both({}, _range("gz", 3)),
    # the 1 MiB member is read (under the default bound) and is no image; the PNG is a bomb
    "bomb-member.tar.gz": both({"bad_image": 1, "image_too_large": 1}, OK1),
    "truncated.tar.gz": both(CUT, _range("gz", 5)),
    "corrupt.tar.gz": both({"unreadable_shard": 1}, set()),
}

# index cases: (what the error says) when the index cannot be used at all
INDEX_ERRORS = {
    "index-escape": "invalid shard name '../outside.tar'",
    "index-huge-count": "not a plausible count",
    "index-huge": "index larger than",
    "index-not-json": "not valid JSON",
    "index-xz": "compressed in a format that is not read",
}
BASE = "base.tar"  # six good labelled samples beside each case
BASE_KEYS = {f"base{i:02d}" for i in range(6)}


@pytest.fixture(autouse=True)
def nothing_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The pickles write a marker file if unpickled (in any process: workers inherit the
    environment); Ghostscript, which PIL would run for an EPS, must never be reached."""
    marker = tmp_path / "UNPICKLED"
    monkeypatch.setenv(corpus.ENV_MARKER, str(marker))

    def no_ghostscript(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("Ghostscript was about to run on shard bytes")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    monkeypatch.setattr(shards_module, "MAX_INDEX_BYTES", 8 << 10)  # index-huge is over it
    yield
    assert not marker.exists(), "a pickle from a shard was unpickled"


def _transform(img) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    arr = np.asarray(img.convert("RGB").resize((4, 4)), dtype=np.float32)
    return [torch.from_numpy(arr).permute(2, 0, 1).contiguous()]


def _dataset(tmp_path: Path, case: str, base: bool = True) -> Path:
    folder = tmp_path / "data"
    folder.mkdir(parents=True)
    shutil.copyfile(CORPUS / case, folder / case)
    if base:
        (folder / BASE).write_bytes(corpus.tar(corpus.good("base", 6)))
    return folder


def _train(url: Path, workers: int = 0) -> tuple[set[str], dict[str, int]]:
    stream = build_train_stream(
        str(url), transform=_transform, global_batch=1, rank=0, world_size=1,
        num_workers=workers, seed=1, shuffle_buffer=0,
    )  # fmt: skip
    keys = {k for b in stream.epoch_batches(0) for k in b.keys}
    return keys, stream.bad_samples


def _evaluate(url: Path, workers: int = 0) -> tuple[list[str], dict[str, int]]:
    reader = build_labelled_reader(
        str(url), transform=lambda img: _transform(img)[0], batch_size=3, num_workers=workers
    )
    batches = list(reader)
    assert all(int(b.labels.min()) >= 0 for b in batches)
    return [k for b in batches for k in b.keys], reader.bad


def test_committed_corpus_is_what_the_generator_writes() -> None:
    files = corpus.build()
    on_disk = {
        p.relative_to(CORPUS).as_posix(): p.read_bytes()
        for p in CORPUS.rglob("*")
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    }
    assert sorted(on_disk) == sorted(files)
    assert [n for n in files if on_disk[n] != files[n]] == []
    assert sum("/" not in n for n in files) >= 20  # shard files
    assert max(len(d) for d in files.values()) < 32 << 10  # small files only
    assert set(EXPECT) == {n for n in files if "/" not in n}
    assert set(INDEX_ERRORS) | {"index-lies"} == {n.split("/")[0] for n in files if "/" in n}


def test_the_pickle_payload_would_run_if_unpickled(tmp_path: Path) -> None:
    """So that "no marker file" below means "never unpickled", not "a dud payload"."""
    marker = tmp_path / "ran"
    done = subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
        input=corpus.pickle_payload(),
        env={"PATH": "/usr/bin:/bin", corpus.ENV_MARKER: str(marker)},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "unpickled"


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_case_through_training_and_evaluation(tmp_path: Path, case: str) -> None:
    train_bad, eval_bad, train_keys, eval_keys = EXPECT[case]
    url = _dataset(tmp_path, case)
    keys, bad = _train(url)
    assert bad == train_bad
    assert {k.split("/", 1)[1] for k in keys if k.startswith(case)} == train_keys
    assert {k.split("/", 1)[1] for k in keys if k.startswith(BASE)} == BASE_KEYS  # still trains
    seen, bad = _evaluate(url)
    assert bad == eval_bad
    assert sorted(seen) == sorted(
        {f"{case}/{k}" for k in eval_keys} | {f"{BASE}/{k}" for k in BASE_KEYS}
    )


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_case_alone_gives_samples_or_a_documented_error(tmp_path: Path, case: str) -> None:
    url = _dataset(tmp_path, case, base=False)
    try:
        keys, _ = _train(url)
    except ValueError as exc:  # no sample counted at all
        assert "fewer than one global batch" in str(exc)
        assert not EXPECT[case][2]
    except DataError as exc:  # samples counted, none usable
        assert "no decodable sample" in str(exc)
        assert not EXPECT[case][2]
    else:
        assert {k.split("/", 1)[1] for k in keys} == EXPECT[case][2]


def test_cases_through_data_workers(tmp_path: Path) -> None:
    """The same outcome when data workers read (the pickles among them)."""
    for case in ("pickle-members.tar", "bad-labels.tar", "duplicate-keys.tar", "truncated.tar.gz"):
        url = _dataset(tmp_path / case, case)
        keys, bad = _train(url, workers=2)
        assert bad == EXPECT[case][0]
        seen, bad = _evaluate(url, workers=2)
        assert bad == EXPECT[case][1]


def test_index_cases(tmp_path: Path) -> None:
    for case, message in INDEX_ERRORS.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            _train(CORPUS / case)
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            _evaluate(CORPUS / case)
    # index-lies: a.tar has 2 of the 6 samples it claims (4 counted short), b.tar 3 where it
    # claims 1 (all three still read)
    keys, bad = _train(CORPUS / "index-lies")
    assert bad == {"short_shard": 4}
    assert {k.split("/", 1)[1] for k in keys} == _range("a", 2) | _range("b", 3)
    seen, bad = _evaluate(CORPUS / "index-lies")
    assert bad == {"short_shard": 4} and len(seen) == 5


def _inspect(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", "data", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("case", "code", "says"),
    [
        ("bad-labels.tar", 1, "bad_label"),
        ("cut-mid-member.tar", 1, "shard broken"),
        ("duplicate-keys.tar", 1, "duplicate_key"),
        ("gzip-ok.tgz", 0, "decoded 3/3"),
        ("zero-bytes.tar", 1, "shard broken"),
        ("links.tar", 1, "link_member"),
        ("index-escape", 2, "invalid shard name"),
        ("index-xz", 2, "not read"),
    ],
)
def test_inspect_reports_without_a_traceback(
    tmp_path: Path, case: str, code: int, says: str
) -> None:
    path = CORPUS / case if (CORPUS / case).is_dir() else _dataset(tmp_path, case, base=False)
    done = _inspect(path)
    out = done.stdout + done.stderr
    assert done.returncode == code, out
    assert says in out and "Traceback" not in out
