"""matplotlib for the benchmark scripts' PNGs, or None with a one-line hint (it is optional)."""

import sys


def pyplot(path):
    """``matplotlib.pyplot`` on the Agg backend, or None (and a message) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[bench]'): no plot written to {path}",
              file=sys.stderr)
        return None
    return plt
