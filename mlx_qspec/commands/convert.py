"""``python -m mlx_qspec.convert --model X.gguf --mlx-path DIR``: GGUF → an mlx-community
style directory that stock mlx-lm loads. The tensors are saved as the loader reads them
(exact MLX forms for every type but Q6_K, which the loader reads as 8-bit), so stock mlx-lm
on DIR computes what we compute on X.gguf.
``--rotate`` writes the QuaRot-rotated model instead (loadable by mlx_qspec only).

A Hugging Face model (a directory or a hub id) converts as mlx-lm's convert does (``-q``,
``--q-bits``, ``--q-group-size``), except that its MTP layers are kept: quantized like the
model, they go to ``DIR/mtp`` (a head directory, which stock mlx-lm does not read), and so do a
GGUF's nextn layers.
"""

import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import quantize_model, save, save_config, save_model

from .. import gguf
from ..cli import ArgumentParser, progress, run_cli
from ..errors import ModelError
from ..heads import mtp, store
from ..heads.block import quantize as quantize_head
from ..loader import cast_floats, is_hub_id, load, load_gguf, resolve, rotated_model_type

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def _check_destination(mlx_path: str) -> Path:
    """The directory to write: named, and absent or empty (nothing is overwritten)."""
    if not mlx_path.strip():
        raise ModelError("--mlx-path is empty; name the directory to write")
    path = Path(mlx_path).expanduser()
    if path.exists() and not path.is_dir():
        raise ModelError(f"--mlx-path '{mlx_path}' is a file; name a directory to write "
                         "(absent or empty)")
    if path.is_dir() and any(path.iterdir()):
        raise ModelError(f"--mlx-path '{mlx_path}' exists and is not empty; refusing to overwrite")
    return path


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
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
) -> Path:
    """Convert a GGUF file or a Hugging Face model to an mlx directory; returns the
    directory. ``quantize``, ``q_bits``, ``q_group_size``: for a Hugging Face model, as
    mlx-lm's convert takes them (a GGUF keeps its own quantization)."""
    mlx_path = _check_destination(str(mlx_path))
    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    local = Path(model).expanduser()  # a GGUF file is local; a hub id resolves to a directory
    if rotate and not local.is_file() and (local.exists() or is_hub_id(model)):
        raise ModelError("--rotate converts a GGUF file; convert the model to GGUF first")
    if local.is_file() and quantize:
        raise ModelError(f"--model '{model}' is a GGUF file, quantized already: drop -q")
    src = resolve(model)  # (a hub id downloads: after every check that needs no model)
    created = _make_destination(mlx_path)
    try:
        if src.is_dir():
            _convert_hf(model, src, mlx_path, dtype, quantize and (q_bits, q_group_size))
        else:
            _convert(src, mlx_path, dtype, rotate, rotate_method)
    except BaseException:
        # The destination was absent or empty: clearing it loses nothing.
        shutil.rmtree(created, ignore_errors=True)
        raise
    print(f"wrote {mlx_path}", file=sys.stderr)
    return mlx_path


def _convert(src: Path, mlx_path: Path, dtype, rotate: bool, rotate_method: str) -> None:
    """:func:`convert` into an existing empty ``mlx_path``, its arguments checked."""
    model_obj, tokenizer, config, metadata = load_gguf(src)
    if rotate:
        from ..calibration_text import calibration_tokens
        from ..rotate import check_residual, check_rotatable, rotate_model, save_rotated

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
        write_mtp(model_obj, mlx_path, None, DTYPES.get(dtype))
    gguf.write_tokenizer(metadata, src, mlx_path)


def _convert_hf(name: str, src: Path, mlx_path: Path, dtype, quantization) -> None:
    """mlx-lm's convert of a Hugging Face model (its dtype rule, its quantization, its
    save), through our loader so that the MTP layers are kept."""
    model_obj, tokenizer, config = load(str(src), dtype=None, lazy=True, return_config=True)
    dtype = dtype or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    if dtype in DTYPES:
        keep = getattr(model_obj, "cast_predicate", lambda _: True)
        model_obj.update(tree_map_with_path(
            lambda k, v: v.astype(DTYPES[dtype]) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model_obj.parameters()))
    if quantization:
        model_obj, config = quantize_model(model_obj, config, quantization[1], quantization[0])
    write_mtp(model_obj, mlx_path, quantization, DTYPES.get(dtype))
    print("writing model.safetensors", file=sys.stderr)
    save(mlx_path, src, model_obj, tokenizer, config)


def write_mtp(model_obj, mlx_path: Path, quantization, dtype=None) -> None:
    """The model's MTP layers, if it has any, as the head directory ``mlx_path/mtp``:
    quantized like the model (``quantization``: (bits, group size) to quantize to; None: as
    loaded)."""
    kept = mtp.attached(model_obj)
    if isinstance(kept, str):
        print(f"note: the MTP layers are not kept: {kept}", file=sys.stderr)
    if not isinstance(kept, tuple):
        return
    head, cfg = kept
    cast_floats(head, dtype)
    if quantization:
        quantize_head(head, quantization[1], quantization[0])
        cfg = {**cfg, "quantization": {"group_size": quantization[1], "bits": quantization[0]}}
    store.save(mlx_path / mtp.MTP_DIR, head, cfg)
    print(f"wrote the MTP layers to {mlx_path / mtp.MTP_DIR}", file=sys.stderr)


def main(argv=None):
    parser = ArgumentParser(
        prog="mlx_qspec.convert", description="Convert a GGUF or Hugging Face model to an mlx directory."
    )
    parser.add_argument("--model", "--hf-path", required=True,
                        help="The .gguf file, or the Hugging Face model (directory or hub id), to convert")
    parser.add_argument("--mlx-path", default="mlx_model", help="Directory to write (must not exist or be empty)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of the float parameters (norms, scales, biases); default: as stored")
    parser.add_argument("--rotate", action="store_true",
                        help="QuaRot-style rotation for 4-bit activation drafts (loadable by mlx_qspec only)")
    parser.add_argument("--rotate-method", choices=["gptq", "rtn"], default="gptq",
                        help="How the rotated weights are re-quantized to 4 bits: mlx-lm's GPTQ "
                        "(calibrated on Python stdlib text) or round-to-nearest")
    parser.add_argument("-q", "--quantize", action="store_true",
                        help="Quantize a Hugging Face model (as mlx_lm.convert -q; its MTP layers too)")
    parser.add_argument("--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8], default=4,
                        help="Bits per weight with -q (default: %(default)s)")
    parser.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64,
                        help="Group size with -q (default: %(default)s)")
    run_cli(parser, argv, lambda args, _: convert(args.model, args.mlx_path, args.dtype,
                                                  args.rotate, args.rotate_method, args.quantize,
                                                  args.q_bits, args.q_group_size))

