"""``python -m mlx_qspec.cache_prompt``: the twin of ``mlx_lm.cache_prompt``.

The prompt's KV cache is computed through the same layers and attention that
``mlx_qspec.generate`` decodes with (so a cached prefix is what generate would have
computed) and saved with mlx-lm's ``save_prompt_cache``; ``mlx_qspec.generate
--prompt-cache-file`` (plain or speculative) and ``mlx_lm.generate`` read it.
"""

import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

from .. import hooks, store
from ..cli import (
    ArgumentParser,
    add_kv_args,
    add_model_args,
    check_before_load,
    check_text_args,
    default_model_path,
    progress,
    read_prompt,
    run_cli,
    setting,
)
from ..decoder import prefill
from ..errors import UserError
from ..kv_cache import check_kv_bits
from ..loader import load
from ..settings import Settings

# The metadata key of the model a cache was made with (store.weights_fingerprint): generate
# refuses the cache for any other model (its shapes would fail deep in attention, or worse,
# the same shapes would silently continue another model's context).
MODEL_FINGERPRINT = "model_fingerprint"


def setup_arg_parser():
    parser = ArgumentParser(
        prog="mlx_qspec.cache_prompt",
        description="Cache the state of a prompt to be reused with mlx_qspec.generate "
        "--prompt-cache-file",
    )
    add_model_args(parser)
    parser.add_argument("--eos-token", default=None, help="End of sequence token for tokenizer")
    parser.add_argument("--prompt-cache-file", required=True,
                        help="The file to save the prompt cache in")
    parser.add_argument("--prompt", required=True,
                        help="Message to be processed by the model ('-' reads from stdin)")
    add_kv_args(parser)
    parser.add_argument("--prefill-step-size", type=setting("prefill_step_size", int),
                        default=Settings.prefill_step_size,
                        help="Number of prompt tokens to process at a time")
    return parser


def prompt_tokens(tokenizer, prompt: str) -> list:
    """mlx-lm's: the user's message left open in the chat template (the query generate
    appends continues it), or the raw text where there is no template."""
    if tokenizer.has_chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=False,
                                             continue_final_message=True)
    return tokenizer.encode(prompt)


def prompt_cache_path(path: str, writing: bool = False) -> Path:
    """The file ``--prompt-cache-file`` names (``~`` expanded), checked before the model
    loads: to read, one that exists; to write (before the prompt is prefilled: minutes for a
    long one), a .safetensors name in a folder that exists and can be written."""
    if writing and not path.endswith(".safetensors"):
        # mx.save_safetensors would add the suffix, and generate would not find the file
        raise UserError(f"--prompt-cache-file '{path}' must end in .safetensors")
    file = Path(path).expanduser()
    folder = file.parent
    if file.is_dir():
        raise UserError(f"--prompt-cache-file '{path}' is a directory" + (
            "; name a file in it" if writing else ", not a file cache_prompt wrote"))
    if not writing:
        if not file.is_file():
            raise UserError(f"--prompt-cache-file '{path}' does not exist")
        return file
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise UserError(f"--prompt-cache-file '{path}': the folder '{folder}' {what}")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--prompt-cache-file '{path}': the folder '{folder}' is not writable")
    return file


def run(args, parser) -> None:
    check_text_args(parser, args)
    settings = check_before_load(args)
    prompt = read_prompt(args.prompt)
    file = prompt_cache_path(args.prompt_cache_file, writing=True)
    tokenizer_config = {"trust_remote_code": args.trust_remote_code}
    if args.eos_token is not None:
        tokenizer_config["eos_token"] = args.eos_token
    model_name = args.model or str(default_model_path())
    model, tokenizer = load(model_name, adapter_path=args.adapter_path,
                            tokenizer_config=tokenizer_config,
                            trust_remote_code=args.trust_remote_code)
    made_with = store.weights_fingerprint(model)  # as loaded: generate checks it so, too
    tokens = mx.array(prompt_tokens(tokenizer, prompt), mx.uint32)

    cache = make_prompt_cache(model)  # mlx-lm's classes, which its loader knows
    check_kv_bits(cache, settings.kv_bits)
    start = time.perf_counter()

    def quantize():
        maybe_quantize_kv_cache(cache, settings.quantized_kv_start, settings.kv_group_size,
                                settings.kv_bits)

    def prefilled(done, total):  # after the chunk is evaluated: its tokens are done
        speed = done / (time.perf_counter() - start)
        progress(f"prefill ({speed:.1f} tok/s)", done, total)

    prefill(hooks.install(model), tokens, cache, settings.prefill_step_size, quantize,
            progress=prefilled)
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB", file=sys.stderr)
    print("Saving...", file=sys.stderr)
    metadata = {"model": model_name, "tokenizer_config": json.dumps(tokenizer_config),
                MODEL_FINGERPRINT: made_with}
    try:
        save_prompt_cache(str(file), cache, metadata)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"--prompt-cache-file '{args.prompt_cache_file}': cannot write it "
                        f"({e})") from None


def main(argv=None):
    run_cli(setup_arg_parser(), argv, run)

