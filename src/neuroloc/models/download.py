"""Download weights into the torch hub cache, verifying their SHA-256 (full, or the prefix torchvision uses)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from neuroloc.models.registry import ModelError, ModelSpec


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
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # download_url_to_file writes to a temporary file, checks the hash prefix, then renames.
        torch.hub.download_url_to_file(spec.url, str(target), hash_prefix=spec.sha256, progress=True)
    except Exception as exc:  # URLError offline, RuntimeError on a hash mismatch
        raise ModelError(f"cannot download weights for {spec.name} from {spec.url}: {exc}") from exc
    return target
