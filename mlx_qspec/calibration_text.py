"""Real text for calibrations, present wherever Python is installed (Mac or Linux): the start
of Python stdlib files. GPTQ's re-quantization of a rotated model (``rotate.py``) and the
layer-skip calibration (``drafts/layer_skip.py``) read it."""

import sysconfig
from pathlib import Path

import mlx.core as mx

CALIBRATION_FILES = ("textwrap.py", "functools.py", "contextlib.py", "dataclasses.py",
                     "pathlib.py", "typing.py", "collections/__init__.py", "logging/__init__.py")


def calibration_tokens(tokenizer, samples: int = 8, length: int = 256) -> mx.array:
    """Calibration ids (samples, length): the start of Python stdlib files, one each."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for name in CALIBRATION_FILES[:samples]:
        ids = tokenizer.encode((stdlib / name).read_text(errors="replace"))[:length]
        if len(ids) == length:
            rows.append(ids)
    if not rows:
        raise ValueError(f"no calibration text of {length} tokens found under {stdlib}")
    return mx.array(rows)
