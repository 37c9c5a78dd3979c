"""TorchScript archives are read, never run: same weights as ``torch.jit.load``, no code executed.

The reference ``torch.jit.load`` calls below only open archives this test built itself; the
loader under test must never call it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tag2mask.clip.loading import WeightsError, load_clip
from tag2mask.clip.torchscript_archive import TorchScriptArchiveError, read_torchscript_state_dict
from torchscript_archives import scripted_archive

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated; the archives are not


def _tiny_sd(tiny_clip_path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sd = torch.load(tiny_clip_path, map_location="cpu", weights_only=True)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("dtype, extra", [(torch.float16, False), (torch.float32, True)], ids=["fp16", "fp32_extra_attr"])
def test_reader_matches_torch_jit_state_dict(tiny_clip_path, tmp_path, dtype, extra):
    path = tmp_path / "archive.pt"
    torch.jit.save(scripted_archive(_tiny_sd(tiny_clip_path, dtype), extra_attribute=extra), str(path))
    ours = read_torchscript_state_dict(path)
    reference = torch.jit.load(str(path), map_location="cpu").state_dict()  # our own file: trusted
    assert list(ours) == list(reference)
    for k, v in reference.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k], v), k


def test_half_archive_loads_like_the_state_dict(tiny_clip_path, tmp_path, capsys):
    from tag2mask.cli.main import main

    sd = _tiny_sd(tiny_clip_path, torch.float16)  # OpenAI ships fp16 storages
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(scripted_archive(sd), str(path))
    model = load_clip(path)
    assert model.source_format == "openai-torchscript" and model.stored_dtypes == ["float16"]
    ref = load_clip(tiny_clip_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k].float()), k
    assert model.config == ref.config
    assert main(["info", "--weights", str(path)]) == 0
    out = capsys.readouterr().out
    assert "openai-torchscript" in out and "float16" in out and str(path) in out


def test_transposed_and_offset_views_are_rebuilt(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    root = nn.Module()
    root.register_buffer("whole", base)
    root.register_buffer("transposed", base.t())  # shares the storage, other strides
    root.register_buffer("column", base[1:, 2])  # offset into the storage
    path = tmp_path / "views.pt"
    torch.jit.save(torch.jit.script(root), str(path))
    sd = read_torchscript_state_dict(path)
    assert torch.equal(sd["whole"], base) and torch.equal(sd["transposed"], base.t()) and torch.equal(sd["column"], base[1:, 2])


# ---------------------------------------------------------------------------------------------------
# malicious archives: the payload must never run


class _WritesOnLoad(nn.Module):
    """Scripted, its ``__setstate__`` writes ``marker``: what ``torch.jit.load`` runs while loading."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2), requires_grad=False)
        self.marker = marker

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.marker = state[1]
        self.training = state[2]
        torch.save(self.weight, self.marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _setstate_archive(path: Path, marker: Path) -> Path:
    torch.jit.save(torch.jit.script(_WritesOnLoad(str(marker))), str(path))
    return path


def _marker_function(marker: str) -> str:  # what a pickle GLOBAL/REDUCE payload would call
    Path(marker).write_text("executed")
    return marker


class _ReducePayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_marker_function, (self.marker,))


def _replace_data_pkl(src: Path, dst: Path, data: bytes) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename.endswith("/data.pkl") else zin.read(info))
    return dst


def _reduce_archive(tmp_path: Path, tiny_clip_path: Path, marker: Path) -> Path:
    good = tmp_path / "good.pt"
    torch.jit.save(scripted_archive(_tiny_sd(tiny_clip_path, torch.float16)), str(good))
    return _replace_data_pkl(good, tmp_path / "reduce_evil.pt", pickle.dumps({"w": _ReducePayload(str(marker))}, protocol=2))


def test_setstate_payload_is_real(tmp_path):
    """The payload does write its file under torch.jit.load (so the tests below test something)."""
    marker = tmp_path / "written_by_jit_load.txt"
    torch.jit.load(str(_setstate_archive(tmp_path / "evil.pt", marker)))
    assert marker.exists()


def _archives(tmp_path: Path, tiny_clip_path: Path) -> list[tuple[Path, Path]]:
    out = []
    for name in ("setstate", "reduce"):
        marker = tmp_path / f"pwned_{name}.txt"
        if name == "setstate":
            out.append((_setstate_archive(tmp_path / "setstate_evil.pt", marker), marker))
        else:
            out.append((_reduce_archive(tmp_path, tiny_clip_path, marker), marker))
    return out


def test_malicious_archive_load_clip(tmp_path, tiny_clip_path):
    for path, marker in _archives(tmp_path, tiny_clip_path):
        with pytest.raises(WeightsError) as info:
            load_clip(path)
        assert str(path) in str(info.value)
        assert not marker.exists(), f"{path.name}: the payload ran"


def test_malicious_archive_info_command(tmp_path, tiny_clip_path, capsys):
    from tag2mask.cli.main import main

    for path, marker in _archives(tmp_path, tiny_clip_path):
        assert main(["info", "--weights", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "Traceback" not in err
        assert not marker.exists(), f"{path.name}: the payload ran"


def test_malicious_archive_segment_command(tmp_path, tiny_clip_path, capsys, monkeypatch):
    from tag2mask.cli.main import main

    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    for path, marker in _archives(tmp_path, tiny_clip_path):
        rc = main(["segment", str(image), "--classes", "cat, dog", "--weights", str(path), "--out",
                   str(tmp_path / f"out_{path.stem}"), "--device", "cpu", "--quiet"])
        assert rc == 2
        assert str(path) in capsys.readouterr().err
        assert not marker.exists(), f"{path.name}: the payload ran"


def test_reduce_payload_names_the_refused_global(tmp_path, tiny_clip_path):
    marker = tmp_path / "m.txt"
    with pytest.raises(TorchScriptArchiveError, match="refusing to load the global .*_marker_function"):
        read_torchscript_state_dict(_reduce_archive(tmp_path, tiny_clip_path, marker))
    assert not marker.exists()


@pytest.mark.parametrize(
    "data, message",
    [
        # BUILD on an object that is not an archive record (would call its __setstate__)
        (b"\x80\x02ccollections\nOrderedDict\n)R}b.", "refusing to set the state"),
        # builtins.eval through REDUCE
        (b"\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00print('hi')\x85R.", "refusing to load the global builtins.eval"),
        # a persistent id that is not a storage record
        (b"\x80\x02X\x03\x00\x00\x00abcQ.", "unexpected persistent id"),
        # a plain value instead of a module tree
        (b"\x80\x02K\x05.", "not a module"),
    ],
    ids=["build_on_ordereddict", "eval_global", "bad_persistent_id", "not_a_module"],
)
def test_hand_made_pickles_are_refused(tmp_path, data, message):
    good = tmp_path / "good.pt"
    root = nn.Module()
    root.register_buffer("w", torch.ones(2))
    torch.jit.save(torch.jit.script(root), str(good))
    path = _replace_data_pkl(good, tmp_path / "bad.pt", data)
    with pytest.raises(TorchScriptArchiveError, match=message):
        read_torchscript_state_dict(path)


def test_tensor_past_its_storage_is_refused(tmp_path):
    root = nn.Module()
    root.register_buffer("w", torch.ones(4))
    good = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(root), str(good))
    with zipfile.ZipFile(good) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        data = z.read(name)
    # BININT1 4 (the size) -> 200: the tensor would read far past its 4-element storage
    patched = data.replace(b"(K\x04t", b"(K\xc8t", 1)
    assert patched != data
    path = _replace_data_pkl(good, tmp_path / "oob.pt", patched)
    with pytest.raises(TorchScriptArchiveError, match="past its storage"):
        read_torchscript_state_dict(path)


def test_loader_never_calls_torch_jit_load(tmp_path, tiny_clip_path, monkeypatch):
    path = tmp_path / "a.pt"
    torch.jit.save(scripted_archive(_tiny_sd(tiny_clip_path, torch.float32)), str(path))

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.jit.load was called on a user file")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch.jit._serialization, "load", forbidden, raising=False)
    assert load_clip(path).source_format == "openai-torchscript"
