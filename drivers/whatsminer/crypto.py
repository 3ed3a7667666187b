"""The cryptography of MicroBT's Whatsminer (btminer) write API, for the driver and simulator.

API v2 (port 4028) authenticates a write with a token derived from the admin password by
md5-crypt (the `$1$` scheme of glibc and `openssl passwd -1`) and carries the command
AES-256-ECB encrypted under a key that is itself derived from the password. API v3
(port 4433) sends the command in clear with a short SHA-256 token over the command,
password, the miner's salt and a timestamp.

md5-crypt is implemented here rather than imported: the venv has no library for it, the
maintained one (libpass) would be a dependency for forty lines, and Python's `crypt`
module is deprecated (gone in 3.13). It is pinned by known vectors from `openssl passwd -1`
in the tests. AES comes from `cryptography`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MD5_CRYPT_MAGIC: Final = "$1$"
_ITOA64: Final = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# md5-crypt's final digest is emitted as 22 characters, 3 bytes at a time in this order.
_FINAL_TRIPLES: Final = ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5))
AES_BLOCK: Final = 16
V3_TOKEN_LEN: Final = 8


def _b64_from_24bit(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_ITOA64[w & 0x3F])
        w >>= 6
    return "".join(out)


def md5_crypt(password: str | bytes, salt: str) -> str:
    """`$1$<salt>$<hash>` exactly as glibc `crypt()` and `openssl passwd -1` compute it.

    `salt` may carry the `$1$` prefix and a trailing `$...`; like glibc, only its first
    eight characters count.
    """
    pw = password.encode() if isinstance(password, str) else password
    if salt.startswith(MD5_CRYPT_MAGIC):
        salt = salt[len(MD5_CRYPT_MAGIC) :]
    salt = salt.split("$", 1)[0][:8]
    sb = salt.encode()
    magic = MD5_CRYPT_MAGIC.encode()

    alt = hashlib.md5(pw + sb + pw).digest()
    ctx = hashlib.md5(pw + magic + sb)
    n = len(pw)
    while n > 0:
        ctx.update(alt[: min(16, n)])
        n -= 16
    n = len(pw)
    while n:
        ctx.update(b"\x00" if n & 1 else pw[:1])
        n >>= 1
    final = ctx.digest()

    for i in range(1000):  # the scheme's fixed stretching loop
        c = hashlib.md5()
        c.update(pw if i & 1 else final)
        if i % 3:
            c.update(sb)
        if i % 7:
            c.update(pw)
        c.update(final if i & 1 else pw)
        final = c.digest()

    encoded = "".join(
        _b64_from_24bit(final[a], final[b], final[c], 4) for a, b, c in _FINAL_TRIPLES
    )
    encoded += _b64_from_24bit(0, 0, final[11], 2)
    return f"{MD5_CRYPT_MAGIC}{salt}${encoded}"


def md5_crypt_hash(password: str | bytes, salt: str) -> str:
    """Only the hash field of `md5_crypt` (what btminer calls the key and the sign)."""
    return md5_crypt(password, salt).rsplit("$", 1)[1]


@dataclass(frozen=True, slots=True)
class V2Token:
    """What a v2 write needs: the sign that goes in the command, and the AES key.

    `key` depends only on the password and the miner's fixed salt; `sign` also on the
    token's time and one-off `newsalt`, which is why a token has a lifetime and the key
    does not.
    """

    key: str  # md5_crypt_hash(password, salt)
    sign: str  # md5_crypt_hash(key + time, newsalt)
    aes_key: bytes  # SHA-256(key), 32 raw bytes

    @classmethod
    def derive(cls, password: str, salt: str, newsalt: str, time: str) -> V2Token:
        key = md5_crypt_hash(password, salt)
        return cls(key=key, sign=md5_crypt_hash(key + time, newsalt), aes_key=v2_aes_key(key))


def v2_aes_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _cipher(aes_key: bytes) -> Cipher[modes.ECB]:
    return Cipher(algorithms.AES(aes_key), modes.ECB())


def aes_ecb_encrypt_b64(aes_key: bytes, plaintext: bytes) -> str:
    """AES-256-ECB over the text zero-padded to a block multiple, as one base64 line."""
    padded = plaintext + b"\x00" * (-len(plaintext) % AES_BLOCK)
    enc = _cipher(aes_key).encryptor()
    return base64.b64encode(enc.update(padded) + enc.finalize()).decode("ascii")


def aes_ecb_decrypt_b64(aes_key: bytes, data: str) -> bytes:
    """Inverse of `aes_ecb_encrypt_b64`, trailing zero padding removed.

    Raises ValueError for text that is not base64 or not a whole number of blocks; a
    wrong key is not detectable here (it decrypts to noise).
    """
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=False)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"not base64: {exc}") from exc
    if not raw or len(raw) % AES_BLOCK:
        raise ValueError(f"ciphertext of {len(raw)} bytes is not a whole number of AES blocks")
    dec = _cipher(aes_key).decryptor()
    return (dec.update(raw) + dec.finalize()).rstrip(b"\x00")


def v3_token(cmd: str, password: str, salt: str, ts: int) -> str:
    """API v3 write token: the first 8 characters of base64(SHA-256(cmd+password+salt+ts))."""
    digest = hashlib.sha256(f"{cmd}{password}{salt}{ts}".encode()).digest()
    return base64.b64encode(digest).decode("ascii")[:V3_TOKEN_LEN]
