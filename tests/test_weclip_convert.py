"""``tag2mask convert``: official WeCLIP .pth → run folder; older pickled tag2mask checkpoints → safe format.

The official-layout file is built here from the fixture material (tiny CLIP + the official decoder
state of tests/data/weclip, names as documented in its README §3.4): CLIP under ``encoder.*`` with the
official GPU dtypes (Conv/Linear in fp16) and the stale ``positional_embedding_new``, the decoder
under ``decoder_fts_fuse.*`` / ``decoder.*``, and PAR's ``par.kernel`` buffer.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from tag2mask.cli.main import main

WECLIP_DIR = Path(__file__).parent / "data" / "weclip"


def _official_clip_state(tiny_clip_path: Path) -> dict[str, torch.Tensor]:
    """The tiny CLIP as the official loader keeps it on a GPU: Conv/Linear/in_proj/projections in fp16."""
    from tag2mask.clip.loading import read_state_dict

    sd, _, _ = read_state_dict(tiny_clip_path)
    half = ("weight", "bias", "in_proj_weight", "in_proj_bias")
    out = {}
    for k, v in sd.items():
        is_half = (k.endswith(half) and ".ln" not in k and "ln_" not in k and v.ndim >= 1
                   and not k.startswith(("token_embedding", "ln_final"))) or k in ("visual.proj", "text_projection")
        out[k] = v.half() if is_half and v.is_floating_point() else v
    return out


def _build_official_pth(path: Path, tiny_clip_path: Path) -> dict[str, np.ndarray]:
    with np.load(WECLIP_DIR / "decoder_state.npz") as z:
        decoder = {k: z[k] for k in z.files}
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    clip = _official_clip_state(tiny_clip_path)
    for k, v in clip.items():
        state[f"encoder.{k}"] = v
    width = clip["visual.conv1.weight"].shape[0]
    state["encoder.visual.positional_embedding_new"] = torch.randn(1 + 20 * 20, width).half()
    for k, v in decoder.items():
        state[k] = torch.from_numpy(v.astype(np.float32))
    state["par.kernel"] = torch.ones(48, 1, 3, 3)
    torch.save(state, path)
    return decoder


def test_convert_official_weclip_checkpoint(tmp_path, tiny_clip_path):
    from tag2mask.io.palette import read_label_png
    from tag2mask.models.weclip_decoder import WeCLIPDecoder, load_official_decoder_state
    from tag2mask.methods.weclip.inference import WeCLIPSegmenter

    official = tmp_path / "WeCLIP_model_iter_30000.pth"
    decoder_np = _build_official_pth(official, tiny_clip_path)
    run = tmp_path / "run"
    assert main(["convert", "weclip", str(official), "--out", str(run)]) == 0
    assert main(["convert", "weclip", str(official), "--out", str(run)]) == 2  # never silently overwritten

    seg = WeCLIPSegmenter(run, device="cpu")
    assert seg.config.num_classes == 21 and seg.config.dataset == "voc"
    expected = load_official_decoder_state(decoder_np)
    got = seg.model.decoder.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # the CLIP inside the run is the tiny CLIP with the official fp16 weights
    ref = _official_clip_state(tiny_clip_path)
    clip_sd = seg.model.clip.state_dict()
    for k, v in ref.items():
        assert torch.equal(clip_sd[k], v.float()), k

    # the converted decoder reproduces the fixture's official outputs
    with np.load(WECLIP_DIR / "decoder.npz") as z:
        feats = torch.from_numpy(z["input"].astype(np.float32))
        want = torch.from_numpy(z["seg_logits"])
    dec = seg.model.decoder.eval()
    assert isinstance(dec, WeCLIPDecoder)
    with torch.no_grad():
        out = dec(list(feats))
    torch.testing.assert_close(out.seg_logits, want, atol=2e-3, rtol=0)

    # and segment --checkpoint reads the run folder
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    assert main(["segment", str(images), "--checkpoint", str(run), "--out", str(tmp_path / "seg"), "--device",
                 "cpu", "--quiet"]) == 0
    assert read_label_png(tmp_path / "seg" / "masks" / "a.png").shape == (40, 56)
    # inference-only: the official file has no optimiser state
    assert main(["train", "weclip", "--data", "synth", "--out", str(run), "--resume", "--device", "cpu",
                 "--quiet"]) == 2


def test_convert_refuses_what_is_not_an_official_checkpoint(tmp_path, capsys):
    bad = tmp_path / "x.pth"
    torch.save({"encoder.visual.proj": torch.zeros(2, 2)}, bad)
    assert main(["convert", "weclip", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "decoder" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    evil = tmp_path / "evil.pth"
    torch.save({"decoder.linear_pred.weight": torch.zeros(1), "x": Evil()}, evil)
    assert main(["convert", "weclip", str(evil), "--out", str(tmp_path / "run2")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def _legacy_checkpoint(path: Path, decoder: dict[str, torch.Tensor]) -> dict:
    """A checkpoint as tag2mask <= 0.1 wrote it: NumPy and Python RNG objects pickled inside."""
    params = [torch.nn.Parameter(v.clone()) for v in decoder.values()]
    opt = torch.optim.AdamW([{"params": params}], lr=2e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    state = opt.state_dict()
    state["poly_warmup"] = {"global_step": 7, "initial_lrs": [2e-3]}
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    ckpt = {
        "format": "tag2mask-weclip-v1", "iteration": 7, "decoder": decoder, "optimizer": state, "scaler": None,
        "rng": [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}],
        "config": {"dataset": "synth"}, "clip": {"weights": "/x/tiny.pt", "fingerprint": "abc"}, "world_size": 1,
        "train_options": {"seed": 4, "data": "synth", "text_cache_dir": None},
    }
    torch.save(ckpt, path)
    return ckpt


def test_older_pickled_checkpoints_get_a_resave_message_and_a_safe_converter(tmp_path, capsys):
    from tag2mask.jobs.checkpoint import UnsafeCheckpointError, load_checkpoint
    from tag2mask.runs.layout import read_run_checkpoint
    from tag2mask.runs.rng_state import restore_rng_state

    old_run = tmp_path / "old"
    old_run.mkdir()
    decoder = {"classifier.weight": torch.randn(3, 4), "classifier.bias": torch.randn(3)}
    _legacy_checkpoint(old_run / "latest.pt", decoder)
    with pytest.raises(UnsafeCheckpointError, match="tag2mask convert checkpoint"):
        load_checkpoint(old_run / "latest.pt")
    rc = main(["train", "weclip", "--data", "synth", "--out", str(old_run), "--resume", "--device", "cpu", "--quiet"])
    assert rc == 2 and "convert checkpoint" in capsys.readouterr().err

    new_run = tmp_path / "new"
    assert main(["convert", "checkpoint", str(old_run / "latest.pt"), "--out", str(new_run)]) == 0
    ckpt = read_run_checkpoint(new_run, task="weclip")
    assert ckpt["iteration"] == 7 and ckpt["options"]["seed"] == 4 and ckpt["meta"]["clip"]["fingerprint"] == "abc"
    for k, v in decoder.items():
        assert torch.equal(ckpt["modules"]["decoder"][k], v)
    assert "poly_warmup" not in ckpt["optimizer"] and ckpt["optimizer"]["param_groups"][0]["initial_lr"] == 2e-3
    # the RNG states come back exactly
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng_state(ckpt["rng"][0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want
    assert json.loads((new_run / "config.json").read_text())["task"] == "weclip"


def test_a_failed_convert_leaves_nothing_that_blocks_the_retry(tmp_path, tiny_clip_path, capsys):
    """The decoder check fails after the CLIP was written: no run folder, no staging folder is left."""
    official = tmp_path / "WeCLIP_model_iter_30000.pth"
    _build_official_pth(official, tiny_clip_path)
    state = torch.load(official, weights_only=True)
    broken = tmp_path / "broken_iter_30000.pth"
    decoder_keys = [k for k in state if k.startswith("decoder.") and state[k].ndim >= 1]
    state[decoder_keys[-1]] = torch.zeros(*[n + 1 for n in state[decoder_keys[-1]].shape])
    torch.save(state, broken)
    run = tmp_path / "out" / "run"
    assert main(["convert", "weclip", str(broken), "--out", str(run)]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert not run.exists() and list((tmp_path / "out").iterdir()) == []
    assert main(["convert", "weclip", str(official), "--out", str(run)]) == 0  # no --overwrite needed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run"]
    assert (run / "clip.safetensors").is_file() and (run / "config.json").is_file()
    assert main(["convert", "weclip", str(official), "--out", str(run), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run"]
    assert len(list(run.glob("ckpt_*.pt"))) == 1
