"""``python -m mlx_qspec.bench``: ``--quick`` on a tiny GGUF writes the report the module
documents and stores costs where ``auto`` reads them; the device's kernel checks (the path a
Mac runs) work through the MSL emulator and catch a kernel whose rows depend on M."""

import json
import sys

import mlx.core as mx
import pytest

from mlx_qspec import bench, controller, kernels
from helpers.gguf_reference import Config, write_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny llama GGUF (4- and 8-bit linears, an 8-bit tied head) whose head dim (32)
    the nested KV cache takes, so every part of the bench runs on it."""
    path = tmp_path_factory.mktemp("bench_tiny") / "tiny.gguf"
    write_gguf(path, Config(hidden=128, ffn=256, heads=4, kv_heads=4), seed=1, embed_std=0.2)
    return str(path)


def test_quick_writes_the_documented_report(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "report"
    bench.main(["--model", tiny_gguf, "--quick", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == 1 and report["quick"] is True and report["seconds"] > 0
    assert report["machine"]["backend"] == "mlx-reference" and len(report["machine"]["load"]) == 2
    s = report["sections"]
    # --quick on the CPU backend: the long contexts are skipped, and the report says so
    assert list(s) == ["kernels", "exactness", "decode", "verify_rows", "draft_steps", "ngram_edit"]
    assert any(line.startswith("kv_upper: 4k and 16k context skipped") for line in report["skipped"])

    assert s["kernels"]["status"] == "skipped" and "no Metal" in s["kernels"]["why"]
    assert s["exactness"]["status"] == "ok"
    ran = {d["draft"]: d for d in s["exactness"]["drafts"] if d["equal"] is not None}
    assert set(ran) == {"ngram", "a8-g32", "kv-upper"} and all(d["equal"] for d in ran.values())
    assert s["decode"]["status"] == "ok" and s["decode"]["tokens_equal"] is True
    assert len(s["decode"]["ours_tps"]) == len(s["decode"]["mlx_lm_tps"]) == 2
    v = s["verify_rows"]
    assert v["rows"] == list(bench.KERNEL_ROWS) and len(v["forward_s"]) == len(v["mlx_s"]) == 5
    assert v["ours_s"] is None and "needs Metal" in v["ours_why"]
    steps = s["draft_steps"]["drafts"]
    assert {"a8", "w-upper", "kv-upper"} <= set(steps)
    assert all(d["seconds"] > 0 and d["ratio"] > 0 for d in steps.values())
    assert s["ngram_edit"]["equal"] is True and s["ngram_edit"]["tokens_per_verify"] >= 1

    # what auto will read: the store, keyed by model, device, MLX version, KV mode, context
    assert report["stored"]["written"] and len(report["stored"]["keys"]) == 2
    for key in report["stored"]["keys"]:
        base, bucket = key.rsplit("|ctx=", 1)
        costs = controller.Store(report["stored"]["path"]).load(base, int(bucket))
        assert costs.source == "measured" and costs.step > 0 and costs.block > 0
        assert "a8" in costs.draft and ("kv-upper" in costs.draft) == base.endswith("kv=nested")

    text = (out / "report.md").read_text()
    assert "| part | status | result |" in text and "Measured on this machine" in text
    assert text in capsys.readouterr().out
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")


def test_report_md_says_why_there_is_no_png(tmp_path, monkeypatch, capsys):
    """Without matplotlib the report has no PNG, and report.md (not only report.json) says so."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    skipped = dict(status="skipped", why="not run here")
    report = dict(machine=dict(device="cpu", backend="mlx-reference", system="Linux", mlx="0",
                               mlx_lm="0", cpus=2, load=[0.0, 0.0]),
                  model=dict(path="m.gguf"), quick=True, seconds=1.0, skipped=[],
                  sections={name: skipped for name in ("kernels", "verify_rows", "draft_steps")})
    bench.write(report, tmp_path)
    assert not (tmp_path / "report.png").exists()
    assert "- plot: matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert "plot: matplotlib is not installed" in json.loads(
        (tmp_path / "report.json").read_text())["skipped"][0]


def test_a_missing_model_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", str(tmp_path / "none.gguf"), "--quick", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.gguf" in err[0], err


def test_the_kernel_checks_cover_every_kernel():
    cases = bench.matmul_cases(mx.float32, K=128, N=16, group=32)
    names = {n.split(" ")[0] for n in cases} | {"nested_attention", "nested_attention_combine"}
    nested_planes = {"nested_matmul_draft": "nested_matmul", "nested_matmul_verify": "nested_matmul"}
    assert names == {nested_planes.get(n, n) for n in kernels._SIGNATURES}
    assert bench.check_kernels()["status"] == "skipped"  # here: no Metal


def test_a_kernel_check_on_a_mac_catches_rows_that_depend_on_m(mac):
    """The verify kernel through the MSL emulator (the path a Mac runs): within tolerance of
    MLX, rows bit for bit; and a kernel whose rounding changes with M is caught. (The other
    kernels' checks are the same function; the test suite checks each kernel already.)"""
    kernel, reference = bench.matmul_cases(mx.float32, K=128, N=16, group=32)["w4a16_verify"]
    x = bench._distinct_rows(128, mx.float32)
    good = bench._check("w4a16_verify", kernel, reference, x, 1e-5)
    assert good["ok"] and good["rows_bitwise"] and good["max_error"] < 1e-5

    def m_dependent(rows):  # rounding that changes with the row count
        y = kernel(rows)
        return y + y * (rows.shape[0] > 1) * 2.0**-20

    bad = bench._check("w4a16_verify", m_dependent, reference, x, 1e-5)
    assert not bad["ok"] and not bad["rows_bitwise"] and bad["max_error"] < 1e-5


def test_the_attention_check_on_a_mac(mac):
    """The attention kernels' check through the MSL emulator: both views within tolerance of
    the reference, and the last row of an L-row call equals the one-row call."""
    checks = bench._attention_checks(mx.float32, 1e-5, quantized=64, buffered=8, per_kv=1)
    assert [c["kernel"] for c in checks] == ["nested_attention (draft)", "nested_attention (verify)"]
    assert all(c["ok"] and c["rows_bitwise"] for c in checks), checks


def test_auto_with_a_cache_dir_it_cannot_write_warns_once_and_decodes(tiny_gguf, tmp_path,
                                                                       monkeypatch, capsys):
    """A read-only home or a full disk must not stop decoding (issue 26): the measured costs
    stay in memory, with one line saying so."""
    from mlx_qspec.generate import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MLX_QSPEC_CACHE", str(blocker))  # the cache dir is a regular file
    main(["--model", tiny_gguf, "--prompt", "hello", "--max-tokens", "6", "--draft", "auto"])
    out, err = capsys.readouterr()
    assert out.strip() and err.count("cannot write to the cache folder") == 1
