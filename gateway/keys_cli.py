"""`mss keys`: make API keys and the hashed entries the gateway stores.

`mss keys create --id NAME [limits]` prints a new random key once, on the first
line of stdout, then its entry for `gateway.api_keys` or the keys file; the key
itself is kept nowhere. `mss keys hash --id NAME [limits]` reads an existing
key from stdin and prints its entry (to move plain-text keys to hashes).
"""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from gateway.api_keys import hash_key, new_key
from mss.config import ApiKey, format_validation_error

LIMIT_FLAGS = ("rps", "burst", "tokens_per_minute", "max_streams")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="make a new random key and print it with its entry")
    hash_ = sub.add_parser("hash", help="print the entry of an existing key read from stdin")
    for action in (create, hash_):
        action.add_argument("--id", required=True, help="the key's name in logs and metrics")
        action.add_argument("--rps", type=float, help="requests per second")
        action.add_argument("--burst", type=int, help="requests at once after a quiet spell")
        action.add_argument("--tokens-per-minute", type=int, help="output tokens per minute")
        action.add_argument("--max-streams", type=int, help="requests in progress at once")


def entry_line(key: ApiKey) -> str:
    """The key as one YAML list item (JSON values, so an id like `123` stays a string)."""
    fields = key.model_dump(exclude_none=True)
    return "- {" + ", ".join(f"{name}: {json.dumps(value)}" for name, value in fields.items()) + "}"


def run(args: argparse.Namespace) -> int:
    if args.action == "create":
        secret = new_key()
    else:
        secret = sys.stdin.readline().strip()
        if not secret:
            print("mss keys hash: no key on stdin", file=sys.stderr)
            return 2
    limits = {name: getattr(args, name) for name in LIMIT_FLAGS}
    try:
        key = ApiKey(id=args.id, sha256=hash_key(secret), **limits)
    except ValidationError as exc:
        print(f"mss keys: invalid:\n{format_validation_error(exc)}", file=sys.stderr)
        return 2
    if args.action == "create":
        print(secret)
        print("the key above is shown only now; only its hash is stored", file=sys.stderr)
    print("# under gateway.api_keys in the config, or api_keys in the keys file:")
    print(entry_line(key))
    return 0
