"""The numerics a method runs its CLIP with: one object, applied by the method itself.

The official CLIP-ES, WeCLIP and FMA-WSSS code bases do not run OpenAI's CLIP in plain float32. Their
loaders round every Conv/Linear weight and bias, the attention ``in_proj``, ``visual.proj`` and
``text_projection`` to float16 and use them as float32; CLIP-ES and WeCLIP also round the
interpolated positional embedding to float16 (FMA-WSSS does not). These roundings move the outputs
far beyond the golden-fixture tolerances (README of ``tests/data/clip_es``, section 2), so each
method preset carries a :class:`Numerics` and the method applies it to whatever model it is given.

How a method applies it (:meth:`Numerics.bind` → :class:`BoundNumerics`), and what a caller who
shares the model with other code sees:

* **Weights.** If the model's weights are already fp16-exact (loaded with
  ``load_clip(..., round_fp16_weights=True)``), nothing is copied. Otherwise the method keeps its own
  rounded copies of the affected tensors and swaps them in only while it runs (``with bound:``), so
  the caller's model keeps its float32 weights between calls. The copies cost the memory of those
  tensors once more (about 600 MB for ViT-B/16 in float32): load with ``round_fp16_weights=True`` to
  avoid it.
* **Positional embedding** (fp16 rounding and interpolation mode) and **TF32**: set on entry,
  restored on exit.
* **Fingerprint.** Inside the context the model reports ``fingerprint + ":fp16r"`` when its weights
  are rounded, so caches keyed by the fingerprint (text embeddings) never mix the two numerics.
* The swaps change shared state for the duration of a call: do not run two methods with different
  numerics on one model from two threads at the same time.

**fp16 compute** (``fp16_compute=True``, WeCLIP): the official WeCLIP loader converts every
Conv/Linear layer, ``visual.proj`` and ``text_projection`` to float16 on a GPU, so the patch embedding,
the MLPs, the attention output projections and the residual stream run in fp16. Its attention module
is not an ``nn.MultiheadAttention``, so its packed ``in_proj`` stays float32: q/k/v projection, softmax
and the returned maps are float32 (inputs cast up), the output projection casts back to fp16;
LayerNorms compute in float32 and cast back. Inside the context the method holds fp16 copies of those
tensors (half the memory of the float32 ones) and every :class:`~tag2mask.clip.layers.Attention` runs
in that mixed mode; the caller's model is restored on exit. On a CPU the image tower's fp16 products are
emulated (float16 operands, float32 arithmetic, one rounding), because torch's CPU half kernels are
~4x slower; the text tower keeps them (see :func:`_enter_fp16_compute` for the measurements).

TF32: on Ampere and newer GPUs cuDNN runs float32 convolutions in TF32 by default
(``torch.backends.cudnn.allow_tf32 = True``); that changes the patch-embedding convolution and
WeCLIP's 1×1 fuse/classifier convolutions by ~1e-4. :func:`tf32_disabled` turns TF32 off for
convolutions and matmuls and restores the previous flags; every method presets
``allow_tf32=False``. The flags are process-wide; on CPUs they change nothing.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["Numerics", "BoundNumerics", "NUMERICS", "tf32_disabled", "fp16_rounded_tensors", "weights_are_fp16_exact"]

_ROUNDED_SUFFIX = ":fp16r"
_HALF_SUFFIX = ":fp16c"


@dataclass(frozen=True)
class Numerics:
    """Arithmetic settings of a method's CLIP.

    Attributes:
        round_weights_fp16: Conv/Linear weights and biases, attention ``in_proj``, ``visual.proj`` and
            ``text_projection`` rounded to float16 and used as float32 (the official loaders).
        round_pos_embed_fp16: the interpolated positional embedding rounded to float16 (CLIP-ES, WeCLIP).
        pos_interpolation: ``bilinear`` (CLIP-ES, WeCLIP, FMA) or ``bicubic`` for the positional embedding.
        allow_tf32: let cuDNN / cuBLAS use TF32 for float32 convolutions and matmuls (faster on
            Ampere+, not faithful).
        fp16_compute: run the CLIP as WeCLIP's official GPU code does (see the module docstring):
            fp16 Conv/Linear layers and residual stream, float32 q/k/v + softmax, fp16 out-projection.
            The attention ``in_proj`` then keeps its float32 values (the official loader does not
            convert WeCLIP's attention module), so ``round_weights_fp16`` must be False with it.
    """

    round_weights_fp16: bool = False
    round_pos_embed_fp16: bool = False
    pos_interpolation: str = "bilinear"
    allow_tf32: bool = False
    fp16_compute: bool = False

    def __post_init__(self) -> None:
        if self.fp16_compute and self.round_weights_fp16:
            raise ValueError("fp16_compute converts the Conv/Linear weights itself and keeps in_proj in float32; "
                             "round_weights_fp16 would also round in_proj, which the official code does not")
        if self.pos_interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"pos_interpolation must be 'bilinear' or 'bicubic', got {self.pos_interpolation!r}")

    def bind(self, model: nn.Module) -> "BoundNumerics":
        """Prepare ``model`` for these numerics (see the module docstring); use the result as a context."""
        return BoundNumerics(model, self)

    def describe(self) -> str:
        """One line for run records and ``--help`` texts."""
        weights = "fp16-rounded weights" if self.round_weights_fp16 else "float32 weights"
        if self.fp16_compute:
            weights = "fp16 Conv/Linear compute (float32 q/k/v and softmax)"
        parts = [weights,
                 f"{self.pos_interpolation} pos-emb" + (" rounded to fp16" if self.round_pos_embed_fp16 else ""),
                 "TF32 allowed" if self.allow_tf32 else "TF32 off"]
        return ", ".join(parts)


#: The numerics of each official code base, and plain float32.
NUMERICS: dict[str, Numerics] = {
    "clip_es": Numerics(round_weights_fp16=True, round_pos_embed_fp16=True),
    "weclip": Numerics(round_pos_embed_fp16=True, fp16_compute=True),
    "fma": Numerics(round_weights_fp16=True, round_pos_embed_fp16=False),
    "float32": Numerics(),
}


@contextmanager
def tf32_disabled(disable: bool = True) -> Iterator[None]:
    """Turn TF32 off for cuDNN convolutions and CUDA matmuls inside the block; restore the flags after."""
    if not disable:
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def fp16_rounded_tensors(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the official loaders round to fp16 (see :func:`tag2mask.clip.loading.round_weights_to_fp16`)."""
    from tag2mask.clip.layers import Attention

    out: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out += [p for p in (m.weight, m.bias) if p is not None]
        elif isinstance(m, Attention):
            out += [p for p in (m.in_proj_weight, m.in_proj_bias) if p is not None]
    for name in ("text_projection",):
        if isinstance(getattr(model, name, None), nn.Parameter):
            out.append(getattr(model, name))
    visual = getattr(model, "visual", None)
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        out.append(visual.proj)
    return out


def fp16_compute_tensors(model: nn.Module) -> list[nn.Parameter]:
    """The parameters WeCLIP's loader converts to float16: Conv/Linear weights and biases, ``visual.proj``
    and ``text_projection`` (not the attention ``in_proj``)."""
    from tag2mask.clip.layers import Attention

    in_proj = {id(m.in_proj_weight) for m in model.modules() if isinstance(m, Attention)}
    in_proj |= {id(m.in_proj_bias) for m in model.modules() if isinstance(m, Attention)}
    return [p for p in fp16_rounded_tensors(model) if id(p) not in in_proj]


def _is_fp16_exact(t: torch.Tensor) -> bool:
    return t.dtype == torch.float16 or bool(torch.equal(t, t.half().to(t.dtype)))


def weights_are_fp16_exact(model: nn.Module) -> bool:
    """Whether every tensor the official loaders round already holds fp16 values."""
    with torch.no_grad():
        return all(_is_fp16_exact(p.detach()) for p in fp16_rounded_tensors(model))


def _emulated_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    from tag2mask.clip.layers import fp16_linear

    return fp16_linear(x, module.weight, module.bias, emulated=True)


def _emulated_conv(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if module.bias is None else module.bias.half().float()
    return module._conv_forward(x.half().float(), module.weight.half().float(), bias).half()


def _enter_fp16_compute(model: nn.Module) -> tuple[list, list]:
    """Attention modules in WeCLIP's mixed mode; on a CPU, the image tower's Conv/Linear layers emulate
    their fp16 products.

    Why only the image tower, only on CPUs (measured, tiny CLIP fixture, torch 2.13 CPU, 1 thread):
    torch's CPU float16 kernels are ~4x slower than float32 (ViT-B/16 image tower, one 320x320 image:
    17-19 s vs 4-5 s); the emulation (float16 operands, float32 arithmetic, one rounding: what a float16
    GEMM accumulating in float32 returns) costs about as much as float32 and follows the official run
    as closely on the image side (block outputs identical in 37 % vs 36 % of the values, GradCAM
    probabilities 8.1e-4 vs 9.9e-4 apart). The text tower runs once per vocabulary and the native
    kernels reproduce the official text features bit for bit (emulated: 1 fp16 ulp, 4.9e-4), so it
    keeps them. On a GPU every layer runs the native float16 kernels.
    Returns the attention modules with their previous flags and the modules whose forward was replaced.
    """
    from tag2mask.clip.layers import Attention

    visual = getattr(model, "visual", None)
    emulate = visual is not None and next(model.parameters()).device.type == "cpu"
    in_visual = {id(m) for m in visual.modules()} if emulate else set()
    mixed, forwards = [], []
    for m in model.modules():
        if isinstance(m, Attention):
            mixed.append((m, (m.fp16_mixed, m.fp16_emulated)))
            m.fp16_mixed, m.fp16_emulated = True, id(m) in in_visual
        elif id(m) in in_visual and isinstance(m, (nn.Linear, nn.Conv2d)) and "forward" not in m.__dict__:
            m.forward = functools.partial(_emulated_linear if isinstance(m, nn.Linear) else _emulated_conv, m)
            forwards.append(m)
    return mixed, forwards


class BoundNumerics:
    """:class:`Numerics` attached to one model; ``with bound:`` runs code under them.

    Entering is cheap (pointer swaps and flag changes) and re-entrant.
    """

    def __init__(self, model: nn.Module, numerics: Numerics) -> None:
        self.model = model
        self.numerics = numerics
        self._depth = 0
        self._saved: list = []
        swap = []
        if numerics.round_weights_fp16:
            with torch.no_grad():
                swap = [p for p in fp16_rounded_tensors(model) if not _is_fp16_exact(p.detach())]
        elif numerics.fp16_compute:
            swap = [p for p in fp16_compute_tensors(model) if p.dtype != torch.float16]
        self._params = swap
        self._rounded: list[Optional[torch.Tensor]] = [None] * len(swap)
        fp = str(getattr(model, "fingerprint", ""))
        self.fingerprint = fp
        # an anonymous fingerprint ("random-init": never cached) must stay anonymous
        if numerics.round_weights_fp16 and swap and fp not in ("", "random-init") and not fp.endswith(_ROUNDED_SUFFIX):
            self.fingerprint = fp + _ROUNDED_SUFFIX
        elif numerics.fp16_compute and fp not in ("", "random-init") and not fp.endswith(_HALF_SUFFIX):
            self.fingerprint = fp + _HALF_SUFFIX  # fp16 text towers give other embeddings: never mix caches
        self._precompute()

    @property
    def copies_weights(self) -> bool:
        """True when the method holds rounded copies (the model's own weights are not fp16-exact)."""
        return bool(self._params)

    def _precompute(self) -> None:
        with torch.no_grad():
            for i, p in enumerate(self._params):
                cached = self._rounded[i]
                # fp16_compute keeps float16 tensors; rounding alone goes back to the parameter's dtype
                dtype = torch.float16 if self.numerics.fp16_compute else p.dtype
                if cached is None or cached.device != p.device or cached.dtype != dtype or cached.shape != p.shape:
                    self._rounded[i] = p.detach().half().to(dtype)

    def __enter__(self) -> "BoundNumerics":
        self._depth += 1
        if self._depth > 1:
            return self
        visual = getattr(self.model, "visual", None)
        saved = {"fingerprint": getattr(self.model, "fingerprint", None), "data": [p.data for p in self._params]}
        if visual is not None and hasattr(visual, "round_pos_embed_fp16"):
            saved["pos"] = (visual.round_pos_embed_fp16, visual.pos_interpolation)
            visual.round_pos_embed_fp16 = self.numerics.round_pos_embed_fp16
            visual.pos_interpolation = self.numerics.pos_interpolation
        self._precompute()  # the model may have moved to another device since the last call
        for p, r in zip(self._params, self._rounded):
            p.data = r
        if self.numerics.fp16_compute:
            saved["mixed"], saved["forwards"] = _enter_fp16_compute(self.model)
        if saved["fingerprint"] is not None:
            self.model.fingerprint = self.fingerprint
        self._tf32 = tf32_disabled(not self.numerics.allow_tf32)
        self._tf32.__enter__()
        self._saved.append(saved)
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        saved = self._saved.pop()
        try:
            for p, d in zip(self._params, saved["data"]):
                p.data = d
            for m, flags in saved.get("mixed", []):
                m.fp16_mixed, m.fp16_emulated = flags
            for m in saved.get("forwards", []):
                del m.forward  # back to the class's forward
            if "pos" in saved:
                visual = self.model.visual
                visual.round_pos_embed_fp16, visual.pos_interpolation = saved["pos"]
            if saved["fingerprint"] is not None:
                self.model.fingerprint = saved["fingerprint"]
        finally:
            self._tf32.__exit__(None, None, None)
