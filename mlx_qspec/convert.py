"""``python -m mlx_qspec.convert --model X.gguf --mlx-path DIR``: GGUF → an mlx-community
style directory that stock mlx-lm loads. The tensors are saved as the loader reads them
(exact MLX forms for every type but Q6_K, which the loader reads as 8-bit), so stock mlx-lm
on DIR computes what we compute on X.gguf.
``--rotate`` writes the QuaRot-rotated model instead (loadable by mlx_qspec only).
"""

import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import save_config, save_model

from . import gguf
from .cli import ArgumentParser, progress, run_cli
from .errors import ModelError
from .loader import cast_floats, load_gguf, resolve, rotated_model_type

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def _check_destination(mlx_path: Path) -> None:
    if mlx_path.exists() and (not mlx_path.is_dir() or any(mlx_path.iterdir())):
        raise ModelError(f"--mlx-path '{mlx_path}' exists and is not empty; refusing to overwrite")


def _make_destination(mlx_path: Path) -> Path:
    """Create ``mlx_path`` before the model loads, so an unwritable or impossible place
    fails in a second; returns the outermost directory created (what a failure removes)."""
    top = mlx_path
    while not top.parent.exists():
        top = top.parent
    try:
        mlx_path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"--mlx-path '{mlx_path}': cannot create it ({e.strerror})") from None
    return top


def convert(
    model: str,
    mlx_path: str,
    dtype: str | None = None,
    rotate: bool = False,
    rotate_method: str = "gptq",
) -> Path:
    """Convert a GGUF file to an mlx directory; returns the directory."""
    mlx_path = Path(mlx_path)
    _check_destination(mlx_path)
    src = resolve(model)
    if not src.is_file():
        raise ModelError(f"--model '{model}' is not a GGUF file")
    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    created = _make_destination(mlx_path)
    try:
        return _convert(src, mlx_path, dtype, rotate, rotate_method)
    except BaseException:
        # The destination was absent or empty: clearing it loses nothing.
        shutil.rmtree(created, ignore_errors=True)
        raise


def _convert(src: Path, mlx_path: Path, dtype, rotate: bool, rotate_method: str) -> Path:
    """:func:`convert` into an existing empty ``mlx_path``, its arguments checked."""
    model_obj, tokenizer, config, metadata = load_gguf(src)
    if rotate:
        from .calibration_text import calibration_tokens
        from .rotate import check_residual, check_rotatable, rotate_model, save_rotated

        try:
            check_rotatable(config)
            check_residual(config, "hadamard")
        except ValueError as e:
            raise ModelError(f"{src}: {e}") from None
    # Rotation and GPTQ compute in float32 (MLX-CPU float16 is ~35x slower); the
    # written scales keep the source's dtype unless --dtype says otherwise.
    stored = [v.dtype for _, v in tree_flatten(model_obj.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    out_dtype = DTYPES.get(dtype) or min(stored, key=lambda d: d.size)
    cast_floats(model_obj, mx.float32 if rotate else DTYPES.get(dtype))

    layers = model_obj.layers
    for i, layer in enumerate(layers):
        mx.eval(layer.parameters())
        progress("loading", i + 1, len(layers))
    mx.eval(model_obj.parameters())

    if rotate:
        try:
            calibration = calibration_tokens(tokenizer) if rotate_method == "gptq" else None
        except ValueError as e:
            raise ModelError(f"--rotate-method gptq: {e}; use --rotate-method rtn") from None
        weights, config = rotate_model(
            model_obj, config, method=rotate_method, calibration=calibration
        )
        weights = {
            k: v.astype(out_dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
        print("writing model.safetensors", file=sys.stderr)
        save_rotated(mlx_path, weights, config)
        # stock mlx-lm would load it without its online rotations: mark it as ours
        save_config({**config, "model_type": rotated_model_type(config["model_type"])},
                    mlx_path / "config.json")
    else:
        print("writing model.safetensors", file=sys.stderr)
        save_model(mlx_path, model_obj, donate_model=True)
        save_config(config, mlx_path / "config.json")
    gguf.write_tokenizer(metadata, src, mlx_path)
    print(f"wrote {mlx_path}", file=sys.stderr)
    return mlx_path


def main(argv=None):
    parser = ArgumentParser(
        prog="mlx_qspec.convert", description="Convert a GGUF model to an mlx directory."
    )
    parser.add_argument("--model", "--hf-path", required=True, help="The .gguf file to convert")
    parser.add_argument("--mlx-path", default="mlx_model", help="Directory to write (must not exist or be empty)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of the float parameters (norms, scales, biases); default: as stored")
    parser.add_argument("--rotate", action="store_true",
                        help="QuaRot-style rotation for 4-bit activation drafts (loadable by mlx_qspec only)")
    parser.add_argument("--rotate-method", choices=["gptq", "rtn"], default="gptq",
                        help="How the rotated weights are re-quantized to 4 bits: mlx-lm's GPTQ "
                        "(calibrated on Python stdlib text) or round-to-nearest")
    run_cli(parser, argv, lambda args, _: convert(args.model, args.mlx_path, args.dtype,
                                                  args.rotate, args.rotate_method))


if __name__ == "__main__":
    main()
