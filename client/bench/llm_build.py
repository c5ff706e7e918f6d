"""Wall time and peak memory of `mgm-build llm` (calibrate + quantize + export) for LLMs of chosen sizes.

    mgm-bench llm_build --out DIR [--family llama] [--hidden 2048] [--layers 4]
        [--intermediate 5632] [--heads 16] [--kv_heads 16] [--vocab 32000] [--experts 0]
        [--qformats full_prec,fp8,int8_sq,int4_awq] [--calib_size 8] [--calib_max_len 256] [--dtype float16]

Writes a random MGM checkpoint in the official format (tiny towers, an LLM of the given size), then runs
each qformat in its own process under /usr/bin/time -v, and prints a JSON line per run: wall time, peak
RSS, the per-step timings from build_info.json, and the size of the exported checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def write_checkpoint(
    out: Path,
    family: str,
    hidden: int,
    layers: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    experts: int = 0,
    seed: int = 0,
) -> Path:
    """An MGM checkpoint with tiny towers and an LLM of the given size (random bf16 weights)."""
    from transformers import AutoModelForCausalLM

    from mgm_ref.config import MGMConfig
    from mgm_ref.tiny import official_state_dict, save_sharded, tiny_config_dict
    from mgm_ref.vision import MGMVisionEncoder

    raw, tokenizer = tiny_config_dict(family)
    raw.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
    )
    if family == "gemma":
        raw["head_dim"] = hidden // heads
    if family == "mixtral":
        raw["num_local_experts"] = experts or raw["num_local_experts"]
    config = MGMConfig.from_dict(raw)
    torch.manual_seed(seed)
    vision = MGMVisionEncoder(config).eval()
    llm = AutoModelForCausalLM.from_config(config.llm_config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    save_sharded(official_state_dict(vision, llm), out, shards=2)
    tokenizer.save_pretrained(out)
    return out


def run_once(model_dir: Path, out: Path, qformat: str, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "build_engines.llm",
        "--model_dir",
        str(model_dir),
        "--output_dir",
        str(out),
        "--qformat",
        qformat,
        *extra,
    ]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    proc = subprocess.run(timer + cmd, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = {"qformat": qformat, "returncode": proc.returncode, "wall_s": round(wall, 1)}
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if peak:
        result["peak_rss_gib"] = round(int(peak.group(1)) / 2**20, 3)
    info_path = out / "build_info.json"
    if proc.returncode == 0 and info_path.is_file():
        info = json.loads(info_path.read_text())
        result["timings_s"] = info["timings_s"]
        result["params"] = info["llm"]["params"]
        result["checkpoint_gib"] = round(sum(p.stat().st_size for p in (out / "checkpoint").glob("*")) / 2**30, 3)
        result["calibration"] = {
            k: (info["quantization"]["calibration"] or {}).get(k) for k in ("size", "mode", "tokens_total")
        }
    else:
        errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "Traceback"))]
        result["error"] = errors[0] if errors else (proc.stderr.strip().splitlines() or ["?"])[-1]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--family", choices=("llama", "gemma", "mixtral"), default="llama")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=0)
    p.add_argument("--qformats", default="full_prec,fp8,int8_sq,int4_awq")
    p.add_argument("--calib_size", type=int, default=8)
    p.add_argument("--calib_max_len", type=int, default=256)
    p.add_argument("--calib_images", choices=("auto", "on", "off"), default="off")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--existing", default=None, help="use this MGM checkpoint instead of writing one")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.existing:
        model_dir = Path(args.existing)
    else:
        model_dir = out / "model"
        start = time.perf_counter()
        write_checkpoint(
            model_dir,
            args.family,
            args.hidden,
            args.layers,
            args.intermediate,
            args.heads,
            args.kv_heads,
            args.vocab,
            args.experts,
        )
        print(json.dumps({"wrote": str(model_dir), "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    extra = [
        "--calib_size",
        str(args.calib_size),
        "--calib_max_len",
        str(args.calib_max_len),
        "--calib_images",
        args.calib_images,
        "--dtype",
        args.dtype,
    ]
    for qformat in args.qformats.split(","):
        print(json.dumps(run_once(model_dir, out / f"build-{qformat}", qformat, extra)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
