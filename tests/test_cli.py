"""`serve-app` against a running app, as a subprocess (the installed entry point)."""

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY, free_port

CLI = str(Path(sys.executable).with_name("serve-app"))


def cli(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, input=stdin, timeout=120, check=False)


def test_complete_streams_text(server):
    r = cli("--url", server, "complete", "Once upon a time", "--max-tokens", "8", "--model", TINY)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_chat_keeps_a_conversation(server):
    r = cli("--url", server, "chat", "--max-tokens", "4", stdin="hello\nand again\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 3 and TINY in r.stdout


def test_status_lists_replicas_and_devices(server):
    r = cli("--url", server, "status")
    assert r.returncode == 0, r.stderr
    assert "ready" in r.stdout and "replica" in r.stdout and "cpu" in r.stdout
    # The precision and why: the tiny float32 checkpoint stays float32, or becomes bfloat16 where the
    # CPU has bf16 instructions and the startup measurement finds them faster (precision.py).
    assert "prefix cache hits" in r.stdout and re.search(r"dtype (float32|bfloat16): auto: ", r.stdout), r.stdout


def test_errors_are_one_line_without_a_traceback(server):
    down = cli("--url", f"http://127.0.0.1:{free_port()}", "status")
    assert down.returncode == 1 and "cannot reach" in down.stderr
    assert "Traceback" not in down.stderr and len(down.stderr.strip().splitlines()) == 1
    bad = cli("--url", server, "complete", "x", "--model", "no-such-model")
    assert bad.returncode == 1 and "HTTP 404" in bad.stderr and "Traceback" not in bad.stderr
