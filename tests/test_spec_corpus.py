"""Malformed job specs (tests/corpus/specs/ and files only a test can make: a FIFO, /dev/zero,
a 2 MB file): each is refused with exit status 2 and one line per problem naming the file and
the field, never a traceback, never a hang, and never a credential repeated.

Every file goes through `load_spec` and through the command line (`dino-cluster validate` in
a subprocess with a timeout); the credential cases also through `--show`, `render` and
`submit --dry-run`, whose output would otherwise publish the secret.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from dino_cluster.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "corpus" / "specs"
QUICKSTART = REPO / "jobs" / "quickstart.yaml"

# What the credential files carry: none of it may appear in any output.
SECRETS = (
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
    "corpus-secret-bucket",
    "corpus-secret-host",
)

# file -> what the one error line must contain (besides the file name).
EXPECT: dict[str, tuple[str, ...]] = {
    "bytes-garbage.yaml": ("cannot read", "binary"),
    "bytes-latin1.yaml": ("cannot read", "not UTF-8"),
    "bytes-nul.yaml": ("cannot read", "NUL"),
    "bytes-utf16-bom.yaml": ("cannot read", "UTF-16"),
    "creds-checkpoint-url.yaml": ("checkpoint.url", "credentials", "not shown"),
    "creds-data-url.yaml": ("data.url", "credentials", "not shown"),
    "creds-endpoint-url.yaml": ("data.storage.endpoint_url", "credentials", "not shown"),
    "creds-presigned-query.yaml": ("data.url", "not shown"),
    "creds-ray-address.yaml": ("launcher.ray.address", "credentials"),
    "creds-ray-storage-path.yaml": ("launcher.ray.storage_path", "credentials"),
    "creds-run-storage.yaml": ("run.storage", "credentials", "not shown"),
    "creds-runtime-env-pip.yaml": ("launcher.ray.runtime_env", "credentials", "pip[0]"),
    "creds-slurm-setup.yaml": ("launcher.slurm.setup", "credentials"),
    "creds-user-only.yaml": ("evaluation.train_url", "credentials"),
    "creds-wrong-type.yaml": ("data.url", "valid string", "not shown"),
    "float-huge-base-lr.yaml": ("optim.base_lr", "less than or equal to 10"),
    "float-huge-timeout.yaml": ("launcher.ray.connect_timeout_s", "less than or equal"),
    "float-inf-base-lr.yaml": ("optim.base_lr", "finite"),
    "float-inf-ray-timeout.yaml": ("launcher.ray.startup_timeout_s", "finite"),
    "float-nan-teacher-temp.yaml": ("method.teacher_temp", "finite"),
    "float-neg-inf-in-list.yaml": ("method.crops.global_scale[0]", "finite"),
    "float-overflow-literal.yaml": ("optim.min_lr", "finite"),
    "int-5000-digits.yaml": ("optim.epochs", "5000 digits"),
    "int-crop-memory.yaml": ("GiB of crops", "optim.global_batch"),
    "int-crop-size-huge.yaml": ("method.crops.global_size", "less than or equal to 4096"),
    "int-epochs-100m.yaml": ("optim.epochs", "less than or equal to 10000"),
    "int-epochs-10e12.yaml": ("optim.epochs", "less than or equal to 10000"),
    "int-epochs-float-1e308.yaml": ("optim.epochs", "valid integer"),
    "int-global-batch-huge.yaml": ("optim.global_batch", "less than or equal"),
    "int-knn-k-huge.yaml": ("evaluation.knn_k[1]", "less than or equal"),
    "int-n-local-huge.yaml": ("method.crops.n_local", "less than or equal to 64"),
    "int-nodes-huge.yaml": ("launcher.nodes", "less than or equal"),
    "int-num-workers-huge.yaml": ("data.num_workers", "less than or equal to 256"),
    "int-out-dim-huge.yaml": ("model.out_dim", "less than or equal"),
    "int-warmup-teacher-epochs.yaml": ("method.warmup_teacher_temp_epochs", "optim.epochs"),
    "url-endpoint-not-http.yaml": ("data.storage.endpoint_url", "http://"),
    "url-file-with-host.yaml": ("data.url", "host is not allowed"),
    "url-gs-scheme.yaml": ("data.url", "'gs:'", "s3://"),
    "url-https-checkpoint.yaml": ("checkpoint.url", "'https:'", "file://"),
    "url-pipe.yaml": ("data.url", "pipe:"),
    "url-s3-no-bucket.yaml": ("data.url", "bucket"),
    "yaml-alias-count.yaml": ("aliases", "line"),
    "yaml-billion-laughs.yaml": ("launcher.ray.runtime_env", "expands to more than"),
    "yaml-binary-tag.yaml": ("tag", "binary"),
    "yaml-custom-tag.yaml": ("tag", "!include"),
    "yaml-deep-flow.yaml": ("nested deeper than 32",),
    "yaml-duplicate-key.yaml": ("duplicate key 'epochs'", "line 5"),
    "yaml-non-string-key.yaml": ("not a string",),
    "yaml-not-a-mapping.yaml": ("mapping",),
    "yaml-python-tag.yaml": ("tag", "python/object"),
    "yaml-recursive-alias.yaml": ("launcher.ray.runtime_env", "alias"),
    "yaml-tabs.yaml": ("invalid YAML", "line 4"),
    "yaml-two-documents.yaml": ("single document",),
}


def test_every_corpus_file_has_an_expectation() -> None:
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(EXPECT)
    assert len(EXPECT) >= 25
    assert all(p.stat().st_size < 64 * 1024 for p in CORPUS.iterdir()), "keep the corpus small"


def _check_message(text: str, source: str, needles: tuple[str, ...]) -> None:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert source in lines[0], text
    for needle in needles:
        assert needle in lines[0], f"{needle!r} missing: {text}"
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} repeated: {text}"


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_corpus_file_through_load_spec(name: str) -> None:
    path = CORPUS / name
    with pytest.raises(SpecError) as err:
        load_spec(path)
    _check_message(str(err.value), str(path), EXPECT[name])
    assert str(err.value).startswith(f"{path}: ")


def _cli(*args: str, cwd: Path = CORPUS, timeout: float = 60) -> subprocess.CompletedProcess:
    """`dino-cluster ARGS` in a subprocess that cannot hang the test run or eat the machine
    (old code read /dev/zero whole and blocked on a FIFO)."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    try:
        return subprocess.run(
            [sys.executable, "-m", "dino_cluster.cli", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, COLUMNS="400"),
            preexec_fn=limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"dino-cluster {' '.join(args)} still running after {timeout} s")


def _refused(done: subprocess.CompletedProcess, source: str, needles: tuple[str, ...]) -> None:
    what = f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.returncode == 2, what
    assert "Traceback" not in done.stdout + done.stderr, what
    assert done.stderr.startswith("error: "), what
    _check_message(done.stderr, source, needles)
    for secret in SECRETS:
        assert secret not in done.stdout, what


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_corpus_file_through_the_command_line(name: str) -> None:
    _refused(_cli("validate", name), name, EXPECT[name])


CREDS = sorted(n for n in EXPECT if n.startswith("creds-"))


@pytest.mark.parametrize("name", CREDS)
def test_credentials_never_reach_show_render_or_submit(name: str) -> None:
    # What printed the secret before: validate --show, the sbatch script, the KubeRay
    # ConfigMap (spec.resolved.yaml is written from the same validated spec).
    for args in (
        ("validate", name, "--show"),
        ("render", name, "--backend", "slurm"),
        ("render", name, "--backend", "kuberay", "--set", "launcher.kuberay.image=r/i:1"),
        ("submit", name, "--dry-run"),
    ):
        done = _cli(*args)
        _refused(done, name, EXPECT[name])


# -- files only a test can make ------------------------------------------------------------


def _load_in_child(path: Path, timeout: float = 60) -> str:
    """load_spec(path) in a child with a timeout and a memory limit: what it raised, in one
    string ("SpecError: ..."), so a regression hangs or swaps nothing."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from dino_cluster.spec import SpecError, load_spec\n"
        "try:\n"
        "    load_spec(sys.argv[1])\n"
        "    print('loaded')\n"
        "except SpecError as exc:\n"
        "    print(f'SpecError: {exc}')\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_spec({path}) still running after {timeout} s")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    out = _load_in_child(fifo, timeout=30)
    assert out.startswith(f"SpecError: {fifo}: ") and "FIFO" in out, out
    _refused(_cli("validate", str(fifo), timeout=30), str(fifo), ("FIFO",))


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_a_device_is_refused_before_it_is_read(device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    out = _load_in_child(Path(device), timeout=30)
    assert out.startswith(f"SpecError: {device}: ") and "a device" in out, out
    _refused(_cli("validate", device, timeout=30), device, ("a device",))


def test_a_link_to_a_device_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "spec.yaml"
    link.symlink_to("/dev/zero")
    out = _load_in_child(link, timeout=30)
    assert "a device" in out, out


def test_folder_missing_and_unreadable_files(tmp_path: Path, monkeypatch) -> None:
    _refused(_cli("validate", str(tmp_path), cwd=tmp_path), str(tmp_path), ("a folder",))
    missing = tmp_path / "nope.yaml"
    _refused(_cli("validate", str(missing), cwd=tmp_path), str(missing), ("file not found",))
    locked = tmp_path / "locked.yaml"
    locked.write_text("data: {url: x}\n")
    locked.chmod(0)
    if os.geteuid() != 0:  # root reads it anyway
        _refused(_cli("validate", str(locked), cwd=tmp_path), str(locked), ("permission",))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as patched:
        patched.setattr(os, "open", denied)
        with pytest.raises(SpecError, match=r"locked\.yaml: cannot read: permission denied$"):
            load_spec(locked)


def test_a_2mb_file_is_refused_without_reading_it_whole(tmp_path: Path, monkeypatch) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("data: {url: x}\n" + "# padding\n" * 200_000)
    _refused(_cli("validate", str(big), cwd=tmp_path), str(big), ("larger than 1048576",))
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    with monkeypatch.context() as patched:
        patched.setattr(os, "read", counting_read)
        with pytest.raises(SpecError, match="larger than"):
            load_spec(big)
    assert sum(reads) <= (1 << 20) + 1


def test_deep_block_nesting_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("".join(" " * i + f"k{i}:\n" for i in range(1000)))
    _refused(_cli("validate", str(deep), cwd=tmp_path), str(deep), ("nested deeper than 32",))


# -- the same limits through --set ---------------------------------------------------------

SET_CASES = [
    ("optim.base_lr=.inf", ("--set optim.base_lr", "finite")),
    ("optim.base_lr=-.inf", ("--set optim.base_lr", "finite")),
    ("method.student_temp=.nan", ("--set method.student_temp", "finite")),
    ("optim.min_lr=1e400", ("--set optim.min_lr", "finite")),
    ("optim.epochs=100000000", ("optim.epochs", "less than or equal to 10000")),
    ("optim.epochs=" + "9" * 5000, ("--set optim.epochs", "5000 digits")),
    ("optim.max_steps=1000000000000", ("optim.max_steps", "less than or equal")),
    ("launcher.ray.runtime_env=" + "[" * 100 + "]" * 100, ("--set", "nested deeper")),
    (
        "run.storage=s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY@b/x",
        ("run.storage", "credentials"),
    ),  # fmt: skip
    ("checkpoint.url=file://corpus-secret-host/ckpt", ("checkpoint.url", "host")),
    ("s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY@b", ("KEY=VALUE",)),
    (".".join(["a"] * 100) + "=1", ("--set", "dotted parts")),
]


@pytest.mark.parametrize("item", SET_CASES, ids=[c[0][:40] for c in SET_CASES])
def test_set_values_are_bounded_too(item: tuple[str, tuple[str, ...]]) -> None:
    override, needles = item
    with pytest.raises(SpecError) as err:
        load_spec(QUICKSTART, [override])
    _check_message(str(err.value), str(QUICKSTART), needles)
    done = _cli("validate", str(QUICKSTART), "--set", override, "--show", cwd=REPO)
    _refused(done, str(QUICKSTART), needles)
