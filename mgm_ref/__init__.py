"""mgm_ref: the PyTorch reference Mini-Gemini (MGM), the oracle every other stage is checked against.

Where things are made:
- config.py        official config.json -> MGMConfig (variant, token counts, tower architectures)
- preprocess.py    PIL image -> (images, images_aux) pixel tensors, exactly as the original
- vision.py        CLIP + ConvNeXt towers, patch info mining, projector -> image features (B, T, H)
- conversation.py  chat templates; tokenization.py: `<image>` -> -200 ids
- model.py         splicing image features into the LLM, generation (greedy / sampled / streamed)
- loader.py        local checkpoint folder -> MGM (safetensors only, strict keys)
- tiny.py          writes tiny random checkpoints in the official format
- cli.py           `python -m mgm_ref.cli`
"""

from mgm_ref.errors import CheckpointError, ImageError, MGMError, PromptError  # noqa: F401
