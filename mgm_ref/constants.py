"""Constants of the original MGM code (mgm/constants.py)."""

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"

# OpenAI CLIP normalisation, used by both towers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LR_IMAGE_SIZE = 336  # CLIP ViT-L/14-336 input side
LR_TOKENS_PER_VIEW = 576  # 24 x 24 patches, CLS dropped

# Real tower architectures, used when config.json does not describe the towers.
CONVNEXT_LARGE = {"dims": [192, 384, 768, 1536], "depths": [3, 3, 27, 3]}
CLIP_VIT_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

# Limits on what a request may carry: the README's "Limits" table. The server, the client library, the
# CLI and the web demo all read these, so a request one of them accepts is not refused by another for
# a different number.
MiB = 1024 * 1024
# Ceiling on images per request. The real number is derived from the context (`max_images_for`) and
# written into the repository's contract: 3 for a 2048-token context at 576 rows per image, 1 for HD.
MAX_IMAGES_PER_REQUEST = 4
# The image is padded to a square before it is resized: the limit applies to max(w, h)^2, the canvas
# actually allocated, so a 20000x10 strip is refused as the 400 MP square it would become.
MAX_IMAGE_PIXELS = 64_000_000
MAX_IMAGE_BYTES = 16 * MiB  # one encoded image
ACCEPTED_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # PIL format names; anything else is refused by name
# Tokens of text the prompt keeps beside its images (template, system prompt, question): an image
# count whose rows leave less than this can never be answered, so it is not offered.
MIN_TEXT_TOKENS = 64
# Text bytes one token may stand for, at most. Every MGM tokenizer maps its input onto tokens without
# shortening it (byte-level BPE: one byte per input byte; sentencepiece: a space becomes a 3-byte
# marker), so a text of N bytes needs at least N / (longest token) tokens. Their longest tokens decode
# to well under 128 bytes (runs of spaces or dashes), so N > 128 * max_input_len can never fit: such
# text is refused by its byte count, before any tokenising. The exact token count is checked after.
MAX_BYTES_PER_TOKEN = 128
# The largest context an MGM checkpoint has (MGM-8B, LLaMA-3): what the client side checks text
# against, as it does not know the served model's max_input_len (the server checks the exact one).
MAX_CONTEXT_TOKENS = 8192
MAX_TEXT_BYTES = MAX_CONTEXT_TOKENS * MAX_BYTES_PER_TOKEN  # 1 MiB: query + history + system prompt
# One request at each transport. gRPC carries the image bytes raw; HTTP's generate endpoint takes
# JSON, where an image byte is a decimal number and a comma (up to 4 bytes), so over HTTP a request
# carries about a quarter of the image bytes (use gRPC for large images).
MAX_GRPC_REQUEST_BYTES = MAX_IMAGES_PER_REQUEST * MAX_IMAGE_BYTES + 2 * MAX_TEXT_BYTES  # 66 MiB
MAX_HTTP_REQUEST_BYTES = 64 * MiB


def text_bytes_limit(max_input_len: int) -> int:
    """Bytes of query + history + system prompt that could still fit `max_input_len` tokens."""
    return max_input_len * MAX_BYTES_PER_TOKEN


def max_images_for(max_input_len: int, tokens_per_image: int, hd: bool = False) -> int:
    """Images per request that leave MIN_TEXT_TOKENS of the context for text (0: not even one)."""
    fit = max(0, (max_input_len - MIN_TEXT_TOKENS) // tokens_per_image)
    return min(1 if hd else MAX_IMAGES_PER_REQUEST, fit)


# temperature <= this means greedy, as in the original MGM worker
GREEDY_TEMPERATURE = 0.001
