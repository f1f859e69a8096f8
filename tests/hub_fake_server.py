"""A stand-in single-user server for hub tests: records the token the hub gave it, answers 200.

Started by JupyterHub's SimpleLocalProcessSpawner (see tests/hubfixture.py); it never leaves
loopback. The token it writes is exactly the JUPYTERHUB_API_TOKEN a real sandbox would hold.
"""

import os
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlparse

url = urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])
token_dir = Path(os.environ["FAKE_TOKEN_DIR"])
name = f"{os.environ['JUPYTERHUB_USER']}-{os.environ.get('JUPYTERHUB_SERVER_NAME', '')}"
tmp = token_dir / f".{name}.tmp"
tmp.write_text(os.environ["JUPYTERHUB_API_TOKEN"])
tmp.replace(token_dir / f"{name}.token")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"fake single-user server\n")

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


HTTPServer((url.hostname or "127.0.0.1", url.port or 8888), Handler).serve_forever()
