"""CURVE keys of a cluster: ZeroMQ's own certificate files, read and checked in one place.

A keypair is the pair of files ``zmq.auth.create_certificates`` writes: ``NAME.key``
(the public key, safe to copy anywhere) and ``NAME.key_secret`` (public and secret key,
mode 0600, never leaves its machine).  The head serves CURVE with its secret key and
admits the nodes whose public keys lie in ``[cluster] authorized_keys`` (a directory of
``*.key`` files); a node connects with its own secret key and pins the head's public key
(``[node] head_key``).  A key is named in logs by its fingerprint: the first 16 hex
digits of the SHA-256 of its 32 raw bytes (``llmctl keys fingerprint FILE``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85


class CurveKeyError(ValueError):
    """A key file is missing, unreadable or not a CURVE key of the kind needed."""


def fingerprint(public_z85: bytes) -> str:
    """The short name of a public key (z85 text) in logs and in `llmctl keys`."""
    try:
        raw = z85.decode(public_z85)
    except (ValueError, TypeError):
        raw = bytes(public_z85)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` (0644) and ``name.key_secret`` (0600) into ``directory``;
    refuse to overwrite an existing keypair (rotation writes a new name)."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise CurveKeyError(f"{p} exists: a keypair is never overwritten (pick a new name "
                            "to rotate, see docs/cluster.md)")
    old = os.umask(0o077)          # the secret file is never readable by others, even briefly
    try:
        pub, sec = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(sec, 0o600)
    os.chmod(pub, 0o644)
    return Path(pub), Path(sec)


def load_public(path: str | os.PathLike[str]) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"{path}: not a readable CURVE public key: {exc}") from None
    _check_z85(path, public)
    return public


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) of a ``.key_secret`` file; refused when others may read it."""
    p = Path(path)
    try:
        mode = p.stat().st_mode & 0o777
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"{p}: not a readable CURVE secret key: {exc}") from None
    if secret is None:
        raise CurveKeyError(f"{p}: holds no secret key (is it the .key_secret file?)")
    if mode & 0o037:       # others: nothing; the group may read (a Kubernetes fsGroup)
        raise CurveKeyError(f"{p}: a secret key must be private (mode 0600, or 0640 for a "
                            f"group such as a Kubernetes fsGroup), it is {mode:04o}")
    _check_z85(p, public)
    _check_z85(p, secret)
    return public, secret


def _check_z85(path: object, key: bytes) -> None:
    try:
        if len(z85.decode(key)) != 32:
            raise ValueError
    except (ValueError, TypeError):
        raise CurveKeyError(f"{path}: not a 40-character z85 CURVE key") from None


def authorized(directory: str | os.PathLike[str]) -> dict[bytes, str]:
    """Public key (z85) -> file name, for every ``*.key`` in ``directory`` (read anew on
    each call: adding or removing a file takes effect at the next handshake)."""
    out: dict[bytes, str] = {}
    for p in sorted(Path(directory).glob("*.key")):
        try:
            out[load_public(p)] = p.name
        except CurveKeyError:
            continue            # a broken file admits nobody; the head logged it at start
    return out


def server_options(sock: zmq.Socket, secret_file: str) -> str:
    """Make ``sock`` a CURVE server with the keypair of ``secret_file``; its fingerprint."""
    public, secret = load_secret(secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = b"llmctl"
    return fingerprint(public)


def client_options(sock: zmq.Socket, secret_file: str, server_public_file: str) -> str:
    """Make ``sock`` a CURVE client that only talks to the server key it pins."""
    public, secret = load_secret(secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = load_public(server_public_file)
    return fingerprint(public)
