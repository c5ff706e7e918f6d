"""Chat templates of the original MGM (mgm/conversation.py), as data plus one prompt builder.

`build_prompt("vicuna_v1", "What is this?")` gives exactly the string the original CLI sends for a
first turn with one image. Multi-turn: `Conversation.append(role, text)` then `get_prompt()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mgm_ref.constants import DEFAULT_IMAGE_TOKEN
from mgm_ref.errors import MGMError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)


@dataclass
class Conversation:
    name: str
    style: str  # "two" | "gemma" | "llama_3" | "llama_2" | "mpt"
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str = ""
    stop_strings: tuple[str, ...] = ()  # text that ends an answer (trimmed from the output)
    stop_token_strings: tuple[str, ...] = ()  # special tokens that end generation besides EOS
    messages: list[list] = field(default_factory=list)

    def copy(self) -> Conversation:
        return replace(self, messages=[list(m) for m in self.messages])

    def append(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        turns = self.messages
        if self.style == "two":
            seps = (self.sep, self.sep2)
            out = self.system + seps[0]
            for i, (role, msg) in enumerate(turns):
                out += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
            return out
        if self.style == "gemma":
            seps = (self.sep, self.sep2)
            out = self.system + seps[0]
            for i, (role, msg) in enumerate(turns):
                out += (
                    f"<start_of_turn>{role}\n{msg}<end_of_turn>\n{seps[i % 2]}" if msg else f"<start_of_turn>{role}\n"
                )
            return out
        if self.style == "llama_3":
            out = f"<|start_header_id|>system<|end_header_id|>\n\n{self.system}{self.sep}" if self.system else ""
            for role, msg in turns:
                out += f"<|start_header_id|>{role}<|end_header_id|>\n\n" + (f"{msg}{self.sep}" if msg else "")
            return out
        if self.style == "llama_2":
            out = ""
            for i, (_role, msg) in enumerate(turns):
                if not msg:
                    continue
                if i == 0 and self.system:
                    msg = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{msg}"
                out += f"{self.sep}[INST] {msg} [/INST]" if i % 2 == 0 else f" {msg} {self.sep2}"
            return out.removeprefix(self.sep)
        if self.style == "mpt":
            out = self.system + self.sep
            for role, msg in turns:
                out += f"{role}{msg}{self.sep}" if msg else role
            return out
        raise AssertionError(self.style)


TEMPLATES: dict[str, Conversation] = {
    "vicuna_v1": Conversation(
        "vicuna_v1", "two", VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", stop_strings=("</s>",)
    ),
    "gemma": Conversation(
        "gemma",
        "gemma",
        "",
        ("user", "model"),
        "",
        "<eos>",
        stop_strings=("<end_of_turn>", "<eos>"),
        stop_token_strings=("<end_of_turn>",),
    ),
    # The assistant header really is "system": a quirk of the original that training used too.
    "llama_3": Conversation(
        "llama_3",
        "llama_3",
        LLAMA3_SYSTEM,
        ("user", "system"),
        "<|eot_id|>",
        stop_strings=("<|eot_id|>",),
        stop_token_strings=("<|eot_id|>",),
    ),
    "mistral_instruct": Conversation(
        "mistral_instruct", "llama_2", "", ("USER", "ASSISTANT"), "<s>", "</s>", stop_strings=("</s>",)
    ),
    "chatml_direct": Conversation(
        "chatml_direct",
        "mpt",
        "<|im_start|>system\nAnswer the questions.",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>",
        stop_strings=("<|im_end|>",),
        stop_token_strings=("<|im_end|>",),
    ),
}


def get_template(name: str) -> Conversation:
    if name not in TEMPLATES:
        raise MGMError(f"unknown conversation mode {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name].copy()


def default_conv_mode(family: str, tokenizer=None, vocab_size: int | None = None) -> str:
    """Template from the architecture and the tokenizer, not the folder name (which misses LLaMA-3)."""
    if family == "gemma":
        return "gemma"
    if family == "mixtral":
        return "mistral_instruct"
    vocab = set(tokenizer.get_vocab()) if tokenizer is not None else set()
    if "<|eot_id|>" in vocab or vocab_size == 128256:
        return "llama_3"
    if "<|im_start|>" in vocab or vocab_size == 64000:
        return "chatml_direct"
    return "vicuna_v1"


def stop_token_ids(tokenizer, conv_mode: str) -> list[int]:
    """EOS first, then the template's special stop tokens (LLaMA-3's <|eot_id|>, ChatML's <|im_end|>)."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] + [vocab[s] for s in get_template(conv_mode).stop_token_strings if s in vocab]
    return list(dict.fromkeys(i for i in ids if i is not None))


def trim_answer(text: str, conv_mode: str) -> str:
    """Decoded answer -> the text shown: cut at the template's stop strings, outer spaces removed."""
    for stop in get_template(conv_mode).stop_strings:
        text = text.split(stop)[0]
    return text.strip()


def image_placeholders(question: str, n_images: int) -> str:
    """Put the `<image>` tags first, as the original CLI does; keep tags the user already wrote."""
    if DEFAULT_IMAGE_TOKEN in question or n_images == 0:
        return question
    if n_images == 1:
        return f"{DEFAULT_IMAGE_TOKEN}\n{question}"
    return "".join(f"Image {k + 1}:{DEFAULT_IMAGE_TOKEN}\n" for k in range(n_images)) + question


def build_prompt(
    conv_mode: str,
    question: str,
    n_images: int = 1,
    history: list[tuple[str, str]] | None = None,
    system: str | None = None,
) -> str:
    """Full prompt for `question`, after earlier (user, assistant) turns; images go with the first turn.

    `system` replaces the template's system prompt; templates without one refuse it.
    """
    conv = get_template(conv_mode)
    if system is not None:
        if not conv.system:
            raise MGMError(f"the {conv_mode} chat template has no system prompt to replace")
        conv.system = system
    turns = list(history or []) + [(question, None)]
    for k, (user, answer) in enumerate(turns):
        conv.append(conv.roles[0], image_placeholders(user, n_images) if k == 0 else user)
        conv.append(conv.roles[1], answer)
    return conv.get_prompt()
