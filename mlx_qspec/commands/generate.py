"""``python -m mlx_qspec.generate``'s code: mlx-lm's ``generate`` command, speculating — a
thin shell over the API (:mod:`mlx_qspec.api`), whose ``stream_generate`` and ``generate``
it holds as ``mlx_lm.generate`` does (``mlx_qspec.generate`` finds them here)."""

import json
import sys
from typing import List

from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache

from .. import distributed, store
from ..api import GenerationResponse, generate, stream_generate, summary_line  # noqa: F401
from ..cli import (
    add_draft_args,
    add_kv_args,
    add_sampling_args,
    boolean,
    check_before_load,
    check_text_args,
    decoding_parser,
    default_model_path,
    integer,
    load_drafts,
    read_prompt,
    run_cli,
    template_config,
)
from ..drafts.grammar import NONE
from ..errors import UserError
from ..loader import load
from ..settings import Settings
from .cache_prompt import MODEL_FINGERPRINT, prompt_cache_path

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 100


def setup_arg_parser():
    parser = decoding_parser("mlx_qspec.generate", "Generate text with exactly-lossless "
                             "self-speculative decoding (the flags of mlx_lm.generate, plus the "
                             "draft's).")
    parser.add_argument("--pipeline", action="store_true",
                        help="Under mlx.launch with several ranks: give each machine a share of "
                        "the layers (pipeline) instead of a share of every layer (tensor parallel)")
    parser.add_argument("--extra-eos-token", default=(), nargs="+",
                        help="Add tokens in the list of eos tokens that stop generation")
    parser.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="Message ('-' reads stdin)")
    parser.add_argument("--system-prompt", default=None, help="System prompt for the chat template")
    parser.add_argument("--prefill-response", default=None,
                        help="Prefill response to be used for the chat template")
    parser.add_argument(
        "--max-tokens", "-m", type=integer(1, also=-1), default=DEFAULT_MAX_TOKENS,
        help="Maximum number of tokens to generate (-1: no limit)",
    )
    add_sampling_args(parser)
    parser.add_argument("--ignore-chat-template", action="store_true",
                        help="Use the raw prompt without the tokenizer's chat template")
    parser.add_argument("--chat-template-config", type=template_config, default=None,
                        help="Additional config for `apply_chat_template`: a JSON object")
    parser.add_argument("--verbose", type=boolean, nargs="?", const=True, default=False,
                        help="True (or the bare flag): timings, peak memory and a key=value "
                        "summary line on stderr; False: only the response (the default)")
    parser.add_argument("--prompt-cache-file", default=None,
                        help="A file of saved KV caches (python -m mlx_qspec.cache_prompt) to "
                        "avoid recomputing them")
    add_kv_args(parser)
    add_draft_args(parser)
    return parser


def load_prompt_cache_file(path: str):
    """``(cache, metadata)`` of a file ``cache_prompt`` wrote, or a UserError naming it."""
    try:
        cache, metadata = load_prompt_cache(str(prompt_cache_path(path)), return_metadata=True)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--prompt-cache-file '{path}': cannot read it ({e})") from None
    if not {"model", "tokenizer_config"} <= set(metadata):
        raise UserError(f"--prompt-cache-file '{path}' has no model metadata; write it with "
                        "python -m mlx_qspec.cache_prompt")
    return cache, metadata


def check_cache_model(path: str, cache, metadata: dict, model) -> None:
    """The cache was made with this model (as loaded, before hooks install): the fingerprint
    ``cache_prompt`` recorded (a file made by mlx-lm records none: its layer count, at least)."""
    recorded = metadata.get(MODEL_FINGERPRINT)
    if recorded is not None and recorded != store.weights_fingerprint(model):
        raise UserError(f"--prompt-cache-file '{path}' was made with another model than the "
                        f"one at '{metadata['model']}' now; make it again with "
                        "python -m mlx_qspec.cache_prompt")
    if len(cache) != len(model.layers):
        raise UserError(f"--prompt-cache-file '{path}' holds {len(cache)} layers, the model "
                        f"{len(model.layers)}: it was made with another model")


def _cache_kv_settings(args, cache, settings: Settings) -> Settings:
    """A quantized cache file fixes --kv-bits / --kv-group-size (mlx-lm's rule)."""
    if not isinstance(cache[0], QuantizedKVCache):
        return settings
    for flag, given, stored in (("--kv-bits", args.kv_bits, cache[0].bits),
                                ("--kv-group-size", args.kv_group_size, cache[0].group_size)):
        if given is not None and given != stored:
            raise UserError(f"{flag} {given} does not match the cache from --prompt-cache-file "
                            f"({stored})")
    return settings.but(kv_bits=cache[0].bits, kv_group_size=cache[0].group_size)


def add_eos_tokens(tokenizer, tokens) -> None:
    """mlx-lm's ``--extra-eos-token`` (a token or its id), refusing what the vocabulary lacks
    (the tokenizer would map it to its unknown token and stop on that)."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        known = int(token) < len(vocab) if token.isdigit() else token in vocab
        if not known:
            raise UserError(f"--extra-eos-token '{token}' is not a token of this tokenizer")
        tokenizer.add_eos_token(token)


def build_prompt(args, tokenizer, prompt: str, from_cache: bool) -> List[int]:
    """The prompt's tokens as mlx-lm's CLI builds them: the chat template (with the system
    prompt and a prefilled response) unless ignored; after a cached prefix, only the part
    of the template that follows it."""
    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        messages = [] if args.system_prompt is None else [
            {"role": "system", "content": args.system_prompt}]
        messages.append({"role": "user", "content": prompt})
        has_prefill = args.prefill_response is not None
        if has_prefill:
            messages.append({"role": "assistant", "content": args.prefill_response})
        template = dict(tokenize=False, continue_final_message=has_prefill,
                        add_generation_prompt=not has_prefill)
        prompt = tokenizer.apply_chat_template(messages, **template,
                                               **(args.chat_template_config or {}))
        if from_cache:  # the cached prefix ends where the user's message starts
            messages[-1]["content"] = "<query>"
            test_prompt = tokenizer.apply_chat_template(messages, **template)
            prompt = prompt[test_prompt.index("<query>"):]
    return tokenizer.encode(prompt, add_special_tokens=not use_chat_template)


def print_verbose(response: GenerationResponse, text: str) -> None:
    """mlx-lm's closing lines (on stderr: stdout carries only the text), then the summary."""
    err = sys.stderr
    if not text:
        print("No text generated for this prompt", file=err)
    print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
          file=err)
    print(f"Generation: {response.generation_tokens} tokens, "
          f"{response.generation_tps:.3f} tokens-per-sec", file=err)
    print(f"Peak memory: {response.peak_memory:.3f} GB", file=err)
    stats = response.stats
    if stats.drafted or stats.draft != NONE:
        print(f"Speculation: {stats}", file=err)
    print(summary_line(response), file=err)


def print_distributed(response: GenerationResponse, model, counter, text: str) -> None:
    """:func:`print_verbose` on rank 0, with the rank count and collective calls per token.
    Every rank calls it: counting a forward's collectives is itself a collective."""
    per_forward = distributed.collectives_per_forward(model)
    fields = distributed.collective_fields(response.stats, counter, per_forward)
    if distributed.is_main():
        print_verbose(response, text)
        print(" ".join(f"{k}={v}" for k, v in fields.items()), file=sys.stderr)


def _load(args, ranks: int, settings: Settings):
    """``(model, tokenizer, prompt cache or None, settings)``: the model (this rank's shard
    under mlx.launch), and the cache ``--prompt-cache-file`` holds."""
    cache, tokenizer_config = None, {}
    model_path = args.model
    if args.prompt_cache_file is not None:
        cache, metadata = load_prompt_cache_file(args.prompt_cache_file)
        settings = _cache_kv_settings(args, cache, settings)
        tokenizer_config = json.loads(metadata["tokenizer_config"])
        if model_path is None:
            model_path = metadata["model"]
        elif model_path != metadata["model"]:
            raise UserError(f"--model {model_path} is not the model that made the cache in "
                            f"--prompt-cache-file ({metadata['model']})")
    if ranks > 1:
        model, tokenizer = distributed.load_sharded(
            model_path or default_model_path(), pipeline=args.pipeline,
            tokenizer_config=tokenizer_config, trust_remote_code=args.trust_remote_code)
    else:
        model, tokenizer = load(model_path or default_model_path(),
                                adapter_path=args.adapter_path,
                                tokenizer_config=tokenizer_config,
                                trust_remote_code=args.trust_remote_code)
    if cache is not None and ranks == 1:  # (a rank holds a shard: another fingerprint)
        check_cache_model(args.prompt_cache_file, cache, metadata, model)
    return model, tokenizer, cache, settings


def run(args, parser) -> None:
    check_text_args(parser, args)
    from_file = args.prompt_cache_file is not None
    settings = check_before_load(args, kv_from_file=from_file)
    if from_file and (args.kv_mode != "fp" or args.max_kv_size is not None):
        flag = "--max-kv-size" if args.max_kv_size is not None else f"--kv-mode {args.kv_mode}"
        raise UserError(f"{flag} cannot change the cache read from --prompt-cache-file")
    prompt = read_prompt(args.prompt)
    ranks = distributed.connect().size()  # 1 unless mlx.launch started several
    if ranks > 1:  # every rank draws alike: same drafts, same accept draws, same samples
        settings = settings.but(seed=distributed.same_seed(settings.seed))
    if args.pipeline and ranks == 1:
        raise UserError("--pipeline splits the model over the ranks of mlx.launch; "
                        "this run has one (start it with mlx.launch)")
    if ranks > 1 and args.adapter_path is not None:
        raise UserError("--adapter-path is not supported across machines (as in mlx-lm)")
    model, tokenizer, cache, settings = _load(args, ranks, settings)
    add_eos_tokens(tokenizer, args.extra_eos_token)
    tokens = build_prompt(args, tokenizer, prompt, from_cache=cache is not None)
    show = distributed.is_main()  # one rank prints
    sampler, draft_model, draft_head, settings = load_drafts(args, settings, model, tokenizer,
                                                             show)

    text, response = "", None
    counter = distributed.CollectiveCounter()
    with distributed.counting(counter):
        for response in stream_generate(model, tokenizer, tokens, max_tokens=args.max_tokens,
                                        settings=settings, sampler=sampler, prompt_cache=cache,
                                        draft_model=draft_model, draft_head=draft_head):
            if show:
                sys.stdout.write(response.text)
                sys.stdout.flush()
            text += response.text
    if show:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if args.verbose and ranks > 1:
        print_distributed(response, model, counter, text)
    elif args.verbose:
        print_verbose(response, text)


def main(argv=None):
    run_cli(setup_arg_parser(), argv, run)

