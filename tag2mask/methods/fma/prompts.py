"""CoOp prompt learning on a frozen CLIP text tower (the trainable part of FMA-WSSS).

Every class ``g`` gets the token sequence of ``"X X ... X {name}."`` (``n_ctx`` placeholders); the
placeholders' embeddings are replaced by learned context vectors:

* name at the end:   ``[SOT] ctx_1..ctx_M name . [EOT] pad``
* name in front:     ``[SOT] name ctx_1..ctx_M . [EOT] pad``
* empty name:        ``[SOT] ctx_1..ctx_M . [EOT] pad`` (FMA's "nameless" background prompts)

The context is shared by all classes (``(M, W)``) or class-specific (``(G, M, W)``). The token
embeddings of the fixed parts are computed once from the frozen CLIP and kept as non-persistent
buffers, so the module's state dict holds the context only.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Union

import torch
from torch import nn

from tag2mask.clip.model import CLIP
from tag2mask.clip.tokenizer import get_tokenizer, tokenize

__all__ = ["PromptLearner", "seed_from_string", "draw_context", "NAME_POSITIONS"]

NAME_POSITIONS = ("end", "front")
PLACEHOLDER = "X"

Seed = Union[int, str]


def seed_from_string(seed: Seed) -> int:
    """An integer seed; strings hash to ``int(sha1(utf-8)) mod 2**32`` (stable across processes).

    This is how the official toolkit turns its string seeds (``'真'``, ``'机'``) into torch seeds.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, str)):
        raise TypeError(f"seed must be an int or a string, got {type(seed).__name__}")
    if isinstance(seed, int):
        return seed
    return int(hashlib.sha1(seed.encode("utf-8")).hexdigest(), 16) % (2**32)


def draw_context(shape: Sequence[int], std: float, seed: Seed) -> torch.Tensor:
    """``N(0, std)`` context of ``shape`` from a private CPU generator seeded with ``seed``.

    Equals ``torch.manual_seed(seed_from_string(seed))`` followed by ``normal_(0, std)`` on the CPU
    (the official initialisation), without touching the global RNG. float32.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed_from_string(seed))
    return torch.empty(tuple(shape), dtype=torch.float32).normal_(0.0, std, generator=generator)


class PromptLearner(nn.Module):
    """Learned prompts for ``class_names`` (foreground and background names in one list).

    Args:
        model: the frozen CLIP whose token embedding and text tower are used.
        class_names: G names; ``_`` becomes a space; ``""`` gives a nameless prompt.
        n_ctx: number of context tokens M (16 in FMA-WSSS).
        class_specific: one context per class ``(G, M, W)`` instead of a shared ``(M, W)``.
        name_position: ``'end'`` or ``'front'``.
        ctx_std: standard deviation of the initial context.
        seed: int or string seed of the initial context (see :func:`draw_context`).
    """

    def __init__(
        self,
        model: CLIP,
        class_names: Sequence[str],
        n_ctx: int = 16,
        class_specific: bool = False,
        name_position: str = "end",
        ctx_std: float = 0.02,
        seed: Seed = 0,
    ):
        super().__init__()
        if name_position not in NAME_POSITIONS:
            raise ValueError(f"name_position must be one of {NAME_POSITIONS}, got {name_position!r}")
        if not 1 <= n_ctx <= model.context_length - 3:
            # checked before the placeholder text is built: a recipe asking for 10^8 context tokens
            # would otherwise allocate gigabytes before the tokenizer refuses it
            raise ValueError(f"n_ctx must be 1..{model.context_length - 3} (the prompt must fit CLIP's "
                             f"{model.context_length} tokens with a name), got {n_ctx}")
        names = [str(n).replace("_", " ").strip() for n in class_names]
        if not names:
            raise ValueError("PromptLearner needs at least one class name")
        self.class_names = names
        self.n_ctx = n_ctx
        self.class_specific = class_specific
        self.name_position = name_position
        width = model.token_embedding.weight.shape[1]
        context_length = model.context_length

        tokenizer = get_tokenizer()
        placeholders = " ".join([PLACEHOLDER] * n_ctx)
        texts = [f"{placeholders} {name}." for name in names]
        token_ids = tokenize(texts, context_length, truncate=False)
        name_lens = torch.tensor([len(tokenizer.encode(n)) for n in names], dtype=torch.long)
        with torch.no_grad():
            embedded = model.token_embedding(token_ids.to(model.token_embedding.weight.device)).float().cpu()
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("name_lens", name_lens, persistent=False)
        self.register_buffer("eot_positions", token_ids.argmax(dim=-1), persistent=False)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)  # (G, 1, W): SOT
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)  # name . EOT pad
        shape = (len(names), n_ctx, width) if class_specific else (n_ctx, width)
        self.ctx = nn.Parameter(draw_context(shape, ctx_std, seed))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def initialize(self, seed: Seed, std: float) -> None:
        """Redraw the context in place (see :func:`draw_context`)."""
        with torch.no_grad():
            self.ctx.copy_(draw_context(tuple(self.ctx.shape), std, seed).to(self.ctx.device))

    def forward(self) -> torch.Tensor:
        """Embedded prompts before the text positional embedding: (G, context_length, W)."""
        g = self.num_classes
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(g, -1, -1)
        prefix, suffix = self.prefix.to(ctx.dtype), self.suffix.to(ctx.dtype)
        if self.name_position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        rows = []
        for i in range(g):
            n = int(self.name_lens[i])
            rows.append(torch.cat([prefix[i], suffix[i, :n], ctx[i], suffix[i, n:]], dim=0))
        return torch.stack(rows)

    def text_features(self, model: CLIP, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Text features of the prompts (not normalised): (G, D), or (len(rows), D) for a subset."""
        prompts = self()
        eot = self.eot_positions
        if rows is not None:
            prompts, eot = prompts[rows], eot[rows]
        return model.encode_token_embeddings(prompts.to(model.dtype), eot)
