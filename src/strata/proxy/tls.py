"""The proxy's TLS: a self-signed certificate made at `strata init` (with the `openssl`
command), or the user's own pair (config [proxy] tls_cert/tls_key)."""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path

from strata.common.errors import UserError
from strata.common.proc import which_or_fail

CERT_FILE = "server.crt"
KEY_FILE = "server.key"
CERT_DAYS = 3650


def make_self_signed(directory: Path, domain: str) -> tuple[Path, Path]:
    """A key and a certificate for `*.<domain>` (and `<domain>`) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / CERT_FILE, directory / KEY_FILE
    openssl = which_or_fail("openssl")
    proc = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", str(CERT_DAYS),
         "-subj", f"/CN=*.{domain}", "-addext", f"subjectAltName=DNS:*.{domain},DNS:{domain}"],
        capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"openssl could not make the proxy's certificate: "
                        f"{proc.stderr.strip()}")
    os.chmod(key, 0o600)
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise UserError(f"the proxy cannot load its certificate {cert} and key {key}: {err}; "
                        "fix [proxy] tls_cert/tls_key in config.toml") from err
    return context
