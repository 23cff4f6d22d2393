"""Backbones of every family the blocks and the default schedule are checked on: torchvision, timm, Hugging Face.

Built with random weights, on the meta device where they allow it (no memory, no weight initialisation).
Shared by the tests and ``benchmarks/blocks_table.py``: test modules import them from here, never from each other.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["HF_MODELS", "TIMM_MODELS", "TORCHVISION_MODELS", "hf_models", "timm_model", "torchvision_model"]

TORCHVISION_MODELS = torchvision.models.list_models(module=torchvision.models)
TIMM_MODELS = [
    "resnet18", "resnetv2_18", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_050", "regnetx_002",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "beit_base_patch16_224",
    "eva02_tiny_patch14_224", "levit_128s", "mixer_s16_224", "convmixer_768_32", "coatnet_nano_rw_224",
    "maxvit_nano_rw_256", "densenet121", "dla34", "dpn68", "ghostnet_050", "hrnet_w18_small", "inception_v3",
    "nf_resnet26", "pvt_v2_b0", "rexnet_100", "tresnet_m", "vgg11", "xcit_nano_12_p16_224", "cait_xxs24_224",
]  # fmt: skip
HF_MODELS = ["bert", "roberta", "distilbert", "gpt2", "llama", "t5_encoder", "vit", "clip_vision", "whisper_encoder"]
"""The Hugging Face backbones of :func:`hf_models` (which also builds ``"bert_for_classification"``, with a head)."""

TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}

HfModel = tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]], list[str]]


class _EmptyOnMeta(TorchFunctionMode):
    """Parameters (``torch.empty``) on the meta device, other tensors on the CPU: for models that compute their
    layout from tensors at construction (torchvision RegNet)."""

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's and timm's notes on their weight initialisation
        try:
            with torch.device("meta"):
                return build()
        except NotImplementedError:  # "Cannot copy out of meta tensor"
            with _EmptyOnMeta():
                return build().to("meta")


@functools.cache
def torchvision_model(name: str) -> nn.Module:
    return _on_meta(lambda: torchvision.models.get_model(name, weights=None))


@functools.cache
def timm_model(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    return _on_meta(lambda: timm.create_model(name, pretrained=False))


def hf_models() -> dict[str, HfModel]:
    """name: (model builder, example input, expected blocks at either granularity); tiny configurations."""
    t = pytest.importorskip("transformers")
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    def tokens() -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, 99, (1, 8)),)

    def image() -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, 3, 32, 32),)

    def layers(stack: str, last: str) -> list[str]:
        return [f"{stack}.0", f"{stack}.1", f"{stack}.2+{last}"]

    vision = {"image_size": 32, "patch_size": 8, **TINY}
    return {
        "bert": (lambda: t.BertModel(t.BertConfig(vocab_size=100, **TINY)), tokens,
                 ["embeddings", *layers("encoder.layer", "pooler")]),
        "roberta": (lambda: t.RobertaModel(t.RobertaConfig(vocab_size=100, **TINY)), tokens,
                    ["embeddings", *layers("encoder.layer", "pooler")]),
        "distilbert": (
            lambda: t.DistilBertModel(t.DistilBertConfig(vocab_size=100, dim=32, n_layers=3, n_heads=2, hidden_dim=64)),
            tokens, ["embeddings", "transformer.layer.0", "transformer.layer.1", "transformer.layer.2"]),
        "gpt2": (lambda: t.GPT2Model(t.GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=2, bos_token_id=0,
                                                  eos_token_id=0)), tokens, ["stem", *layers("h", "ln_f")]),
        "llama": (lambda: t.LlamaModel(t.LlamaConfig(vocab_size=100, num_key_value_heads=2, **TINY)), tokens,
                  ["embed_tokens", *layers("layers", "norm")]),
        "t5_encoder": (
            lambda: t.T5EncoderModel(
                t.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=3, num_heads=2)),
            tokens, ["shared", *layers("encoder.block", "encoder.final_layer_norm")]),
        "vit": (lambda: t.ViTModel(t.ViTConfig(**vision)), image,
                ["embeddings", *layers("layers", "layernorm+pooler")]),
        "clip_vision": (lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**vision)), image,
                        ["stem", *layers("encoder.layers", "post_layernorm")]),
        "whisper_encoder": (
            lambda: WhisperEncoder(t.WhisperConfig(d_model=32, encoder_layers=3, encoder_attention_heads=2,
                                                   encoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16)),
            lambda: (torch.zeros(1, 8, 32),), ["stem", *layers("layers", "layer_norm")]),
        "bert_for_classification": (
            lambda: t.BertForSequenceClassification(t.BertConfig(vocab_size=100, **TINY)), tokens,
            ["bert.embeddings", *layers("bert.encoder.layer", "bert.pooler"), "classifier"]),
    }  # fmt: skip
