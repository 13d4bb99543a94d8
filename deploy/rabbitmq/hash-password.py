#!/usr/bin/env python3
"""hash-password.py -- print the RabbitMQ "password_hash" for a password, for
deploy/rabbitmq/definitions.json (hashing_algorithm
rabbit_password_hashing_sha256: base64 of a 4-byte salt followed by
sha256(salt + password)).

usage: hash-password.py PASSWORD [SALT_HEX]   (a random salt if none given)
"""
import base64
import hashlib
import os
import sys


def password_hash(password, salt=None):
    """The base64 hash RabbitMQ's rabbit_password_hashing_sha256 checks."""
    if salt is None:
        salt = os.urandom(4)
    if len(salt) != 4:
        raise ValueError("salt must be 4 bytes")
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def main(argv):
    if len(argv) not in (2, 3) or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    salt = bytes.fromhex(argv[2]) if len(argv) == 3 else None
    print(password_hash(argv[1], salt))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
