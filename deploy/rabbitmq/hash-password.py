#!/usr/bin/env python3
"""hash-password.py -- RabbitMQ "password_hash" values for definitions.json
(hashing_algorithm rabbit_password_hashing_sha256: base64 of a 4-byte salt
followed by sha256(salt + password)).

usage: hash-password.py --definitions IN OUT [USER...]
           copy the definitions IN to OUT (mode 0640) with a new random
           password for each USER (every user of IN when none is named:
           32 letters and digits, safe to paste into a command line or a
           URL), and print "USER PASSWORD" once per user on standard output
       hash-password.py -            read a password from standard input,
                                     print its hash
       hash-password.py PASSWORD [SALT_HEX]   print its hash (a random salt
                                     if none given; the password is then
                                     visible in the process list)
"""
import base64
import hashlib
import json
import os
import secrets
import string
import sys

ALPHABET = string.ascii_letters + string.digits


def password_hash(password, salt=None):
    """The base64 hash RabbitMQ's rabbit_password_hashing_sha256 checks."""
    if salt is None:
        salt = os.urandom(4)
    if len(salt) != 4:
        raise ValueError("salt must be 4 bytes")
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def write_definitions(src, dst, names):
    """New random passwords for NAMES (all users when empty) of the
    definitions SRC, written to DST; returns [(user, password)]."""
    with open(src) as f:
        defs = json.load(f)
    users = defs.get("users", [])
    known = {u["name"] for u in users}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError("no user %s in %s" % (", ".join(repr(n) for n in unknown), src))
    out = []
    for u in users:
        if names and u["name"] not in names:
            continue
        # Letters and digits only: a password starting with "-" is taken
        # for an option by rabbitmqctl and other tools it is pasted into.
        password = "".join(secrets.choice(ALPHABET) for _ in range(32))
        u["password_hash"] = password_hash(password)
        u["hashing_algorithm"] = "rabbit_password_hashing_sha256"
        out.append((u["name"], password))
    tmp = dst + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as f:
        json.dump(defs, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o640)
    os.replace(tmp, dst)
    return out


def main(argv):
    if len(argv) >= 2 and argv[1] == "--definitions":
        if len(argv) < 4:
            print(__doc__.strip(), file=sys.stderr)
            return 2
        try:
            pairs = write_definitions(argv[2], argv[3], argv[4:])
        except (OSError, ValueError, KeyError) as e:
            print("hash-password.py: %s" % e, file=sys.stderr)
            return 1
        for name, password in pairs:
            print(name, password)
        return 0
    if len(argv) not in (2, 3) or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    password = sys.stdin.readline().rstrip("\n") if argv[1] == "-" else argv[1]
    salt = bytes.fromhex(argv[2]) if len(argv) == 3 else None
    print(password_hash(password, salt))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
