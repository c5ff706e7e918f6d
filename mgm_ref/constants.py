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

# Limits on what a request may carry, the same in the reference, the server and the web demo.
MAX_IMAGES_PER_REQUEST = 4  # HD models take one (their crops fill the context)
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs before decoding
MAX_IMAGE_BYTES = 64 * 1024 * 1024

# temperature <= this means greedy, as in the original MGM worker
GREEDY_TEMPERATURE = 0.001
