"""`mgm-client`: ask an MGM Triton server about images, in one shot or as a chat.

    mgm-client --image cat.jpg --prompt "What is in the picture?" --stream
    mgm-client --image receipt.png --ocr                    # chat: one question per line, empty line ends
    mgm-client --image cat.jpg --prompt "Paint it." --gen --sd_model ~/sdxl-base --output_file cat.png

Without --prompt it chats like the original CLI: the images go with the first turn, earlier turns
are kept here and sent as `history`, so the server rebuilds the whole conversation with the model's
own template (the images are sent again with every turn: the server places them in the first).

--ocr and --gen change the question text exactly as the original CLI does (see client/ocr.py for
why that places the OCR hint correctly for every template, unlike the original worker).
The answer goes to stdout; notes go to stderr. Errors exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from client.generation import DEFAULT_OUTPUT, add_gen_tag, generate_from_answer
from client.mgm_client import Answer, ClientError, MGMClient, read_image
from client.ocr import add_ocr_reference, ocr_tokens
from mgm_ref.constants import MAX_IMAGE_BYTES
from mgm_ref.errors import MGMError, run_cli

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
EXIT_ERROR = 2


def build_question(question: str, ocr: str = "", gen: bool = False) -> str:
    """The user text sent to the server: question, then the OCR hint, then " <GEN>" (the original's order).

    `ocr` is the joined OCR tokens (client.ocr.ocr_tokens); "" adds nothing, as in the original.
    """
    question = add_ocr_reference(question, ocr)
    return add_gen_tag(question) if gen else question


def check_image(data: bytes, name: str) -> bytes:
    """`data` if it is within the shared limits and PIL can decode it, else ClientError naming `name`
    (fails here, not on the server)."""
    from PIL import Image

    from mgm_ref.preprocess import check_image_format

    if len(data) > MAX_IMAGE_BYTES:
        raise ClientError(f"the image {name} is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_image_format(im)
            im.verify()
    except MGMError as e:
        raise ClientError(f"the image {name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises several kinds for a bad file
        raise ClientError(f"cannot decode the image {name}: {e or type(e).__name__}") from None
    return data


def load_images(paths: Sequence[str | Path]) -> list[bytes]:
    """Read and check each image file; ClientError names the file that cannot be used."""
    return [check_image(read_image(path), str(path)) for path in paths]


def add_client_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("server")
    g.add_argument(
        "--url",
        default=None,
        help="host:port of the Triton server (default localhost:8001 for grpc, localhost:8000 for http)",
    )
    g.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    g.add_argument(
        "--model",
        choices=("mgm_bls", "ensemble"),
        default="mgm_bls",
        help="mgm_bls streams token by token; ensemble sends the answer in one piece",
    )
    g.add_argument(
        "--model_name",
        default=None,
        help="variant added with `mgm-build repo --name NAME` (its models are NAME_mgm_bls, ...)",
    )
    g.add_argument("--ready_timeout", type=float, default=10.0, help="seconds to wait for the model to be ready")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for an answer")
    g = p.add_argument_group("request")
    g.add_argument("--image", action="append", default=[], metavar="FILE", help="image file (repeat for several)")
    g.add_argument("--prompt", default=None, help="the question; without it, chat interactively")
    g.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    g.add_argument("--max_tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=None, help="default: the server's (0 = greedy)")
    g.add_argument("--top_p", type=float, default=None)
    g.add_argument("--top_k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--conv_mode", default=None, help="chat template (default: the server picks the model's)")
    g = p.add_argument_group("OCR and image generation")
    g.add_argument("--ocr", action="store_true", help="add the text found in the images to the question")
    g.add_argument("--gen", action="store_true", help="ask for an image prompt (<GEN>) and render it")
    g.add_argument("--sd_model", default=None, help="local Stable Diffusion XL folder for --gen (never downloaded)")
    g.add_argument("--output_file", default=DEFAULT_OUTPUT, help="where --gen saves the image")
    p.add_argument(
        "--debug",
        action="store_true",
        help="print the question as sent (and the prompt with --conv_mode); tracebacks of errors too",
    )
    return p


def note(message: str) -> None:
    print(f"[mgm-client] {message}", file=sys.stderr, flush=True)


class Chat:
    """One conversation: the images, the OCR tokens found in them, and the turns so far."""

    def __init__(self, client: MGMClient, images: list[bytes], args: argparse.Namespace, out: Callable[[str], None]):
        self.client, self.images, self.args, self.out = client, images, args, out
        self.history: list[tuple[str, str]] = []
        self.ocr = ""
        if args.ocr:
            self.ocr = ocr_tokens(images)
            note(f"OCR tokens: {self.ocr}" if self.ocr else "OCR found no text in the image(s)")

    def ask(self, question: str) -> Answer:
        args = self.args
        sent = build_question(question, self.ocr, args.gen)
        if args.debug:
            note(f"question: {sent!r}")
            if args.conv_mode:
                from mgm_ref.conversation import build_prompt

                note(f"prompt: {build_prompt(args.conv_mode, sent, len(self.images), self.history)!r}")
        kwargs = dict(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            conv_mode=args.conv_mode,
            history=list(self.history),
        )
        if args.stream:
            answer = self.client.stream_answer(sent, self.images, on_delta=self.out, **kwargs)
        else:
            answer = self.client.generate(sent, self.images, **kwargs)
            self.out(answer.text)
        self.out("\n")
        self.history.append((sent, answer.text.strip()))
        if args.gen:
            result = generate_from_answer(answer.text, args.sd_model, args.output_file)
            if result.prompt:
                self.out(f"Image prompt: {result.prompt}\n")
            if result.image_path:
                self.out(f"Generated an image, saved at {result.image_path}\n")
            if result.note:
                note(result.note)
        return answer


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace, client_factory=MGMClient) -> int:
    if args.ocr and not args.image:
        raise ClientError("--ocr needs at least one --image")
    if args.prompt is not None and not args.prompt.strip():
        raise ClientError("--prompt is empty")
    images = load_images(args.image)
    client = client_factory(
        args.url or DEFAULT_URLS[args.protocol],
        protocol=args.protocol,
        model=f"{args.model_name}_{args.model}" if args.model_name else args.model,
        timeout_s=args.timeout,
    )
    client.wait_ready(args.ready_timeout)
    chat = Chat(client, images, args, _write)
    if args.prompt is not None:
        chat.ask(args.prompt)
        return 0
    failed = False
    while True:
        try:
            question = input("USER: ")
        except EOFError:
            question = ""
        if not question.strip():
            print("exit...", file=sys.stderr)
            return EXIT_ERROR if failed else 0
        _write("ASSISTANT: ")
        try:
            chat.ask(question)
        except ClientError as e:  # a failed turn is dropped; the chat goes on
            failed = True
            _write("\n")
            print(f"mgm-client: error: {e}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_client_arguments(
        argparse.ArgumentParser(
            prog="mgm-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    args = parser.parse_args(argv)
    try:
        return run_cli("mgm-client", lambda: run(args), debug=args.debug)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
