"""User mistakes as their own exception type, so the CLI can tell them from bugs: a
``UserError`` prints its one-line message and exits 2; anything else is a bug and keeps
its traceback (exit 1). :func:`run_cli` is that rule for every command."""

import os
import sys

# Exit codes besides 0 (done) and 2 (a user mistake): Ctrl-C and a reader that went away,
# as a shell reports a process those signals ended.
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class UserError(ValueError):
    """An argument, flag or input the user gave cannot be used. A ``ValueError`` so that
    API callers who catch ``ValueError`` for bad arguments keep working."""


class ModelError(UserError):
    """A model path, file, hub id or option the user gave cannot be used."""


def run_cli(parser, argv, body) -> None:
    """Run ``body(args, parser)`` as a command: a user mistake is one line and exit 2;
    Ctrl-C stops cleanly (what was printed stays, exit 130); a closed stdout (``| head``)
    ends quietly (exit 141). Anything else is a bug and keeps its traceback (exit 1)."""
    args = parser.parse_args(argv)
    try:
        body(args, parser)
    except UserError as e:  # ModelError included
        sys.stdout.flush()
        # Under mlx.launch every rank fails alike: one line, from rank 0 (MLX_RANK).
        main_rank = os.environ.get("MLX_RANK", "0") == "0"
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).splitlines())}\n"
                    if main_rank else None)
    except KeyboardInterrupt:
        try:
            sys.stdout.write("\n")
            sys.stdout.flush()
        except BrokenPipeError:
            pass
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # Python would flush stdout again at exit and print the error: point it at devnull.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
