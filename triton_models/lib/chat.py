"""The conversation template a served request uses: its own `conv_mode`, else the model's default.

The default comes from the checkpoint's architecture and tokenizer (mgm_ref.conversation), computed
here once for every model of the repository that needs it.
"""

from __future__ import annotations

from pathlib import Path

from mgm_ref.config import MGMConfig
from mgm_ref.conversation import default_conv_mode, get_template


class ChatTemplates:
    def __init__(self, model_dir: str | Path, tokenizer, config: MGMConfig | None = None):
        config = config or MGMConfig.from_model_dir(model_dir)
        self.default = default_conv_mode(config.family, tokenizer)

    def resolve(self, conv_mode: str | None) -> str:
        """The request's template name (checked: MGMError for an unknown one), or the default."""
        name = conv_mode or self.default
        get_template(name)
        return name

    def stop_strings(self, conv_mode: str | None) -> tuple[str, ...]:
        return get_template(self.resolve(conv_mode)).stop_strings
