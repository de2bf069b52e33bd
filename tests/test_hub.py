"""Hub ids resolve like mlx-lm's: cache first, else download mlx-lm's file patterns, else a
one-line error. The hub is a stand-in on a loopback port (``HF_ENDPOINT``) serving a tiny
model built here; the CLI runs in a subprocess because huggingface_hub reads its
environment at import. Nothing here reaches the internet."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlx_lm.utils import save_model

from helpers import TINY, assert_one_line, build_tiny_model, write_byte_tokenizer

REPO = "test-org/tiny-4bit"
SHA = "a" * 40
# Served but outside mlx-lm's patterns: a download must leave them on the server.
NOT_FETCHED = ("README.md", ".gitattributes", "tiny.gguf")
JSON = [("Content-Type", "application/json")]


def tiny_repo(root: Path) -> dict[str, bytes]:
    """name → bytes of an mlx-community style repo: 4-bit weights, config, byte-level BPE."""
    save_model(root, build_tiny_model(), donate_model=True)
    config = {**TINY, "quantization": {"group_size": 32, "bits": 4}}
    (root / "config.json").write_text(json.dumps(config))
    write_byte_tokenizer(root)
    for name in NOT_FETCHED:
        (root / name).write_bytes(b"not for mlx")
    return {p.name: p.read_bytes() for p in root.iterdir()}


def handler(files: dict[str, bytes], log: list):
    """The three calls snapshot_download makes: revision info, tree listing, resolve."""

    class Hub(BaseHTTPRequestHandler):
        def reply(self, status, body=b"", headers=()):
            self.send_response(status)
            for key, value in (*headers, ("Content-Length", str(len(body)))):
                self.send_header(key, value)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def do_GET(self):
            path = self.path.split("?")[0]
            log.append(path)
            api = f"/api/models/{REPO}/"
            if path.startswith(api + "revision/"):
                info = {"id": REPO, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}
                return self.reply(200, json.dumps(info).encode(), JSON)
            if path == api + f"tree/{SHA}":
                tree = [{"type": "file", "path": f, "size": len(b),
                         "oid": hashlib.sha1(b).hexdigest()} for f, b in files.items()]
                return self.reply(200, json.dumps(tree).encode(), JSON)
            rev, _, name = path.removeprefix(f"/{REPO}/resolve/").partition("/")
            if rev in (SHA, "main") and name in files:
                body = files[name]
                return self.reply(200, body, [("X-Repo-Commit", SHA),
                                              ("ETag", f'"{hashlib.sha256(body).hexdigest()}"')])
            self.reply(404, b'{"error": "not found"}', [("X-Error-Code", "RepoNotFound")])

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    return Hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(endpoint URL, served files, request log) of a stand-in hub on 127.0.0.1."""
    files = tiny_repo(tmp_path_factory.mktemp("repo"))
    log = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(files, log))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", files, log
    server.shutdown()
    server.server_close()


def dead_endpoint() -> str:
    """A loopback URL where nothing listens: a hub that cannot be reached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def python(endpoint, hf_home, *args, offline=False):
    """``python *args`` with huggingface_hub pointed at ``endpoint`` and a cache in ``hf_home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=hf_home.parent)


def generate(endpoint, hf_home, *args, offline=False):
    return python(endpoint, hf_home, "-m", "mlx_qspec.generate", "--prompt", "hello",
                  "--max-tokens", "4", "--draft", "none", *args, offline=offline)


def test_download_fetches_mlx_lm_patterns_then_runs_from_cache(hub, tmp_path):
    """First run downloads (with progress bars) exactly the files mlx-lm would; the second
    finds them in the cache and never needs the hub."""
    endpoint, files, log = hub
    log.clear()
    first = generate(endpoint, tmp_path / "hf", "--model", REPO)
    assert first.returncode == 0, first.stderr
    assert "Fetching" in first.stderr and "100%" in first.stderr  # huggingface_hub's bars
    snapshot = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / SHA
    got = {p.name: p.read_bytes() for p in snapshot.iterdir()}
    assert got == {k: v for k, v in files.items() if k not in NOT_FETCHED}
    assert not [p for p in log if p.endswith(NOT_FETCHED)], log

    log.clear()
    again = generate(dead_endpoint(), tmp_path / "hf", "--model", REPO)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and first.stdout.strip()
    assert log == []


def test_a_partly_cached_repo_gets_the_rest(hub, tmp_path):
    """`hf download <id> config.json` (or a transformers AutoConfig) leaves a snapshot with
    no weights and no file listing: the cache alone cannot say it is incomplete."""
    endpoint, _, log = hub
    fetch = f"from huggingface_hub import hf_hub_download; hf_hub_download('{REPO}', 'config.json')"
    assert python(endpoint, tmp_path / "hf", "-c", fetch).returncode == 0
    log.clear()
    proc = generate(endpoint, tmp_path / "hf", "--model", REPO)
    assert proc.returncode == 0, proc.stderr
    assert any(p.endswith("/model.safetensors") for p in log)


def test_offline_names_the_id_and_hf_download(hub, tmp_path):
    endpoint, _, log = hub
    log.clear()
    proc = generate(endpoint, tmp_path / "hf", "--model", REPO, offline=True)
    assert_one_line(proc.returncode, proc.stderr, REPO, f"hf download {REPO}", "HF_HUB_OFFLINE")
    assert log == []


def test_unreachable_hub_names_the_id_and_hf_download(tmp_path):
    proc = generate(dead_endpoint(), tmp_path / "hf", "--model", REPO)
    assert_one_line(proc.returncode, proc.stderr, REPO, f"hf download {REPO}", "cannot be reached")


def test_unknown_repo_is_a_one_line_error(hub, tmp_path):
    proc = generate(hub[0], tmp_path / "hf", "--model", "test-org/no-such-model")
    assert_one_line(proc.returncode, proc.stderr, "test-org/no-such-model", "not a model on the Hugging Face hub")
