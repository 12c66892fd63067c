"""An offline prompt conditioner: a word vocabulary fixed in code and learned token embeddings.

No tokenizer or network download is involved. A prompt is lower-cased, split into words (runs of
letters or digits), each word mapped to its id in `VOCABULARY` (unknown words to `<unk>`), then padded
or truncated to `max_length` tokens. The empty prompt (all `<pad>`) is the null condition for
classifier-free guidance.

`encode` returns `{"tokens": (B, L) long}`; `forward(tokens)` gives the (B, L, D)
`encoder_hidden_states` the UNet cross-attends to. `prompt_digit` tells which digit a prompt names ("a
handwritten 7" or "a handwritten seven" → 7; −1 when none): digit rewards read it from the prompt text
that `Backbone.condition` keeps under `cond["prompt"]`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PAD, UNK = "<pad>", "<unk>"
#: the fixed vocabulary (index = token id); extending it changes the embedding table's size.
VOCABULARY: tuple[str, ...] = (
    PAD,
    UNK,
    *(str(d) for d in range(10)),
    *DIGIT_WORDS,
    "a", "an", "the", "of", "handwritten", "digit", "number", "image", "picture", "photo",
    "drawing", "written", "by", "hand", "black", "white", "small", "large", "bold", "thin",
)  # fmt: skip
WORD_IDS = {w: i for i, w in enumerate(VOCABULARY)}
_WORD = re.compile(r"[a-z]+|[0-9]")


def digit_prompt(d: int) -> str:
    """The canonical prompt of digit `d`: "a handwritten {d}"."""
    return f"a handwritten {d}"


DIGIT_PROMPTS: tuple[str, ...] = tuple(digit_prompt(d) for d in range(10))


def words(prompt: str) -> list[str]:
    """Lower-cased words of a prompt (runs of letters, single digits)."""
    return _WORD.findall(str(prompt).lower())


def prompt_digit(prompt: str) -> int:
    """The digit a prompt names (first "0".."9" or "zero".."nine" word), or −1 if none."""
    for w in words(prompt):
        if w.isdigit():
            return int(w)
        if w in DIGIT_WORDS:
            return DIGIT_WORDS.index(w)
    return -1


def tokenize(prompts: Sequence[str], max_length: int = 8) -> Tensor:
    """Token ids (B, max_length) of `prompts`, padded with `<pad>` (id 0), unknown words → `<unk>`."""
    out = torch.zeros((len(prompts), max_length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [WORD_IDS.get(w, WORD_IDS[UNK]) for w in words(p)][:max_length]
        if ids:
            out[i, : len(ids)] = torch.tensor(ids)
    return out


class PromptConditioner(nn.Module):
    """Learned token + position embeddings over the in-code vocabulary, one small MLP on top.

    Args:
        embed_dim: D, the width of the hidden states (the UNet's `cross_attention_dim`; the backbone
            sets it).
        max_length: L, tokens per prompt.
    """

    def __init__(self, embed_dim: int = 32, max_length: int = 8) -> None:
        super().__init__()
        self.embed_dim, self.max_length = embed_dim, max_length
        self.token = nn.Embedding(len(VOCABULARY), embed_dim)
        self.position = nn.Parameter(torch.zeros(max_length, embed_dim))
        self.mlp = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.SiLU())
        self.out = nn.Linear(embed_dim, embed_dim)
        nn.init.normal_(self.position, std=0.02)

    def encode(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """`{"tokens": (B, L)}` for a list of prompt strings (on the module's device)."""
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, got a single string")
        return {"tokens": tokenize([str(p) for p in prompts], self.max_length).to(self.token.weight.device)}

    def null(self, cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The empty prompt (all `<pad>`) for every row."""
        return {"tokens": torch.zeros_like(cond["tokens"])}

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids → (B, L, D) encoder hidden states."""
        h = self.token(tokens) + self.position[: tokens.shape[1]]
        return h + self.out(self.mlp(h))
