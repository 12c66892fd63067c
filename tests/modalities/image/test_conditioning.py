"""The offline prompt conditioner: fixed vocabulary, digit parsing, null condition."""

import torch

from diffalign.modalities.image import VOCABULARY, PromptConditioner
from diffalign.modalities.image.conditioning import WORD_IDS, prompt_digit, tokenize
from diffalign.modalities.image.testing import tiny_image_backbone


def test_tokenize_uses_the_in_code_vocabulary():
    ids = tokenize(["a handwritten 7", "A Handwritten zebra!", ""], max_length=5)
    assert ids.shape == (3, 5) and ids.dtype == torch.long
    assert ids[0].tolist() == [WORD_IDS["a"], WORD_IDS["handwritten"], WORD_IDS["7"], 0, 0]
    assert ids[1, 2].item() == WORD_IDS["<unk>"]  # unknown word, case-insensitive
    assert ids[2].sum() == 0  # the empty prompt is all padding
    assert tokenize(["a " * 20], max_length=4).shape == (1, 4)  # truncated
    assert VOCABULARY[0] == "<pad>" and len(set(VOCABULARY)) == len(VOCABULARY)


def test_prompt_digit():
    assert prompt_digit("a handwritten 7") == 7
    assert prompt_digit("the number seven") == 7
    assert prompt_digit("a handwritten zero, bold") == 0
    assert prompt_digit("a cat") == -1


def test_encode_condition_and_null_condition():
    backbone = tiny_image_backbone()
    cond = backbone.condition({"prompt": ["a handwritten 1", "a handwritten 2"]})
    assert set(cond) == {"tokens", "prompt"} and cond["prompt"] == ["a handwritten 1", "a handwritten 2"]
    null = backbone.null_condition(cond)
    assert set(null) == {"tokens"} and null["tokens"].abs().sum() == 0
    assert torch.equal(null["tokens"], backbone.condition({"prompt": ["", ""]})["tokens"])
    h = backbone.conditioner(cond["tokens"])
    assert h.shape == (2, cond["tokens"].shape[1], 8)
    assert not torch.allclose(h[0], h[1])  # different prompts, different hidden states
    assert not torch.allclose(h, backbone.conditioner(null["tokens"]))


def test_conditioner_is_trainable_and_needs_no_files():
    c = PromptConditioner(embed_dim=16, max_length=4)
    out = c(c.encode(["a handwritten 5"])["tokens"])
    out.sum().backward()
    assert c.token.weight.grad is not None
