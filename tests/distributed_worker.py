"""One rank of tests/test_distributed.py, started by ``mlx.launch``: join the ranks, load
this rank's shard, generate plainly and speculatively through the same stream_generate the
CLI uses, count collectives, print one JSON line. User errors: one line on rank 0, exit 2."""

import argparse
import json
import sys

import mlx.core as mx

from mlx_qspec import distributed
from mlx_qspec.errors import UserError
from mlx_qspec.api import stream_generate
from mlx_qspec.quant.linear import QSpecShardedToAllLinear
from mlx_qspec.sampling import make_sampler


def same_rows(sum_over_ranks, dims: int) -> bool:
    """Whether ``sum_over_ranks(x)`` gives each row of a 5-row x the bits it gives that row
    alone: what a verify row needs to equal the plain step at its position."""
    x = mx.random.normal((1, 5, dims), key=mx.random.key(distributed.group().rank()))
    rows = mx.concatenate([sum_over_ranks(x[:, i : i + 1]) for i in range(5)], axis=1)
    return mx.array_equal(sum_over_ranks(x), rows).item()


def row_invariance(model) -> dict:
    """Our sharded-to-all layer (gather, add in rank order) against mlx's (ring all_sum)."""
    layer = next(m for _, m in model.named_modules() if isinstance(m, QSpecShardedToAllLinear))

    def ring_all_sum(x):
        partial = mx.quantized_matmul(x, layer["weight"], layer["scales"], layer["biases"],
                                      group_size=layer.group_size, bits=layer.bits)
        return mx.distributed.all_sum(partial, group=layer.group)

    dims = layer["weight"].shape[1] * 32 // layer.bits
    return {"gathered": same_rows(layer, dims), "ring_all_sum": same_rows(ring_all_sum, dims)}


def run(args):
    distributed.connect(args.timeout)
    model, tokenizer = distributed.load_sharded(args.model, pipeline=args.pipeline)
    prompt = tokenizer.encode(args.prompt)
    out = {"rank": distributed.group().rank(), "ranks": distributed.group().size()}
    drafts = args.drafts.split(",")
    for draft in drafts if args.no_plain else ["none", *drafts]:
        counter = distributed.CollectiveCounter()
        with distributed.counting(counter):
            responses = list(stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                             draft=draft, num_draft_tokens=args.gamma))
        stats = responses[-1].stats
        if draft == drafts[0]:
            spec_stats, spec_counter = stats, counter
        out[draft] = dict(
            tokens=[r.token for r in responses],
            calls=counter.calls, draft_forwards=stats.draft_reads.forwards,
            verify_forwards=stats.verify_reads.forwards, emitted=stats.emitted,
            drafted=stats.drafted, accepted=stats.accepted,
            tokens_per_verify=stats.tokens_per_verify,
        )
    if args.temp:  # every rank draws with rank 0's clock as seed: same draws, same samples
        responses = list(stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                         draft=drafts[0], num_draft_tokens=args.gamma,
                                         sampler=make_sampler(args.temp),
                                         seed=distributed.same_seed(None)))
        out["sampled"] = [r.token for r in responses]
    if not args.pipeline:
        out["same_rows"] = row_invariance(model)
    per_forward = distributed.collectives_per_forward(model)
    out["per_forward"] = per_forward
    out["fields"] = distributed.collective_fields(spec_stats, spec_counter, per_forward)
    print(json.dumps(out), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--pipeline", action="store_true")
    parser.add_argument("--drafts", default="a8-g32", help="comma-separated")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--no-plain", action="store_true", help="speculate only")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--temp", type=float, default=0.0, help="also sample at this temperature")
    parser.add_argument("--timeout", type=float, default=distributed.DEFAULT_CONNECT_TIMEOUT)
    args = parser.parse_args()
    try:
        run(args)
    except UserError as e:
        if distributed.is_main():
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
