"""The control log's signing keys, read from their files once at start-up."""

from __future__ import annotations

from pathlib import Path

from stream.config import ControlSettings
from stream.core.signing import Signer, TrustPolicy
from stream.errors import ConfigError


def load_trust(settings: ControlSettings) -> tuple[Signer | None, TrustPolicy]:
    """This process's signer (if `signing_key` is set) and the fold's trust policy.

    Raises `ConfigError` naming the key id when a key file cannot be read or is empty; the
    secret itself never reaches a message.
    """
    secrets = {key_id: _read_secret(key_id, path) for key_id, path in settings.key_files.items()}
    signer = None
    if settings.signing_key is not None:
        signer = Signer(settings.signing_key, secrets[settings.signing_key])
    policy = TrustPolicy(
        processor_keys={k: secrets[k] for k in settings.processor_keys},
        operator_keys={k: secrets[k] for k in settings.operator_keys},
        required=settings.require_signatures,
        from_offset=settings.signed_from_offset,
    )
    return signer, policy


def _read_secret(key_id: str, path: str) -> bytes:
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"[control] key {key_id!r}: cannot read {path}: {exc.strerror}") from exc
    if len(secret) < 16:
        raise ConfigError(f"[control] key {key_id!r}: {path} holds under 16 bytes of secret")
    return secret
