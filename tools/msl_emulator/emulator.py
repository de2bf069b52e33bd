"""Run Metal kernels on Linux: the exact source MLX would compile, in C++ over fibers.

``metal_kernel`` has the signature of ``mx.fast.metal_kernel``; the callable it returns
has the call signature of the real one. On the first call for a given set of input
shapes, dtypes and template arguments it traces the *real* kernel with ``verbose=True``
under ``mx.export_function`` (which prints the generated Metal source without needing a
GPU), translates that text to C++ against ``msl.h``, compiles it with g++ (cached by
source hash) and runs it over the grid. Every device buffer is bounds-checked and the
bytes loaded from each input buffer are counted (``kernel.last_loads``, ``launches``).

Inside ``with counting_alu():`` kernels run a counting build instead: the kernel's
``float`` and ``uint`` become counted types (``msl.h``, "ALU counting") that compute the
same bits and count the operations a GPU lane issues for them, so ``kernel.last_alu`` is
the lane-operations of the launch, and ``kernel.last_unique`` the bytes of each input
buffer read at least once (what a cache-perfect GPU fetches from memory, beside
``last_loads``: every load request, re-reads included). A kernel whose ``?:`` mixes a
counted and a native type (``n ? x : 0``) does not compile in the counting build.

Not covered (a kernel using these fails to compile here, or runs with the caveat):
- ``simdgroup_matrix`` beyond 8x8 load/store/multiply(-accumulate) in MLX's lane layout,
  Metal 4 tensor ops, textures,
  samplers, imageblocks, function constants; length-4 and ``rgba`` multi-letter swizzles,
  and swizzles passed straight to template functions (convert to a vector first).
- Timing and the memory model: threadgroups run one at a time in grid order and threads
  run one after another between sync points, so races are deterministic (a read before a
  missing barrier sees the old value) and implicit SIMD lockstep is not assumed; kernels
  that wait on other threadgroups deadlock here. Threadgroup-memory size is not limited.
- Floating point: ``half`` is GCC's ``_Float16``, ``bfloat16_t`` rounds through float,
  ``metal::fast`` is precise, transcendentals are glibc's (ulp differences from Apple's).
- Byte counts are per-thread requests through const (input) buffers, with no cache or
  coalescing model; scalars bound by ``constant T&`` and reads of outputs are not counted.
- ALU counts are operations as the source writes them, one issue slot each: not what the
  Metal compiler emits (it may fuse, hoist or add), nor the rates of instruction classes,
  register pressure, occupancy, threadgroup-memory traffic or latency.
- Inputs reach the kernel as contiguous copies (strides describe that copy); the kernel
  cannot run inside ``mx.compile`` or another trace; ``stream`` is ignored.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
_REAL_METAL_KERNEL = mx.fast.metal_kernel
CACHE = Path(os.environ.get("MSL_EMULATOR_CACHE", Path.home() / ".cache" / "mlx_qspec_msl"))
CXXFLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-w", "-fno-strict-aliasing"]

# Every launch, in order: (kernel name, {buffer name: bytes loaded}).
launches: list[tuple[str, dict[str, int]]] = []
_COUNTING = False


@contextlib.contextmanager
def counting_alu():
    """Kernels called inside run their counting build (``last_alu``, ``last_unique``)."""
    global _COUNTING
    saved, _COUNTING = _COUNTING, True
    try:
        yield
    finally:
        _COUNTING = saved


class KernelError(RuntimeError):
    """A kernel failed in the emulator: bounds check, deadlock, or compile error."""


# ------------------------------------------------------------------ the header
def _swizzles(n: int) -> str:
    comps = "xyzw"[:n]
    out = []
    for k in (2, 3) if n > 2 else (2,):
        for idx in itertools.product(range(n), repeat=k):
            name = "".join(comps[i] for i in idx)
            out.append(f"swz<T, {n}, {', '.join(map(str, idx))}> {name};")
    return " ".join(out)


def _header_text() -> str:
    text = (HERE / "msl.h").read_text()
    for n in (2, 3, 4):
        text = text.replace(f"@SWIZZLES_{n}@", _swizzles(n))
    return text


# ------------------------------------------------------------------ getting MLX's source
def _capture_fd1(fn):
    """Run fn() and return what it wrote to file descriptor 1 (C++ prints there)."""
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        libc.fflush(None)
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            fn()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode()


_TRACE_LOCK = threading.Lock()


def generated_source(real_kernel, inputs, template, output_shapes, output_dtypes, grid, threadgroup) -> str:
    """The Metal source MLX generates for this call, from its own verbose print."""

    def f(*arrs):
        return real_kernel(inputs=list(arrs), template=template, grid=grid, threadgroup=threadgroup,
                           output_shapes=output_shapes, output_dtypes=output_dtypes, verbose=True)

    with _TRACE_LOCK, tempfile.TemporaryDirectory() as d:
        out = _capture_fd1(lambda: mx.export_function(os.path.join(d, "k.mlxfn"), f, *inputs))
    m = re.search(r"```\n(.*)\n```", out, re.S)
    if not m:
        raise KernelError(f"MLX printed no generated source; got: {out[:500]!r}")
    return m.group(1)


# ------------------------------------------------------------------ MSL → C++
_TYPE = r"[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?"
_DEV_PTR = re.compile(r"(\bconst\s+)?\b(device|constant)\s+(const\s+)?(" + _TYPE + r")\s*(const\b\s*)?([*&])")
_LOCAL_PTR = re.compile(r"(\bconst\s+)?\b(threadgroup|thread)\s+(const\s+)?(" + _TYPE + r")\s*([*&])")
_TG_DECL = re.compile(r"\bthreadgroup\s+((?:const\s+)?" + _TYPE + r")\s+(\w+)((?:\s*\[[^\]]*\])*)\s*;")
_HALF_LIT = re.compile(r"\b(\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)[hH]\b")
_FLOAT_LIT = re.compile(r"(?<![\w.])(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?[fF]\b")


def counted_types(src: str) -> str:
    """The counting build's source: the kernel computes in msl_float / msl_uint, its float
    literals included (so ``c ? x : 0.0f`` keeps one type)."""
    src = re.sub(r"\bfloat\b", "msl_float", src)
    src = re.sub(r"\buint\b", "msl_uint", src)
    return _FLOAT_LIT.sub(lambda m: f"msl_float({m.group(0)})", src)


def _dev_ptr(m: re.Match) -> str:
    const = bool(m.group(1) or m.group(3) or m.group(5)) or m.group(2) == "constant"
    t = m.group(4)
    if m.group(6) == "*":
        kind = "dptr" if m.group(2) == "device" else "cptr"
        return f"::msl::{kind}<{'const ' if const else ''}{t}>"
    return f"{'const ' if const else ''}{t}&"


def translate(text: str) -> str:
    """Rewrite MSL-only syntax into C++ that msl.h gives meaning to."""
    # comments first: a word such as "threadgroup" in one must not be rewritten as code
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)
    text = re.sub(r"^\s*#\s*include\s*<metal_\w+>.*$", "", text, flags=re.M)
    text = re.sub(r"^\s*#\s*pragma\s+(clang|METAL).*$", "", text, flags=re.M)
    text = text.replace("reinterpret_cast<", "::msl::ptr_cast<")
    text = _DEV_PTR.sub(_dev_ptr, text)
    text = _LOCAL_PTR.sub(lambda m: f"{m.group(1) or ''}{m.group(3) or ''}{m.group(4)}{m.group(5)}", text)
    # What is left of `threadgroup` declares threadgroup memory: shared by the group's
    # fibers, and groups run one after another, so a static is exactly that.
    text = _TG_DECL.sub(r"static \1 \2\3; ::msl::tg_poison(&\2, sizeof(\2));", text)
    text = re.sub(r"\bthreadgroup\s+(?=[A-Za-z_])", "static ", text)
    text = re.sub(r"\bconst\s+constant\b|\bconstant\s+const\b|\bconstant\b", "const", text)
    text = re.sub(r"\b(device|thread)\s+(?=[A-Za-z_])", "", text)
    text = _HALF_LIT.sub(r"((half)(\1))", text)
    return text


_ATTR3 = {"thread_position_in_grid": 0, "thread_position_in_threadgroup": 1,
          "threadgroup_position_in_grid": 2, "threadgroups_per_grid": 3, "threads_per_grid": 4,
          "grid_size": 4, "threads_per_threadgroup": 5, "dispatch_threads_per_threadgroup": 6,
          "grid_origin": 7}
_ATTR1 = {"thread_index_in_threadgroup": 0, "thread_index_in_simdgroup": 1,
          "simdgroup_index_in_threadgroup": 2, "simdgroups_per_threadgroup": 3,
          "threads_per_simdgroup": 4, "thread_execution_width": 4, "thread_index_in_quadgroup": 5,
          "quadgroup_index_in_threadgroup": 6, "quadgroups_per_threadgroup": 7,
          "dispatch_simdgroups_per_threadgroup": 8, "dispatch_quadgroups_per_threadgroup": 9}


def _split_params(s: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def build_cpp(src: str, count: bool = False):
    """Translate MLX's generated kernel text into a C++ unit with an ``msl_launch`` entry
    (``count``: the counting build).

    Returns (cpp_text, buffers) where buffers lists (param name, buffer index) in the
    order msl_launch expects them.
    """
    if count:
        src = counted_types(src)
    m = re.search(r"(template\s*<[^>]*>\s*)?\[\[kernel\]\]\s*void\s+(\w+)\s*\(", src)
    if not m:
        raise KernelError("no [[kernel]] function in the generated source")
    header, tmpl, fname = src[: m.start()], m.group(1) or "", m.group(2)
    depth, i = 1, m.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(src[i], 0)
        i += 1
    params_text = src[m.end(): i - 1]
    inst = re.search(r"\ntemplate\s*\[\[host_name\(\"\w+\"\)\]\]\s*\[\[kernel\]\]\s*decltype\((\w+)(<.*?>)?\)", src[i:])
    body_end = i + inst.start() if inst else len(src)
    body = src[src.index("{", i) + 1: src[:body_end].rindex("}")]
    targs = inst.group(2) if inst and inst.group(2) else ""

    sig, args, buffers = [], [], []
    for p in _split_params(params_text):
        pm = re.fullmatch(r"(.*?)\s*\b(\w+)\s*\[\[(\w+)(?:\((\d+)\))?\]\]", p, re.S)
        if not pm:
            raise KernelError(f"cannot parse kernel parameter {p!r}")
        ptype, pname, attr, idx = pm.groups()
        if attr == "buffer":
            b = len(buffers)
            buffers.append((pname, int(idx)))
            ctype = _DEV_PTR.sub(_dev_ptr, ptype + " ").strip() if "*" in ptype or "&" in ptype else ptype
            if ctype.startswith(("::msl::dptr<", "::msl::cptr<")):
                elem = ctype[len("::msl::dptr<"):-1]
                args.append(f"{ctype}(({elem}*)msl_bufs_[{b}].base, &msl_bufs_[{b}])")
            else:  # a scalar by reference
                elem = ctype.rstrip("&").strip()
                args.append(f"*({elem}*)msl_bufs_[{b}].base")
            sig.append(f"{ctype} {pname}")
        elif attr in _ATTR3 or attr in _ATTR1:
            sig.append(f"{ptype} {pname}")
            three = re.search(r"3$", ptype.strip()) is not None
            if attr in _ATTR3:
                v = f"::msl::attr3({_ATTR3[attr]})"
                args.append(f"({ptype})({v})" if three else f"({ptype})({v}.x)")
            else:
                v = f"::msl::attr1({_ATTR1[attr]})"
                args.append(f"{ptype}({v})" if three else f"({ptype})({v})")
        else:
            raise KernelError(f"attribute [[{attr}]] is not emulated")
    nb = len(buffers)
    cpp = f"""{"#define MSL_COUNT 1" if count else ""}
#include "msl.h"
{translate(header)}
{tmpl}void {fname}({", ".join(sig)}) {{
{translate(body)}
}}
static ::msl::BufInfo msl_bufs_[{max(nb, 1)}];
static void msl_entry() {{ {fname}{targs}({", ".join(args)}); }}
extern "C" int msl_launch(void** data, const size_t* bytes, const size_t* items, const char** names,
                          unsigned long long* loaded, unsigned long long* unique, unsigned long long* alu,
                          const unsigned* grid, const unsigned* tg, char* err, size_t errlen) {{
  std::vector<std::vector<uint8_t>> seen({nb});
  for (int i = 0; i < {nb}; i++) {{
    if ({int(count)}) seen[i].assign((bytes[i] + 7) / 8, 0);
    msl_bufs_[i] = ::msl::BufInfo{{names[i], (char*)data[i], bytes[i], items[i], 0, seen[i].data(), 0}};
  }}
  ::msl::g_bufs = msl_bufs_; ::msl::g_nbufs = {nb};
  ::msl::g_alu = 0;
  int rc = ::msl::launch_grid(grid, tg, msl_entry, err, errlen);
  for (int i = 0; i < {nb}; i++) {{ loaded[i] = msl_bufs_[i].loaded; unique[i] = msl_bufs_[i].unique; }}
  *alu = ::msl::g_alu;
  return rc;
}}
"""
    return cpp, buffers


_LIBS: dict[str, ctypes.CDLL] = {}


def compile_cpp(cpp: str) -> ctypes.CDLL:
    """Compile (or reuse) a shared library for this C++ text; cached by content hash."""
    header = _header_text()
    key = hashlib.sha256((header + "\0" + cpp + "\0" + " ".join(CXXFLAGS)).encode()).hexdigest()[:24]
    if key in _LIBS:
        return _LIBS[key]
    CACHE.mkdir(parents=True, exist_ok=True)
    so = CACHE / f"{key}.so"
    if not so.exists():
        d = Path(tempfile.mkdtemp(dir=CACHE))
        (d / "msl.h").write_text(header)
        (d / "k.cpp").write_text(cpp)
        r = subprocess.run(["g++", *CXXFLAGS, "-I", str(d), str(d / "k.cpp"), "-o", str(d / "k.so")],
                           capture_output=True, text=True)
        if r.returncode:
            lines = [ln for ln in r.stderr.splitlines() if "error" in ln][:8]
            raise KernelError("the kernel does not compile in the MSL emulator:\n" + "\n".join(lines)
                              + f"\n(full source: {d / 'k.cpp'})")
        os.replace(d / "k.so", so)
        shutil.rmtree(d)  # a failed compile keeps its directory, for reading the source
    lib = ctypes.CDLL(str(so))
    lib.msl_launch.restype = ctypes.c_int
    _LIBS[key] = lib
    return lib


# ------------------------------------------------------------------ arrays ↔ bytes
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_MX_UINT = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


def _to_bytes(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bool_:
        a = a.astype(mx.uint8)
    raw = np.array(mx.view(a, _MX_UINT[a.dtype.size]) if a.ndim else mx.view(a.reshape(1), _MX_UINT[a.dtype.size]))
    return np.ascontiguousarray(raw).reshape(-1).view(np.uint8)


def _from_bytes(buf: np.ndarray, shape, dtype) -> mx.array:
    if dtype == mx.bool_:
        return mx.array(buf.reshape(shape)).astype(mx.bool_)
    return mx.view(mx.array(buf.view(_UINT[dtype.size]).reshape(shape)), dtype)


def _filled(n: int, dtype, value) -> np.ndarray:
    """An output buffer: init_value, or a poison (NaN / all ones) where MLX leaves it uninitialised."""
    if value is None:
        return np.full(n * dtype.size, 0xFF, np.uint8)
    return _to_bytes(mx.full((max(n, 1),), value, dtype))[: n * dtype.size].copy()


# ------------------------------------------------------------------ the public kernel
class EmulatedKernel:
    """What ``metal_kernel`` returns: call it like the object ``mx.fast.metal_kernel`` returns."""

    def __init__(self, name, input_names, output_names, source, header="",
                 ensure_row_contiguous=True, atomic_outputs=False, compile_options=None):
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self._real = _REAL_METAL_KERNEL(name=name, input_names=input_names, output_names=output_names,
                                        source=source, header=header,
                                        ensure_row_contiguous=ensure_row_contiguous,
                                        atomic_outputs=atomic_outputs)
        self._built: dict = {}
        self.last_loads: dict[str, int] = {}
        self.last_unique: dict[str, int] | None = None  # counting build only
        self.last_alu: int | None = None  # counting build only
        self.last_source: str | None = None

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] expected {len(self.input_names)} inputs, got {len(inputs)}")
        grid, threadgroup = tuple(int(g) for g in grid), tuple(int(t) for t in threadgroup)
        if np.prod(threadgroup) > 1024 or min(threadgroup) < 1:
            raise ValueError(f"[metal_kernel] threadgroup {threadgroup} is not 1..1024 threads")
        output_shapes = [tuple(int(d) for d in s) for s in output_shapes]
        template = list(template or [])
        count = _COUNTING
        key = (tuple((x.shape, x.dtype) for x in inputs), tuple((k, str(v)) for k, v in template),
               tuple(output_shapes), tuple(output_dtypes), count)
        if key not in self._built:
            src = generated_source(self._real, inputs, template, output_shapes, list(output_dtypes),
                                   grid, threadgroup)
            cpp, buffers = build_cpp(src, count)
            self._built[key] = (src, compile_cpp(cpp), buffers)
        src, lib, buffers = self._built[key]
        self.last_source = src
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{src}\n```")

        by_name = dict(zip(self.input_names, inputs))
        datas, items, outs = [], [], {}
        for pname, _ in buffers:
            if pname in by_name:
                a = by_name[pname]
                datas.append(_to_bytes(a))
                items.append(a.dtype.size)
            elif pname in self.output_names:
                j = self.output_names.index(pname)
                n = int(np.prod(output_shapes[j]))
                outs[pname] = _filled(n, output_dtypes[j], init_value)
                datas.append(outs[pname])
                items.append(output_dtypes[j].size)
            else:
                base, _, kind = pname.rpartition("_")
                a = by_name.get(base)
                if a is None or kind not in ("shape", "strides", "ndim"):
                    raise KernelError(f"kernel parameter {pname!r} names no input or output")
                if kind == "shape":
                    meta = np.array(a.shape or (0,), np.int32)
                elif kind == "strides":
                    st = [int(np.prod(a.shape[i + 1:])) for i in range(a.ndim)]
                    meta = np.array(st or [0], np.int64)
                else:
                    meta = np.array([a.ndim], np.int32)
                datas.append(meta.view(np.uint8))
                items.append(meta.itemsize)
        keep = [np.ascontiguousarray(d) for d in datas]

        def per_buffer(ctype, values=()):  # a C array, one element per buffer (at least one)
            return (ctype * max(len(buffers), 1))(*values)

        loaded, unique = per_buffer(ctypes.c_ulonglong), per_buffer(ctypes.c_ulonglong)
        alu, err = ctypes.c_ulonglong(), ctypes.create_string_buffer(1024)
        rc = lib.msl_launch(per_buffer(ctypes.c_void_p, [d.ctypes.data for d in keep]),
                            per_buffer(ctypes.c_size_t, [d.nbytes for d in keep]),
                            per_buffer(ctypes.c_size_t, items),
                            per_buffer(ctypes.c_char_p, [p.encode() for p, _ in buffers]),
                            loaded, unique, ctypes.byref(alu), (ctypes.c_uint * 3)(*grid),
                            (ctypes.c_uint * 3)(*threadgroup), err, ctypes.c_size_t(1024))
        if rc:
            raise KernelError(f"kernel `{self.name}`: {err.value.decode()}")
        self.last_loads = {p: int(loaded[i]) for i, (p, _) in enumerate(buffers)}
        self.last_unique = ({p: int(unique[i]) for i, (p, _) in enumerate(buffers) if p in by_name}
                            if count else None)
        self.last_alu = int(alu.value) if count else None
        launches.append((self.name, dict(self.last_loads)))
        return [_from_bytes(outs[n], output_shapes[j], output_dtypes[j])
                for j, n in enumerate(self.output_names)]


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None):
    """Stand-in for ``mx.fast.metal_kernel`` that runs the kernel in the MSL emulator."""
    return EmulatedKernel(name, input_names, output_names, source, header, ensure_row_contiguous,
                          atomic_outputs, compile_options)


@contextlib.contextmanager
def recording():
    """Collect the (kernel name, bytes loaded per buffer) of every launch inside the block."""
    start = len(launches)
    got: list = []
    yield got
    got.extend(launches[start:])
