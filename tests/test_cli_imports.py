"""What the `mynah` process imports: httpx without its command-line client (scripts/cli.py skip_httpx_cli)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import json, sys, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from scripts.cli import skip_httpx_cli
skip_httpx_cli()
import telegram.ext  # PTB imports httpx
import httpx

class Ok(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"fine")
    def log_message(self, *args):
        pass

server = HTTPServer(("127.0.0.1", 0), Ok)
threading.Thread(target=server.serve_forever, daemon=True).start()
body = httpx.get(f"http://127.0.0.1:{server.server_port}/").text
cli = sorted(m for m in sys.modules if m.split(".")[0] in ("rich", "click", "pygments"))
print(json.dumps({"body": body, "cli": cli, "main_is_stub": httpx.main.__module__ == "httpx"}))
"""


def test_the_bot_process_uses_httpx_without_importing_its_command_line_client():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"body": "fine", "cli": [], "main_is_stub": True}
