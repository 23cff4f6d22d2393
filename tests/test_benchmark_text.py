"""The minilm bench's text task and model (benchmarks/text.py, benchmarks/tasks.py), without its packages."""

from __future__ import annotations

import torch

from benchmarks.tasks import TextTransferModel
from benchmarks.text import fortune_texts

FORTUNE_FILE = """%% $FreeBSD$
%
	"Beauty is transitory."
	"Beauty survives."
		-- Spock and Kirk, "That Which Survives", stardate unknown
%
Yow!  Are we having
FUN yet?
%
		-- an attribution alone
%
"""


def test_fortunes_are_read_one_per_entry_without_attributions_or_comments() -> None:
    assert fortune_texts(FORTUNE_FILE) == ['"Beauty is transitory." "Beauty survives."', "Yow! Are we having FUN yet?"]


def test_the_text_model_ignores_padding() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = TextTransferModel(BertModel(config, add_pooling_layer=False), 16, 3).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 7, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])  # the same text, other padding tokens
    shorter = model(torch.stack([ids[:1, :3], mask[:1, :3]], dim=1))

    logits = model(torch.stack([ids, mask], dim=1))

    torch.testing.assert_close(logits[0], logits[1])
    torch.testing.assert_close(logits[:1], shorter)
