"""Fuzz the chat server with a larger budget than the test suite's: runs
``tests/test_server_fuzz.py`` with ``--examples`` generated requests (random, not the
suite's fixed sequence) and prints how many it sent and what they got.

    PYTHONPATH=. python scripts/fuzz_server.py --examples 5000 --json fuzz.json
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from plotting import arguments, write

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    parser = arguments(__doc__, model=None, plot=False)
    parser.add_argument("--examples", type=int, default=5000, help="Requests to generate")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = dict(os.environ, MLX_QSPEC_FUZZ_EXAMPLES=str(args.examples),
                   MLX_QSPEC_FUZZ_REPORT=str(report))
        test = "tests/test_server_fuzz.py::test_fuzzed_requests_get_a_2xx_or_an_openai_4xx_and_" \
               "the_server_survives"
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x", "-s", test],
                               cwd=ROOT, env=env)
        if not report.exists():
            sys.exit(f"the fuzz test failed before it finished (exit {code})")
        summary = {**json.loads(report.read_text()), "passed": code == 0}
    print(json.dumps(summary))
    write(args, summary)
    sys.exit(code)


if __name__ == "__main__":
    main()
