"""One entry point for CLIP weights: :func:`load_clip`.

Accepted sources:

* an OpenAI TorchScript archive as released (``ViT-B-16.pt``); its tensors are read out of the zip
  without executing it (:mod:`tag2mask.clip.torchscript_archive`; ``torch.jit.load`` is never used);
* an OpenAI / open_clip state dict (``.pt``, ``.pth``, ``.bin``; read with ``weights_only=True``,
  so no arbitrary objects are unpickled);
* a ``.safetensors`` file in OpenAI or Hugging Face layout (tag2mask's own files carry their config);
* a Hugging Face ``CLIPModel`` folder (``config.json`` + weights);
* a registry name (``ViT-B/16``, ``ViT-B/32``, ``ViT-L/14``, ``RN50``, ``RN50x16`` ...), found in the
  local cache, or downloaded only when the user allows it (``allow_download=True`` or
  ``TAG2MASK_ALLOW_DOWNLOAD=1``).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from tag2mask.clip.hf import convert_hf_state_dict, is_hf_state_dict, read_hf_folder
from tag2mask.clip.layers import Attention
from tag2mask.clip.model import CLIP, CLIPConfig, config_from_state_dict, strip_non_parameters
from tag2mask.clip.torchscript_archive import read_torchscript_state_dict
from tag2mask.io.budget import BudgetError, check_tensor_storage
from tag2mask.io.torch_files import UnreadableFileError, UnsafeFileError, clean_message, safe_torch_load
from tag2mask.io.json_files import loads_named

_OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"
# name -> (sha256, file name); the sha256 is also the URL folder, as OpenAI publishes them
REGISTRY: dict[str, tuple[str, str]] = {
    "RN50": ("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": ("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": ("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": ("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
}

PathLike = Union[str, os.PathLike]


class WeightsError(ValueError):
    """A weight source that cannot be used; the message names the file and the problem."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """The weights are not on disk and downloading was not allowed (or failed)."""


def default_cache_dir() -> Path:
    """Where registry names are looked up: ``$TAG2MASK_HOME/weights``, else OpenAI's ``~/.cache/clip``."""
    if os.environ.get("TAG2MASK_HOME"):
        return Path(os.environ["TAG2MASK_HOME"]) / "weights"
    return Path.home() / ".cache" / "clip"


def _downloads_allowed(flag: Optional[bool]) -> bool:
    if flag is not None:
        return flag
    return os.environ.get("TAG2MASK_ALLOW_DOWNLOAD", "").strip().lower() in ("1", "true", "yes")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_registry_name(name: str, allow_download: Optional[bool], cache_dir: Optional[PathLike]) -> Path:
    sha, filename = REGISTRY[name]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / filename
    if path.exists():
        return path
    if not _downloads_allowed(allow_download):
        raise WeightsNotFoundError(
            f"CLIP weights {name!r} are not on this machine (looked for {path}). Either pass a file you have "
            f"(--weights /path/to/{filename}, a Hugging Face CLIPModel folder or a .safetensors file), put "
            f"{filename} in {root}, or allow a download from {_OPENAI_BASE} with --allow-download or "
            f"TAG2MASK_ALLOW_DOWNLOAD=1."
        )
    return _download(f"{_OPENAI_BASE}/{sha}/{filename}", path, sha)


def _download(url: str, target: Path, sha256: str) -> Path:
    import urllib.request

    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as src, open(tmp, "wb") as dst:
            total = int(src.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}") as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WeightsNotFoundError(f"could not download {url}: {e}. Are you offline? Supply the file with --weights.") from e
    if _sha256(tmp) != sha256:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"downloaded {url} but its sha256 does not match {sha256}")
    os.replace(tmp, target)
    return target


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_state_dict(path: PathLike) -> tuple[dict[str, torch.Tensor], Optional[CLIPConfig], str]:
    """Read any supported weight file/folder -> (OpenAI-layout state dict, config if stored, format name)."""
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"{path}: no such file or folder")
    config: Optional[CLIPConfig] = None
    if path.is_file() and path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty (an interrupted download or copy?)")
    try:
        if path.is_dir():
            sd, config = read_hf_folder(path)
            fmt = "huggingface-folder"
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
            if "tag2mask_config" in meta:
                config = CLIPConfig.from_dict(loads_named(meta["tag2mask_config"], f"{path} (tag2mask_config)"))
            fmt = "safetensors"
        elif _is_torchscript(path):
            # never torch.jit.load a user's file: it runs the archive's code (see torchscript_archive)
            sd = read_torchscript_state_dict(path)
            fmt = "openai-torchscript"
        else:
            obj = safe_torch_load(path, "CLIP checkpoint")
            sd = _unwrap_checkpoint(obj, path)
            fmt = "state-dict"
    except WeightsError:
        raise
    except FileNotFoundError as e:
        raise WeightsNotFoundError(str(e)) from e
    except (UnsafeFileError, UnreadableFileError) as e:
        raise WeightsError(str(e)) from None
    except Exception as e:  # truncated zip, corrupt safetensors header ...
        detail = clean_message(str(e))
        raise WeightsError(f"{path}: not a readable CLIP checkpoint ({type(e).__name__}{': ' + detail if detail else ''})") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: does not contain a state dict of tensors")
    try:
        check_tensor_storage(sd, path)  # stride-0 views: refused before anything copies them
    except BudgetError as e:
        raise WeightsError(str(e)) from None
    sd = strip_non_parameters(sd)  # before the layout check, so that a ``module.``-prefixed HF dict is recognised
    if is_hf_state_dict(sd):
        try:
            sd = convert_hf_state_dict(sd)
        except KeyError as e:
            raise WeightsError(f"{path}: {e.args[0]}") from e
        fmt = fmt + "+hf-layout" if fmt != "huggingface-folder" else fmt
    return sd, config, fmt


def _unwrap_checkpoint(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        return obj
    raise WeightsError(f"{path}: expected a state dict, found a {type(obj).__name__}")


def round_weights_to_fp16(model: CLIP) -> None:
    """Round what OpenAI's loader converts to fp16 (then used as fp32) in place.

    The official CLIP-ES/WeCLIP loaders build the model, convert Conv/Linear weights and biases,
    attention ``in_proj``, ``visual.proj`` and ``text_projection`` to fp16 and copy the fp32
    checkpoint into it; on CPU the model is then made float32 again. Embeddings, LayerNorms and
    ``logit_scale`` stay exact. The CLIP-ES and WeCLIP golden fixtures depend on this.
    """

    def _round(p: Optional[torch.Tensor]) -> None:
        if p is not None:
            p.data = p.data.half().to(p.dtype)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                _round(m.weight)
                _round(m.bias)
            elif isinstance(m, Attention):
                _round(m.in_proj_weight)
                _round(m.in_proj_bias)
        _round(model.text_projection)
        if model.is_vit:
            _round(model.visual.proj)


def build_from_state_dict(
    sd: dict[str, torch.Tensor], config: Optional[CLIPConfig] = None, activation: str = "quick_gelu", source: str = "<state dict>"
) -> CLIP:
    """Instantiate :class:`CLIP` for ``sd`` (config inferred unless given) and load it strictly."""
    try:
        config = config or config_from_state_dict(sd, activation=activation)
    except KeyError as e:
        raise WeightsError(f"{source}: not a CLIP state dict ({e.args[0]})") from e
    # checked on the meta device first (no memory): a config or key set asking for a huge model is
    # refused unless the state dict really holds tensors of those shapes (bounded by the file's size)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIP(config).state_dict().items()}
    expected = set(shapes)
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise WeightsError(
            f"{source}: state dict does not match the inferred architecture ({config.describe()}); "
            f"missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    bad = [k for k, shape in shapes.items() if shape != sd[k].shape]
    if bad:
        raise WeightsError(f"{source}: shape mismatch for {bad[:8]}")
    model = CLIP(config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model


def resolve_weights_path(source: PathLike, allow_download: Optional[bool] = None,
                         cache_dir: Optional[PathLike] = None) -> Path:
    """The file or folder a weight source names (a registry name is looked up, downloaded only when allowed)."""
    src = str(source)
    if src in REGISTRY and not Path(src).exists():
        return _resolve_registry_name(src, allow_download, cache_dir)
    path = Path(src).expanduser()
    if not path.exists():
        hint = f" Known names: {', '.join(REGISTRY)}." if "/" in src or src.startswith(("ViT", "RN")) else ""
        raise WeightsNotFoundError(f"{src}: no such weights file or folder.{hint}")
    return path


def load_clip(
    source: PathLike,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    round_fp16_weights: bool = False,
    activation: Optional[str] = None,
    allow_download: Optional[bool] = None,
    cache_dir: Optional[PathLike] = None,
) -> CLIP:
    """Load CLIP weights from any supported source and return an eval-mode :class:`CLIP`.

    ``round_fp16_weights=True`` reproduces the official CLIP-ES/WeCLIP loaders (see
    :func:`round_weights_to_fp16`). ``activation`` overrides the MLP activation for checkpoints
    that do not record it (open_clip's non-``quickgelu`` models use ``'gelu'``).
    """
    path = resolve_weights_path(source, allow_download, cache_dir)
    sd, config, fmt = read_state_dict(path)
    if config is not None and activation is not None:
        config.activation = activation
    stored_dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.is_floating_point()})
    model = build_from_state_dict(sd, config, activation or "quick_gelu", source=str(path))
    if round_fp16_weights:
        round_weights_to_fp16(model)
    model.fingerprint = _fingerprint(path) + (":fp16r" if round_fp16_weights else "")
    model.source_format = fmt
    model.source_path = str(path)
    model.stored_dtypes = stored_dtypes  # as in the file, before the float32 load (for `tag2mask info`)
    # frozen by default: methods that need gradients ask for them on activations, never on weights
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def _fingerprint(path: Path) -> str:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode())
            h.update(_sha256(p).encode())
        return h.hexdigest()[:16]
    return _sha256(path)[:16]


def save_clip(model: CLIP, path: PathLike, metadata: Optional[dict[str, str]] = None) -> None:
    """Save ``model`` as ``.safetensors`` with its config in the metadata (loadable by :func:`load_clip`)."""
    from safetensors.torch import save_file

    meta = {"tag2mask_config": json.dumps(model.config.to_dict()), "format": "pt"}
    meta.update(metadata or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
