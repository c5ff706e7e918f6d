"""Run a torch.export program (the CPU artifact's bfloat16 mode, `model.pt2`) like OrtRunner runs a graph."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from mgm_ref.errors import MGMError

PROGRAM_FILE = "model.pt2"


class ProgramArchiveError(MGMError):
    """A .pt2 file holds something this runtime will not unpickle."""


def check_program_archive(path: str | Path) -> None:
    """Refuse an archive whose tensors or sample inputs would be read with pickle: the program is
    JSON and the tensors raw bytes when `mgm-build vision` writes it; torch.export.load would
    unpickle anything else."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(("model_weights_config.json", "model_constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    pickled = [k for k, meta in config.items() if meta.get("use_pickle")]
                    if pickled:
                        raise ProgramArchiveError(f"{path}: {name} stores {pickled[:3]} as pickles")
                elif "/sample_inputs/" in name and archive.getinfo(name).file_size:
                    raise ProgramArchiveError(f"{path}: {name} (pickled sample inputs) is not empty")
    except zipfile.BadZipFile as e:
        raise ProgramArchiveError(f"{path}: not a torch.export archive ({e})") from None


class TorchProgramRunner:
    """One loaded torch.export program; `runner(images=..., images_aux=...)` -> {"image_features": array}.

    `threads`: torch's intra-op threads (process-wide; default: torch's choice, all cores).
    """

    def __init__(self, program_path: str | Path, threads: int | None = None, output_name: str = "image_features"):
        import torch

        self.path = Path(program_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such program")
        check_program_archive(self.path)
        if threads:
            torch.set_num_threads(int(threads))
        self.module = torch.export.load(str(self.path)).module()
        self.output_name = output_name

    def __call__(self, **feeds) -> dict[str, np.ndarray]:
        import torch

        args = [torch.as_tensor(feeds[name]).float() for name in ("images", "images_aux")]
        with torch.inference_mode():
            out = self.module(*args)
        return {self.output_name: out.float().numpy()}
