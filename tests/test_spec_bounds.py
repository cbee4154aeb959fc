"""Spec values are bounded where they become memory or time, floats are finite, URLs carry no
credentials and only schemes storage can open, and SpecError text stays one line per problem
with nothing secret in it (dino_cluster/spec/bounds.py, urls.py, strict_yaml.py, load.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dino_cluster.spec import JobSpec, SpecError, load_spec, spec_from_dict, strict_yaml
from dino_cluster.spec import bounds as B
from dino_cluster.spec.urls import has_credentials, redact

REPO = Path(__file__).resolve().parents[1]
KEY, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"


def doc(**sections) -> dict:
    out = {"data": {"url": "data/none/index.json"}}
    for name, value in sections.items():
        out[name] = value
    return out


def refused(d: dict, *needles: str) -> str:
    with pytest.raises(SpecError) as err:
        spec_from_dict(d, "t.yaml")
    text = str(err.value)
    for needle in needles:
        assert needle in text, text
    assert KEY not in text and SECRET not in text, text
    return text


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_are_inside_every_bound(path: Path) -> None:
    spec = load_spec(path)
    assert spec.optim.epochs <= B.MAX_EPOCHS and spec.optim.global_batch <= B.MAX_GLOBAL_BATCH


# -- floats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(
    ("section", "field", "where"),
    [
        ("optim", {"base_lr": None}, "optim.base_lr"),
        ("optim", {"clip_grad": None}, "optim.clip_grad"),
        ("method", {"student_temp": None}, "method.student_temp"),
        ("method", {"crops": {"local_scale": [None, 0.4]}}, "method.crops.local_scale[0]"),
        ("launcher", {"ray": {"startup_timeout_s": None}}, "launcher.ray.startup_timeout_s"),
        ("evaluation", {"knn_temperature": None}, "evaluation.knn_temperature"),
    ],
)
def test_non_finite_floats_are_refused_in_strict_mode(value, section, field, where) -> None:
    # Dicts built in code (Ray, KubeRay) skip the YAML reader: pydantic refuses them itself.
    def fill(node):
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return value if node is None else node

    refused(doc(**{section: fill(field)}), where, "finite")


def test_finite_floats_still_validate_strictly() -> None:
    spec = spec_from_dict(doc(optim={"base_lr": 1e-3, "min_lr": 0}))
    assert spec.optim.min_lr == 0.0
    refused(doc(optim={"base_lr": "1e-3"}), "optim.base_lr", "valid number")


# -- integers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "value", "where"),
    [
        ("optim", {"epochs": 10**12}, "optim.epochs"),
        ("optim", {"epochs": B.MAX_EPOCHS + 1}, "optim.epochs"),
        ("optim", {"max_steps": B.MAX_TOTAL_STEPS + 1}, "optim.max_steps"),
        ("optim", {"warmup_epochs": 10**9}, "optim.warmup_epochs"),
        ("optim", {"global_batch": B.MAX_GLOBAL_BATCH * 2}, "optim.global_batch"),
        ("method", {"crops": {"local_size": 8192}}, "method.crops.local_size"),
        ("method", {"crops": {"n_local": 65}}, "method.crops.n_local"),
        ("model", {"out_dim": B.MAX_OUT_DIM + 1}, "model.out_dim"),
        ("model", {"depth": 10_000}, "model.depth"),
        ("model", {"embed_dim": 10**6}, "model.embed_dim"),
        ("model", {"num_heads": 4096}, "model.num_heads"),
        ("model", {"img_size": 10**5}, "model.img_size"),
        ("data", {"url": "x", "num_workers": 257}, "data.num_workers"),
        ("data", {"url": "x", "shuffle_buffer": 10**7}, "data.shuffle_buffer"),
        ("checkpoint", {"keep_last": 10**6}, "checkpoint.keep_last"),
        ("evaluation", {"knn_k": [10**6]}, "evaluation.knn_k[0]"),
        ("evaluation", {"linear_epochs": 10**6}, "evaluation.linear_epochs"),
        ("metrics", {"log_every_steps": 10**12}, "metrics.log_every_steps"),
        ("launcher", {"nodes": 10_001}, "launcher.nodes"),
        ("launcher", {"gpus_per_node": 65}, "launcher.gpus_per_node"),
        ("launcher", {"procs_per_node": 1025}, "launcher.procs_per_node"),
        ("launcher", {"ray": {"connect_timeout_s": 1e7}}, "launcher.ray.connect_timeout_s"),
        ("launcher", {"slurm": {"time_min": 10**9}}, "launcher.slurm.time_min"),
        ("launcher", {"kuberay": {"ttl_seconds_after_finished": 2**31}}, "ttl_seconds"),
        ("run", {"seed": 2**64}, "run.seed"),
    ],
)
def test_integers_that_become_memory_or_time_are_bounded(section, value, where) -> None:
    refused(doc(**{section: value}), where, "less than or equal")


def test_the_bounds_admit_the_largest_real_recipes() -> None:
    # ViT-g-sized model, 1600 epochs (MAE), batch 4096 on 64 nodes x 8 GPUs, 2x224 + 10x96.
    spec = spec_from_dict(
        doc(
            model={
                "arch": "vit_giant_patch14_224",
                "patch_size": 14,
                "depth": 40,
                "embed_dim": 1536,
                "num_heads": 24,
                "out_dim": 131072,
            },  # fmt: skip
            method={"crops": {"n_local": 10, "local_size": 98}, "warmup_teacher_temp_epochs": 30},
            optim={"epochs": 1600, "global_batch": 4096, "warmup_epochs": 40},
            launcher={"nodes": 64, "gpus_per_node": 8},
        )
    )
    assert spec.launcher.world_size == 512


def test_crops_times_batch_per_rank_is_bounded() -> None:
    big = {"global_size": 2048, "local_size": 1024, "n_local": 10}
    text = refused(
        doc(
            method={"crops": big},
            optim={"global_batch": 65536, "warmup_epochs": 0},
            model={"patch_size": 16},
        ),  # fmt: skip
        "GiB of crops",
    )
    assert "(top level)" in text
    # The same batch spread over enough workers is fine.
    spec_from_dict(
        doc(
            method={"crops": big},
            optim={"global_batch": 65536, "warmup_epochs": 0},
            model={"patch_size": 16},
            launcher={"nodes": 1024, "gpus_per_node": 8},
        )  # fmt: skip
    )


def test_teacher_temperature_warmup_fits_in_the_run() -> None:
    refused(
        doc(optim={"epochs": 5, "warmup_epochs": 0}, method={"warmup_teacher_temp_epochs": 6}),
        "warmup_teacher_temp_epochs (6) exceeds optim.epochs (5)",
    )


# -- URLs ------------------------------------------------------------------------------------

URL_FIELDS = [
    ("data", "url", "data.url"),
    ("checkpoint", "url", "checkpoint.url"),
    ("run", "storage", "run.storage"),
    ("evaluation", "train_url", "evaluation.train_url"),
    ("evaluation", "val_url", "evaluation.val_url"),
]


def _with_url(section: str, field: str, url: str) -> dict:
    d = doc()
    d.setdefault(section, {})
    d[section] = dict(d[section], **{field: url})
    return d


@pytest.mark.parametrize(("section", "field", "where"), URL_FIELDS)
@pytest.mark.parametrize(
    "url",
    [
        f"s3://{KEY}:{SECRET}@bucket/x",
        f"s3://{SECRET}@bucket/x",
        f"file://{KEY}:{SECRET}@localhost/x",
        f"https://{KEY}:{SECRET}@host/x",
        f"s3://bucket/x?X-Amz-Credential={KEY}&X-Amz-Signature={SECRET}",
    ],
)
def test_credentials_in_any_url_field_are_refused_unseen(section, field, where, url) -> None:
    refused(_with_url(section, field, url), where)


@pytest.mark.parametrize(("section", "field", "where"), URL_FIELDS)
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("gs://bucket/x", "'gs:'"),
        ("http://host/x", "'http:'"),
        ("file://fileserver/share/x", "host is not allowed"),
        ("s3:bucket/x", "s3://bucket/prefix"),
        ("s3://-/x", "bucket"),
        ("s3://bucket/x#frag", "fragment"),
    ],
)
def test_storage_url_schemes_and_hosts(section, field, where, url, reason) -> None:
    refused(_with_url(section, field, url), where, reason)


@pytest.mark.parametrize(
    "url",
    [
        "s3://my-bucket/imagenet-wds/train/index.json",
        "s3://bk/p/shard-{000000..000127}.tar",
        "file:///etc/shards/index.json",  # valid syntax; the pre-flight finds no shards there
        "file://localhost/data/x",
        "/abs/path/index.json",
        "relative/dir@2024/x",
        "C:/data",  # one letter is a drive, not a scheme
    ],
)
def test_valid_storage_urls_pass(url: str) -> None:
    assert spec_from_dict(_with_url("data", "url", url)).data.url == url


def test_ray_storage_path_and_endpoint_url() -> None:
    ray = {"ray": {"storage_path": f"s3://{KEY}:{SECRET}@b/ray"}}
    refused(doc(launcher=ray), "launcher.ray.storage_path", "credentials")
    refused(doc(launcher={"ray": {"storage_path": "gs://b/ray"}}), "storage_path", "'gs:'")
    for bad, reason in [
        (f"http://{KEY}:{SECRET}@127.0.0.1:9000", "credentials"),
        (f"http://{KEY}@127.0.0.1:9000", "credentials"),
        ("ftp://127.0.0.1", "http://"),
        ("http://", "no host"),
        (f"http://h:9000/?X-Amz-Signature={SECRET}", "endpoint_url"),
    ]:
        d = doc()
        d["data"]["storage"] = {"endpoint_url": bad}
        refused(d, "data.storage.endpoint_url", reason)
    d = doc()
    d["data"]["storage"] = {"endpoint_url": "http://127.0.0.1:9000"}
    assert spec_from_dict(d).data.storage.endpoint_url == "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("section", "where"),
    [
        ({"ray": {"runtime_env": {"pip": [f"git+https://{SECRET}@github.com/o/r"]}}},
         "launcher.ray.runtime_env"),
        ({"ray": {"address": f"{KEY}:{SECRET}@head:6379"}}, "launcher.ray.address"),
        ({"slurm": {"setup": [f"export X=https://{KEY}:{SECRET}@h/x"]}}, "launcher.slurm.setup"),
        ({"python": f"https://{KEY}:{SECRET}@h/python"}, "launcher.python"),
    ],
)  # fmt: skip
def test_credentials_anywhere_in_free_form_fields(section, where) -> None:
    refused(doc(launcher=section), where, "not shown")


def test_redaction_covers_what_pydantic_echoes() -> None:
    # A type error repeats the input: the URL inside it is replaced whole, before it is cut.
    long = f"s3://{KEY}{'x' * 100}:{SECRET}@bucket/x"
    text = refused(doc(run={"storage": [long]}), "run.storage", "valid string", "not shown")
    assert "bucket" not in text
    assert (
        redact(f"a s3://{KEY}:{SECRET}@b/x b")
        == "a <a URL with credentials or a query, not shown> b"
    )
    assert has_credentials(f"https://h/x?sig={SECRET}") and not has_credentials("s3://b/k@v")


def test_validated_spec_prints_no_credentials_anywhere() -> None:
    # What cannot be validated cannot be shown; what is valid has nothing to hide.
    spec = load_spec(REPO / "jobs" / "vitb8.yaml")
    assert "@" not in spec.to_yaml()
    assert isinstance(spec, JobSpec)


# -- SpecError text ----------------------------------------------------------------------------


def test_one_line_per_problem_even_with_newlines_in_keys(tmp_path: Path) -> None:
    p = tmp_path / "nl.yaml"
    p.write_text('data: {url: x}\n"a\\nb": 1\n')
    with pytest.raises(SpecError) as err:
        load_spec(p)
    assert str(err.value) == f"{p}: a\\nb: unknown key"


def test_many_problems_are_counted_not_all_listed(tmp_path: Path) -> None:
    p = tmp_path / "many.yaml"
    p.write_text("data: {url: x}\n" + "".join(f"k{i}: 1\n" for i in range(200)))
    with pytest.raises(SpecError) as err:
        load_spec(p)
    lines = str(err.value).splitlines()
    assert len(lines) == 51 and lines[-1].endswith("and 150 more problems")


def test_secret_in_a_yaml_key_is_not_repeated(tmp_path: Path) -> None:
    p = tmp_path / "k.yaml"
    p.write_text(f"data: {{url: x}}\n's3://{KEY}:{SECRET}@b/x': 1\n's3://{KEY}:{SECRET}@b/x': 2\n")
    with pytest.raises(SpecError) as err:
        load_spec(p)
    assert "duplicate key" in str(err.value) and SECRET not in str(err.value)


# -- the YAML reader ---------------------------------------------------------------------------


def test_depth_counts_expanded_aliases() -> None:
    # 40 aliases, each one level deeper than the last: composing stays shallow, the value
    # does not.
    text = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 40))
    with pytest.raises(strict_yaml.SpecYAMLError, match="once aliases are expanded"):
        strict_yaml.loads(text)


def test_a_few_aliases_that_expand_to_billions_are_refused() -> None:
    text = "a0: &a0 [x, x]\n" + "".join(
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 31)
    )
    with pytest.raises(strict_yaml.SpecYAMLError, match="expands to more than"):
        strict_yaml.loads(text)
    # A reasonable use of aliases still works.
    assert strict_yaml.loads("a: &x {k: 1}\nb: *x\n") == {"a": {"k": 1}, "b": {"k": 1}}


def test_integer_length_and_float_range() -> None:
    assert strict_yaml.parse_scalar("9" * 30) == int("9" * 30)
    with pytest.raises(strict_yaml.SpecYAMLError, match="31 digits"):
        strict_yaml.parse_scalar("9" * 31)
    with pytest.raises(strict_yaml.SpecYAMLError, match="31 digits"):
        strict_yaml.parse_scalar("-" + "9" * 31)
    assert strict_yaml.parse_scalar("1.5e308") == 1.5e308
    for bad in (".inf", "-.Inf", ".NaN", "1e309", "[1.0, .inf]", "{a: {b: .nan}}"):
        with pytest.raises(strict_yaml.SpecYAMLError, match="finite"):
            strict_yaml.parse_scalar(bad)


def test_recursion_error_is_a_spec_error(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RecursionError

    monkeypatch.setattr(strict_yaml._StrictLoader, "get_single_node", boom)
    with pytest.raises(strict_yaml.SpecYAMLError, match="nested too deeply"):
        strict_yaml.loads("a: 1\n")


def test_markup_in_a_key_is_printed_as_is(tmp_path: Path) -> None:
    import subprocess
    import sys

    p = tmp_path / "markup.yaml"
    p.write_text('data: {url: x}\n"[/x]": 1\n')
    done = subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", "validate", str(p)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "[/x]: unknown key" in done.stderr, done.stderr


def test_a_megabyte_value_is_checked_fast_and_reported_short(tmp_path: Path) -> None:
    # Every string is searched for URLs with credentials: linear, not a backtracking regex.
    import time

    p = tmp_path / "long.yaml"
    p.write_text("data: {url: x}\nrun: {name: '" + "a://b/" * 150_000 + "'}\n")
    t0 = time.monotonic()
    with pytest.raises(SpecError) as err:
        load_spec(p)
    assert time.monotonic() - t0 < 10
    assert "run.name" in str(err.value) and len(str(err.value)) < 2000


def test_a_flat_document_of_too_many_values_is_refused_while_composing() -> None:
    with pytest.raises(strict_yaml.SpecYAMLError, match="more than 10000 values"):
        strict_yaml.loads("x: [" + "1, " * 20_000 + "]\n")


@pytest.mark.parametrize("field", ["depth=2", "embed_dim=64", "num_heads=2", "patch_size=8"])
def test_a_cnn_given_a_vit_field_is_refused_when_the_spec_is_read(field: str) -> None:
    """Not later, in the ranks, as timm's TypeError."""
    with pytest.raises(SpecError, match=f"{field.split('=')[0]}: only ViT archs .* 'test_resnet'"):
        load_spec(REPO / "jobs" / "quickstart.yaml", [f"model.{field}"])
    from dino_cluster.spec.sections import ModelSpec

    assert ModelSpec(arch="resnet18").patch_size is None  # the ViT default does not follow a CNN
    assert ModelSpec().patch_size == 16
    vit = load_spec(REPO / "jobs" / "quickstart-vit.yaml", [f"model.{field}"])
    assert vit.model.arch.startswith("vit_")
