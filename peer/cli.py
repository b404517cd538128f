"""``python -m peer``: the contributor's command line.

    python -m peer init --broker URL --email you@example.org     # account + key pair
    python -m peer serve --jobs 2 --port 7000                     # lend 2 slots
    python -m peer status                                         # account, slots, sessions

Every failure the user can fix (broker unreachable, wrong password, port in use, no
account yet) ends in one line on stderr and exit status 1, not a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from peer.api import BrokerClient, BrokerError
from peer.config import Account, ServeSettings, default_broker, default_home, positive_mib
from peer.confine import LAYERS
from peer.daemon import PeerDaemon
from peer.errors import PeerError
from peer.identity import Identity
from peer.runtime import local_runtime
from peer.sandbox import Limits


def _password(args: argparse.Namespace) -> str:
    if args.password:
        return args.password
    env = os.environ.get("COMPUTE_BROKER_PASSWORD")
    if env:
        return env
    if not sys.stdin.isatty():
        raise PeerError("no password: pass --password or set COMPUTE_BROKER_PASSWORD")
    return getpass.getpass(f"password for {args.email}: ")


def cmd_init(args: argparse.Namespace) -> int:
    """Create (or log in to) the account and register this machine's key.

    Logs in by key first (never a password failure, so a new account is not counted
    against the throttle); only a new account, or a new key for an existing account,
    needs the password. The password is never written to disk.
    """
    home = Path(args.home)
    identity = Identity.load_or_create(home)
    client = BrokerClient(args.broker, identity=identity)
    address = args.address or "127.0.0.1:7000"
    created = False
    fields = {"pubKey": identity.public_key}
    if args.address:
        fields["address"] = args.address
    try:
        client.login(args.email)  # this key is already the account's
    except BrokerError as exc:
        if exc.status != 401:
            raise
        password = _password(args)
        try:
            client.signup(args.email, password, identity.public_key, address)
            created = True
        except BrokerError as exc2:
            if exc2.status != 409:
                raise
            # The account exists with another key (a new machine): the password proves
            # it is ours, the new key signs for itself.
            try:
                client.login(args.email, password)
            except BrokerError as exc3:
                if exc3.status == 401:
                    raise PeerError(f"wrong password for {args.email}") from None
                raise
            fields["currentPassword"] = password
    me = client.update_me(**fields)
    client.set_jobs(0, local_runtime())
    Account(args.broker, args.email, client.token or "", me["id"]).save(home)
    verb = "created" if created else "logged in to"
    print(f"{verb} account {args.email} ({me['id']}) at {args.broker}; key pair in {home}")
    return 0


def _logged_in(home: Path, broker: str | None) -> tuple[Account, BrokerClient]:
    account = Account.load(home)
    if broker:
        account.broker = broker
    client = BrokerClient(account.broker, account.token, identity=Identity.load(home))
    try:
        client.me()
    except BrokerError as exc:
        if exc.status != 401:
            raise
        client.login(account.email)  # by key: no password needed, none stored
        account.token = client.token or ""
        account.save(home)
    return account, client


def cmd_serve(args: argparse.Namespace) -> int:
    """Lend slots until SIGTERM or Ctrl-C, then drain and withdraw."""
    budgets = ServeSettings.from_env(session_mib=args.session_mib, held_mib=args.held_mib)
    home = Path(args.home)
    identity = Identity.load(home)
    account, client = _logged_in(home, args.broker)

    def relogin() -> None:
        client.login(account.email)
        account.token = client.token or ""
        account.save(home)

    limits = Limits(memory=args.memory * 1024 * 1024, cpu_seconds=args.cpu_seconds, timeout=args.task_timeout)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="compute-broker-"))
    daemon = PeerDaemon(
        identity,
        client,
        jobs=args.jobs,
        host=args.host,
        port=args.port,
        advertise=args.advertise,
        limits=limits,
        scratch=scratch,
        heartbeat=args.heartbeat,
        lease=args.lease,
        relogin=relogin,
        session_bytes=budgets.session_mib * 1024 * 1024,
        held_bytes=budgets.held_mib * 1024 * 1024,
    )
    stopping = []

    def on_signal(signum: int, frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            logging.getLogger("peer").info("%s: draining", signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.start()
    _write_sandbox_state(home, daemon.missing_layers)
    print(f"peer {account.email}: serving {args.jobs} slot(s) at {daemon.address}", flush=True)
    try:
        while not stopping:
            time.sleep(0.2)  # signal handlers run between sleeps
    finally:
        daemon.stop(drain=args.drain)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show the account, the slots offered and the sessions."""
    account, client = _logged_in(Path(args.home), args.broker)
    me = client.me()
    print(f"account   {me['email']} ({me['id']}) at {account.broker}")
    proof = me.get("addressProof") or {}
    detail = f": {proof['detail']}" if proof.get("detail") else ""
    print(f"address   {me['address']} ({proof.get('state', 'unknown')}{detail})")
    print(f"slots     {me['jobs']}  runtime {me.get('runtime') or '-'}")
    sessions = client.sessions()
    print(f"sessions  {len(sessions)}")
    for s in sessions:
        print(f"  {s['id']}  {s['role']:<6}  {s['status']:<8}  {s['slots']} slot(s)")
    print(f"sandbox   {_sandbox_summary(Path(args.home))}")
    return 0


SANDBOX_STATE = "sandbox.json"


def _write_sandbox_state(home: Path, missing: dict[str, str]) -> None:
    """Record which confinement layers held when `serve` last started, for `status`."""
    state = {"layers": list(LAYERS), "missing": missing, "since": time.time()}
    path = home / SANDBOX_STATE
    path.write_text(json.dumps(state))


def _sandbox_summary(home: Path) -> str:
    try:
        state = json.loads((home / SANDBOX_STATE).read_text())
        missing = {str(k): str(v) for k, v in state.get("missing", {}).items()}
    except (OSError, ValueError, AttributeError):
        return "unknown (serve has not run here)"
    if not missing:
        return f"every layer holds ({', '.join(LAYERS)})"
    return "missing layers: " + "; ".join(f"{name} ({why})" for name, why in missing.items())


def _mib_arg(flag: str) -> Callable[[str], int]:
    """An argparse type for a positive size in MiB whose error names ``flag``."""

    def parse(text: str) -> int:
        try:
            return positive_mib(text, flag)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m peer", description="Compute Broker peer: lend your idle cores."
    )
    parser.add_argument("--home", default=str(default_home()), help="config directory (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create or log in to an account and register this machine's key")
    p.add_argument("--broker", default=default_broker(), help="broker URL (default: %(default)s)")
    p.add_argument("--email", required=True)
    p.add_argument("--password", help="default: $COMPUTE_BROKER_PASSWORD, or a prompt")
    p.add_argument("--address", help="host:port requesters dial (serve --advertise overrides it)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="offer job slots until SIGTERM or Ctrl-C")
    p.add_argument("--jobs", type=int, default=1, help="slots to offer (default: %(default)s)")
    p.add_argument("--port", type=int, default=7000, help="TCP port to listen on (default: %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: %(default)s)")  # noqa: S104
    p.add_argument("--advertise", help="host:port requesters should dial (default: host:port)")
    p.add_argument("--broker", help="broker URL (default: the one given to init)")
    p.add_argument("--memory", type=int, default=2048, help="MiB of address space per slot")
    p.add_argument("--cpu-seconds", type=int, default=300, help="CPU seconds per sandbox process")
    p.add_argument("--task-timeout", type=float, default=300.0, help="wall-clock seconds per task")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    p.add_argument(
        "--lease",
        type=float,
        default=60.0,
        help="leave a session after this long with no requester connected",
    )
    p.add_argument("--drain", type=float, default=30.0, help="seconds to finish running tasks on exit")
    p.add_argument("--scratch", help="directory for the slots' scratch space (default: a temp dir)")
    p.add_argument(
        "--session-mib",
        type=_mib_arg("--session-mib"),
        help="MiB of a session's tasks, code and shared objects held at once, over all its "
        "connections (default: $COMPUTE_BROKER_SESSION_MIB or 1024)",
    )
    p.add_argument(
        "--held-mib",
        type=_mib_arg("--held-mib"),
        help="MiB held at once for all sessions together (default: $COMPUTE_BROKER_HELD_MIB or 2048)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="show the account, its slots and sessions")
    p.add_argument("--broker", help="broker URL (default: the one given to init)")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except PeerError as exc:
        print(f"peer: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"peer: error: {exc}", file=sys.stderr)
        return 2
