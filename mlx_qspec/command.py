"""How a command starts, before anything heavy is imported: Ctrl-C in the seconds that
``python -m mlx_qspec.generate`` spends importing MLX, mlx-lm and transformers exits as it
does later (exit 130, no traceback). Standard library only, so that it is in place from the
first line of a command's ``main``.

Each command module (``generate``, ``chat``, ``cache_prompt``, ``convert``, ``server``,
``train_head``, ``bench``) is a shell made by :func:`shell`: its ``main`` imports the command's code
(``mlx_qspec.commands.<name>``) under :func:`interrupts_exit`, then runs it; its other names
(``convert.convert``, ``chat.Conversation``, …) are looked up there on first use.
"""

import importlib
import signal
import sys
import threading
from contextlib import contextmanager

# Exit codes besides 0 (done) and 2 (a user mistake): Ctrl-C and a reader that went away,
# as a shell reports a process those signals ended.
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def exit_interrupted():
    """What Ctrl-C does to a command: what was printed stays, the line ends, exit 130."""
    try:
        sys.stdout.write("\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # stdout gone or closed: nothing to end
        pass
    sys.exit(EXIT_INTERRUPTED)


def _interrupted(error: BaseException) -> bool:
    """Whether ``error`` is Ctrl-C, or an error it caused: a C extension interrupted while it
    initializes (``mlx.core``) raises ImportError from the KeyboardInterrupt."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def interrupts_exit():
    """Ctrl-C inside the block ends the command quietly (:func:`exit_interrupted`)."""
    try:
        yield
    except (KeyboardInterrupt, ImportError) as e:
        if not _interrupted(e):
            raise
        exit_interrupted()


@contextmanager
def importing():
    """Ctrl-C while the block imports ends the command, even where a library swallows it:
    a C extension interrupted while it initializes raises ImportError, which an optional
    import's ``except ImportError`` takes for a missing package, and the command would go on.
    So the interrupt is also recorded, and acted on after the block."""
    seen = []

    def record(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    # Only where Ctrl-C raises KeyboardInterrupt now (not ignored, not someone's handler), and
    # from the main thread (the only one that may set handlers).
    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if ours:
        signal.signal(signal.SIGINT, record)
    try:
        with interrupts_exit():
            yield
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if seen:
        exit_interrupted()


def shell(code: str, module_name: str = ""):
    """``(main, __getattr__)`` for a command module whose code is the module ``code``: ``main``
    handles Ctrl-C from its first line, then imports ``code`` and runs its ``main``. A module
    run as a script (``module_name``, its ``__name__``, is ``__main__``) runs ``main`` at once."""

    def main(argv=None):
        with importing():
            command = importlib.import_module(code)
        with interrupts_exit():
            command.main(argv)

    def __getattr__(name):  # PEP 562: the command's other names, from its code
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(code), name)

    if module_name == "__main__":
        main()
    return main, __getattr__
