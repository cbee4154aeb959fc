"""What the picture commands take: a checkpoint (and the spec it was trained with) and images.

CKPT is what `dino-cluster eval` takes (evaluate/runner.py parses it): a run folder, a
checkpoint root (newest step, or --step), a step folder `.../step-000000310`, or an exported
teacher .pth. The backbone is built from the run's spec: --spec, else the spec.resolved.yaml
of a local run folder found at or above CKPT (a checkpoint root and a step folder sit inside
their run folder). Weights are the teacher's, verified, loaded strictly: a spec that does not
describe the checkpoint is an error naming the first mismatching tensor.

Images are files (PNG/JPEG; local paths or s3:// URLs) or the first N samples of a shard set
(index.json, folder, prefix or brace pattern, on file:// or s3://), read through the
evaluation reader: bounded decode, bad samples skipped and counted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from dino_cluster.data.decode import BadSample, decode_image
from dino_cluster.evaluate.features import build_eval_backbone, load_backbone_weights
from dino_cluster.evaluate.runner import load_teacher, parse_checkpoint
from dino_cluster.spec import JobSpec, SpecError, load_spec
from dino_cluster.storage import StorageError, StorageOptions, open_url
from dino_cluster.visualize import VisualizeError

log = logging.getLogger(__name__)

SPEC_FILE = "spec.resolved.yaml"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# A run folder, its checkpoints/ root, one step folder, or a file in it: at most this many
# folders up to the run's spec.resolved.yaml.
_SPEC_SEARCH_DEPTH = 3
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class LoadedModel:
    spec: JobSpec
    backbone: nn.Module  # the teacher backbone, eval mode, no gradients
    step: int | None
    where: str  # the checkpoint as given

    @property
    def patch_size(self) -> int | None:
        embed = getattr(self.backbone, "patch_embed", None)
        size = getattr(embed, "patch_size", None)
        if size is None:
            return None
        return int(size[0]) if isinstance(size, tuple | list) else int(size)


@dataclass
class VisImage:
    """One image as a picture shows it: a display name, an optional label, the pixels."""

    name: str
    pixels: Tensor  # (3, H, W): whatever the command's transform made of the image
    label: str | None = None
    key: str | None = None  # "<shard root>/<shard>/<sample key>" for shard samples


def find_spec(checkpoint: str, spec_path: Path | None) -> JobSpec:
    """The spec to build the backbone from: --spec, else a local run folder's resolved spec."""
    try:
        if spec_path is not None:
            if not spec_path.is_file():
                raise VisualizeError(f"--spec {spec_path}: no such file")
            return load_spec(spec_path)
        if "://" not in checkpoint or checkpoint.startswith("file://"):
            here = Path(checkpoint.removeprefix("file://")).expanduser()
            for folder in [here, *here.parents][: _SPEC_SEARCH_DEPTH + 1]:
                if (folder / SPEC_FILE).is_file():
                    return load_spec(folder / SPEC_FILE)
    except SpecError as exc:
        raise VisualizeError(str(exc)) from None
    raise VisualizeError(
        f"{checkpoint}: no {SPEC_FILE} found at or above it; pass the run's spec as --spec"
    )


def storage_options(spec: JobSpec, endpoint_url: str | None) -> StorageOptions:
    options = StorageOptions.from_spec(spec.data.storage)
    return replace(options, endpoint_url=endpoint_url) if endpoint_url else options


def load_model(
    checkpoint: str,
    *,
    spec_path: Path | None = None,
    step: int | None = None,
    options: StorageOptions | None = None,
    endpoint_url: str | None = None,
) -> LoadedModel:
    """The teacher backbone of `checkpoint`, built from the run's spec, weights verified.

    Raises VisualizeError for anything the user can fix (no such checkpoint, no spec, a spec
    that does not fit the weights); StorageError when the store cannot be read."""
    from dino_cluster.checkpointing import CheckpointError
    from dino_cluster.evaluate.features import EvalError

    if not checkpoint:
        raise VisualizeError("CKPT must not be empty")
    local = "://" not in checkpoint or checkpoint.startswith("file://")
    if local and not Path(checkpoint.removeprefix("file://")).expanduser().exists():
        raise VisualizeError(f"{checkpoint}: no such run folder, checkpoint or file")
    spec = find_spec(checkpoint, spec_path)
    options = options or storage_options(spec, endpoint_url)
    try:
        ref = parse_checkpoint(run_checkpoints(checkpoint, spec), step)
        at_step, state = load_teacher(ref, options)
        backbone = load_backbone_weights(build_eval_backbone(spec), state)
    except (CheckpointError, EvalError, SpecError) as exc:
        raise VisualizeError(" ".join(str(exc).split())) from None
    except ValueError as exc:  # parse_checkpoint, bad URLs
        raise VisualizeError(str(exc)) from None
    return LoadedModel(spec, backbone, at_step, checkpoint)


def run_checkpoints(checkpoint: str, spec: JobSpec) -> str:
    """A local run folder stands for its checkpoints: RUN/checkpoints when the spec keeps them
    there (found from RUN itself, so the command works from any directory), else the spec's
    checkpoint URL."""
    if "://" in checkpoint and not checkpoint.startswith("file://"):
        return checkpoint
    folder = Path(checkpoint.removeprefix("file://")).expanduser()
    if not (folder / SPEC_FILE).is_file() or (folder / "manifest.json").exists():
        return checkpoint
    if spec.checkpoint.url or spec.run.storage:
        return spec.checkpoint_url
    return str((folder / "checkpoints").resolve())


# ---------------------------------------------------------------------------- images


def is_image_file(value: str) -> bool:
    return value.lower().endswith(IMAGE_SUFFIXES)


def read_image_bytes(where: str, options: StorageOptions | None) -> bytes:
    try:
        if "://" in where and not where.startswith("file://"):
            with open_url(where, options) as f:
                return f.read()
        return Path(where.removeprefix("file://")).expanduser().read_bytes()
    except FileNotFoundError:
        raise VisualizeError(f"{where}: no such image file") from None
    except IsADirectoryError:
        raise VisualizeError(f"{where}: a folder, not an image file") from None


def safe_name(text: str) -> str:
    """A file-name stem from a path or sample key (no folders, no odd characters)."""
    stem = _UNSAFE.sub("_", text).strip("._")
    return stem[-120:] or "image"


def image_files(
    paths: Sequence[str],
    transform: Callable[[Image.Image], Tensor],
    *,
    options: StorageOptions | None,
    max_pixels: int,
) -> Iterator[VisImage]:
    """Each file decoded (bounded, as shard samples are) and transformed, in order."""
    for where in paths:
        try:
            image = decode_image(read_image_bytes(where, options), max_pixels=max_pixels)
        except BadSample as exc:
            raise VisualizeError(f"{where}: not a usable image ({exc})") from None
        stem = Path(where.rstrip("/").rsplit("/", 1)[-1]).stem
        yield VisImage(safe_name(stem), transform(image), key=where)


def shard_images(
    url: str,
    transform: Callable[[Image.Image], Tensor],
    *,
    count: int | None,
    options: StorageOptions | None,
    max_pixels: int,
    batch_size: int = 1,
) -> Iterator[list[VisImage]]:
    """Batches of the first `count` (None: all) usable samples of the shard set at `url`.

    The evaluation reader stacks each batch, so a transform whose output size depends on the
    image (attention keeps the aspect ratio) needs `batch_size=1`."""
    from dino_cluster.data.labelled import build_labelled_reader

    try:
        reader = build_labelled_reader(
            url,
            transform=transform,
            batch_size=batch_size,
            storage_options=options,
            max_image_pixels=max_pixels,
            require_labels=False,
        )
    except FileNotFoundError as exc:
        raise VisualizeError(f"{url}: {exc}") from None
    except (ValueError, StorageError) as exc:
        raise VisualizeError(f"{url}: {exc}") from None
    classes = reader.shards.classes
    root = reader.shards.root_url.rstrip("/")
    done = 0
    for batch in reader:
        out = []
        for pixels, label, key in zip(batch.images, batch.labels.tolist(), batch.keys, strict=True):
            name = safe_name(re.sub(r"\.(tar|tar\.gz|tgz)/", "-", key))  # shard-000001-000042
            out.append(VisImage(name, pixels, label_text(label, classes), f"{root}/{key}"))
        if count is not None:
            out = out[: count - done]
        done += len(out)
        if out:
            yield out
        if count is not None and done >= count:
            return
    if done == 0:
        bad = ", ".join(f"{n} {k}" for k, n in reader.bad.items()) or "none"
        raise VisualizeError(f"{url}: no usable image (bad samples: {bad})")


def label_text(label: int, classes: Sequence[str] | None) -> str | None:
    """A sample's label as shown: its class name from the shard index, else the number."""
    if label < 0:
        return None
    if classes and label < len(classes):
        return str(classes[label])
    return str(label)


def to_uint8(pixels: Tensor, mean: Sequence[float] = (0, 0, 0), std: Sequence[float] = (1, 1, 1)):  # noqa: ANN201
    """(3, H, W) float (normalised with mean/std) -> (H, W, 3) uint8 numpy for drawing."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = (pixels.detach().float().cpu() * s + m).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
