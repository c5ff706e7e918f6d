"""MGM = vision encoder + an HF causal LM; image features replace `<image>` (-200) in the input embeddings.

Splicing follows the original `prepare_inputs_labels_for_multimodal`: text pieces are embedded with
`embed_tokens`, each -200 becomes the next image's T rows (576, or 2880 for HD), positions are a plain
arange over the spliced sequence. Batches are left-padded (the original only ran batch 1, right-padded).
Gemma scales `inputs_embeds` by sqrt(hidden) inside HF's GemmaModel, image rows included, as in training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from mgm_ref.config import MGMConfig
from mgm_ref.constants import GREEDY_TEMPERATURE, IMAGE_TOKEN_INDEX
from mgm_ref.conversation import build_prompt, stop_token_ids, trim_answer
from mgm_ref.errors import MGMError, PromptError
from mgm_ref.preprocess import ImageProcessor, PixelInputs
from mgm_ref.tokenization import tokenizer_image_token
from mgm_ref.vision import MGMVisionEncoder


@dataclass
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # <= GREEDY_TEMPERATURE means greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise MGMError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise MGMError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise MGMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise MGMError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


def splice_image_features(
    embed: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, images: Iterator[torch.Tensor]
) -> torch.Tensor:
    """(L, H) inputs_embeds of one sequence: `ids` (1-D) embedded with `embed`, each IMAGE_TOKEN_INDEX
    replaced by all rows of the next tensor of `images` (cast to the embeddings' dtype and device).

    MGM's `prepare_inputs_labels_for_multimodal` for one sequence; the caller checks the image count.
    """
    pieces, start = [], 0
    for pos in torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist():
        text = embed(ids[start:pos])
        pieces += [text, next(images).to(text.device, text.dtype)]
        start = pos + 1
    pieces.append(embed(ids[start:]))
    return torch.cat(pieces)


class MGM:
    def __init__(self, config: MGMConfig, vision: MGMVisionEncoder, llm, tokenizer, conv_mode: str):
        self.config = config
        self.vision = vision
        self.llm = llm
        self.tokenizer = tokenizer
        self.conv_mode = conv_mode
        self.processor = ImageProcessor(config)

    @property
    def device(self) -> torch.device:
        return self.llm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    # ---- vision --------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixels: PixelInputs) -> torch.Tensor:
        """(N, T, H) image features in the LLM's dtype."""
        dev, dt = next(self.vision.mm_projector.parameters()).device, self.vision.dtype
        feats = self.vision(pixels.images.to(dev, dt), pixels.images_aux.to(dev, dt))
        return feats.to(self.device, self.dtype)

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.config.hd and len(images) > 1:
            raise PromptError("HD models take one image per request (the original cannot batch HD crops)")
        return self.encode_images(self.processor(list(images)))

    # ---- text + splicing -----------------------------------------------------------------------
    def stop_token_ids(self) -> list[int]:
        return stop_token_ids(self.tokenizer, self.conv_mode)

    def tokenize(self, prompt: str) -> list[int]:
        return tokenizer_image_token(prompt, self.tokenizer)

    def splice(self, input_ids: Sequence[Sequence[int]], image_features: torch.Tensor | None):
        """Left-padded (inputs_embeds, attention_mask) for a batch; images are consumed in order."""
        embed = self.llm.get_input_embeddings()
        feats = image_features if image_features is not None else torch.empty(0)
        sequences, next_image = [], 0
        for ids in input_ids:
            ids_t = torch.tensor(list(ids), dtype=torch.long, device=self.device)
            is_image = ids_t == IMAGE_TOKEN_INDEX
            n_images = int(is_image.sum())
            if next_image + n_images > len(feats):
                raise PromptError(
                    f"the prompt has {next_image + n_images} <image> tags but only {len(feats)} images were given"
                )
            seq = splice_image_features(embed, ids_t, iter(feats[next_image : next_image + n_images]))
            next_image += n_images
            if seq.shape[0] > self.config.max_length:
                raise PromptError(
                    f"the prompt is {seq.shape[0]} tokens with its image tokens "
                    f"({self.config.tokens_per_image} per image); the model's limit is {self.config.max_length}"
                )
            sequences.append(seq)
        if next_image != len(feats):
            raise PromptError(f"{len(feats)} images were given but the prompt has only {next_image} <image> tags")
        width = max(s.shape[0] for s in sequences)
        hidden = sequences[0].shape[1]
        embeds = torch.zeros(len(sequences), width, hidden, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(sequences), width, dtype=torch.long, device=self.device)
        for row, seq in enumerate(sequences):
            embeds[row, width - seq.shape[0] :] = seq
            mask[row, width - seq.shape[0] :] = 1
        return embeds, mask

    @torch.inference_mode()
    def logits(self, input_ids: Sequence[Sequence[int]], image_features: torch.Tensor | None) -> torch.Tensor:
        embeds, mask = self.splice(input_ids, image_features)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits

    # ---- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        input_ids: Sequence[Sequence[int]],
        image_features: torch.Tensor | None,
        params: GenerationParams | None = None,
        streamer=None,
    ) -> list[list[int]]:
        """New token ids per sequence (stop tokens removed). `streamer` is an HF streamer (batch 1)."""
        params = params or GenerationParams()
        params.validate()
        embeds, mask = self.splice(input_ids, image_features)
        if embeds.shape[1] + params.max_new_tokens > self.llm.config.max_position_embeddings:
            raise PromptError(
                f"prompt ({embeds.shape[1]} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"context of {self.llm.config.max_position_embeddings} positions"
            )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        stops = self.stop_token_ids()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        # None unsets the checkpoint's generation_config values, which greedy decoding must not see.
        sampling = (
            {"temperature": None, "top_p": None, "top_k": None}
            if params.greedy
            else {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or 0}
        )
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            num_beams=1,
            eos_token_id=stops,
            pad_token_id=pad,
            streamer=streamer,
            use_cache=True,
            **sampling,
        )
        results = []
        for row in out.tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            results.append(row[:end])
        return results

    def decode(self, ids: Sequence[int]) -> str:
        return trim_answer(self.tokenizer.decode(ids, skip_special_tokens=True), self.conv_mode)

    def chat(
        self,
        question: str,
        images: Sequence[Image.Image],
        params: GenerationParams | None = None,
        history: list[tuple[str, str]] | None = None,
        conv_mode: str | None = None,
        streamer_factory: Callable | None = None,
    ) -> str:
        """One answer to `question` about `images` (sent with the first turn), after `history`."""
        prompt = build_prompt(conv_mode or self.conv_mode, question, len(images), history)
        feats = self.image_features(images) if images else None
        streamer = streamer_factory(self.tokenizer) if streamer_factory else None
        ids = self.generate([self.tokenize(prompt)], feats, params, streamer)[0]
        return self.decode(ids)
