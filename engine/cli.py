"""The ``koppel`` command: run, check, send, bench (and store inspection)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_STORE = "sqlite:var/koppel.db"


def _parser() -> argparse.ArgumentParser:
    from engine.store import PROCESSING_OUTCOMES

    parser = argparse.ArgumentParser(prog="koppel", description="Koppel HL7 v2 interface engine")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p):
        p.add_argument("--channels", default="channels", help="channel YAML directory (default ./channels)")
        p.add_argument("--mappings", default="mappings", help="mappings directory (default ./mappings)")

    run = sub.add_parser("run", help="run the engine in the foreground")
    config_args(run)
    run.add_argument("--store", default=DEFAULT_STORE, help=f"store URL (default {DEFAULT_STORE})")
    run.add_argument("--metrics", default=None,
                     help="endpoint for /metrics, /healthz, /readyz (default tcp:9464:interface=127.0.0.1, "
                          "with --role deliver tcp:9465:...); 'off' disables")
    run.add_argument("--admin", default=None,
                     help="endpoint for the JSON admin API (default tcp:8465:interface=127.0.0.1, "
                          "with --role deliver tcp:8466:...); 'off' disables")
    run.add_argument("--admin-token-file", default=None, metavar="PATH",
                     help="file holding the admin API bearer token (or set KOPPEL_ADMIN_TOKEN)")
    run.add_argument("--role", choices=["all", "receive", "deliver"], default="all",
                     help="all (default); or split over two processes on one store: receive (listeners, "
                          "mapping, ACKs) and deliver (queues to destinations)")
    run.add_argument("--log-level", default=None, help="debug|info|warning|error (or KOPPEL_LOG_LEVEL)")
    run.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to finish in-flight ACKs on stop")
    run.add_argument("--retention", default="30d",
                     help="keep delivered entries and message bodies this long (default 30d; 'never' keeps all)")

    run.add_argument("--pid-file", default=None,
                     help="where to write the process id, for koppel reload (default var/koppel.pid, "
                          "with --role receive|deliver var/koppel-ROLE.pid; '' for none)")

    reload = sub.add_parser("reload", help="make the running engine re-read channels and mappings (SIGHUP)")
    reload.add_argument("--pid-file", default=None,
                        help="the engine's pid file (default: every one of var/koppel.pid, "
                             "var/koppel-receive.pid, var/koppel-deliver.pid that exists)")

    check = sub.add_parser("check", help="validate channels and mappings")
    config_args(check)

    send = sub.add_parser("send", help="send HL7 files over MLLP and print each ACK")
    send.add_argument("--to", required=True, help="HOST:PORT or a Twisted client endpoint string")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")
    send.add_argument("--raw", action="store_true", help="send each file's bytes untouched, as one message")
    send.add_argument("files", nargs="+")

    bench = sub.add_parser("bench", help="MLLP load generator")
    bench.add_argument("--to", required=True)
    bench.add_argument("--connections", type=int, default=8)
    bench.add_argument("--messages", type=int, default=10000)
    bench.add_argument("--rate", type=float, default=None, help="total msg/s (default: as fast as ACKs come)")
    bench.add_argument("--json", action="store_true", help="print one JSON line")
    bench.add_argument("file", nargs="?", default=None)

    preview = sub.add_parser("map", help="preview what a message becomes (entry, outbound), no side effects")
    config_args(preview)
    preview.add_argument("--channel", required=True, help="the channel the message arrives on")
    preview.add_argument("--store", default=None, help="decide against the entries in this store (read-only)")
    preview.add_argument("--raw", action="store_true", help="the file's bytes are one message, untouched")
    preview.add_argument("--data", action="store_true",
                         help="with --store: show the stored entry's patient fields too (kept in the audit trail)")
    preview.add_argument("file")
    preview.set_defaults(func=_map)

    messages = sub.add_parser("messages", help="list stored messages (headers only)")
    messages.add_argument("--store", default=DEFAULT_STORE)
    messages.add_argument("--channel")
    messages.add_argument("--control-id")
    messages.add_argument("--type", help="message type, e.g. ORU^R01")
    messages.add_argument("--from", dest="date_from", metavar="DATE",
                          help="received on or after this day (YYYY-MM-DD, Amsterdam time)")
    messages.add_argument("--to", dest="date_to", metavar="DATE", help="received on or before this day")
    messages.add_argument("--status", choices=["accepted", "rejected"])
    messages.add_argument("--processing", choices=PROCESSING_OUTCOMES,
                          help="what mapping did with it (error: to fix, then `koppel reprocess`)")
    from engine import operator

    messages.add_argument("--limit", type=operator.limit_arg, default=50, help="at most this many (default 50)")
    messages.add_argument("--json", action="store_true", help="print JSON")

    operator.register(sub)  # queue, dead-letters, audit, resend
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "run": _run,
        "check": _check,
        "send": _send,
        "bench": _bench,
        "messages": _messages,
        "reload": _reload,
    }.get(args.command) or args.func
    try:
        status = handler(args) or 0
        if sys.stdout is not None:  # (None: started with stdout closed; print() wrote nothing)
            sys.stdout.flush()  # a reader gone meanwhile shows here, not as an error at exit
        return status
    except BrokenPipeError:  # `koppel messages | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
        return 1
    except OSError as error:  # a file named on the command line: one line, not a traceback
        if error.filename is None:
            raise
        sys.stderr.write(f"error: {error.filename}: {error.strerror}\n")
        return 1


def _load_config(args):
    from engine.bundle import load_bundle
    from engine.config import ConfigError

    try:
        return load_bundle(Path(args.channels), Path(args.mappings)), None
    except ConfigError as error:
        return None, error


def _check(args) -> int:
    config, error = _load_config(args)
    if error is not None:
        sys.stderr.write(f"{error}\n")
        return 1
    from engine.config import unreachable_route_types, unrouted_types

    for channel in config.config.channels:  # (an on-map channel answers those AR itself)
        for accepted in unrouted_types(channel) if channel.ack.mode != "on-map" else ():
            sys.stderr.write(f"warning: {channel.file or channel.name}: channel {channel.name} accepts {accepted} but "
                             "no route takes it: answered AA and stored as filtered; route it, or leave it out of "
                             "accept.types to refuse it (AR)\n")
        for index, named in unreachable_route_types(channel):
            line, _ = channel.mark(f"routes[{index}].map") if channel.routes[index].map else (None, None)
            where = f"{channel.file}:{line}" if line and channel.file else (channel.file or channel.name)
            sys.stderr.write(f"warning: {where}: routes[{index}] of channel {channel.name} takes {named}, which "
                             "accept.types refuses (answered AR before any route): add it to accept.types, or "
                             "leave it out of the route\n")
    mappings = len(config.mappings.mappings) if config.mappings else 0
    agendas = len(config.book.agendas) if config.book else 0
    print(f"ok: {len(config.config.channels)} channel(s), {len(config.config.destinations)} destination(s), "
          f"{mappings} mapping(s), {agendas} agenda(s)")
    return 0


# A deliver-only process runs beside a receiving one on the same machine: its own ports and pid file.
_ROLE_DEFAULTS = {
    "all": ("tcp:9464:interface=127.0.0.1", "tcp:8465:interface=127.0.0.1", "var/koppel.pid"),
    "receive": ("tcp:9464:interface=127.0.0.1", "tcp:8465:interface=127.0.0.1", "var/koppel-receive.pid"),
    "deliver": ("tcp:9465:interface=127.0.0.1", "tcp:8466:interface=127.0.0.1", "var/koppel-deliver.pid"),
}


def _no_core_dumps() -> None:
    """A crash must not write the engine's memory (referrals, letters, the admin token) to a
    core file that the store's retention never prunes (systemd-coredump, apport, ./core)."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):  # not on this platform: nothing to switch off
        pass


def _run(args) -> int:
    from engine import log

    _no_core_dumps()
    metrics, admin, pid_file = _ROLE_DEFAULTS[args.role]
    args.metrics = metrics if args.metrics is None else args.metrics
    args.admin = admin if args.admin is None else args.admin
    args.pid_file = pid_file if args.pid_file is None else args.pid_file

    try:
        log.configure(args.log_level)
    except ValueError as error:  # --log-level or KOPPEL_LOG_LEVEL: a usage error, not a traceback
        sys.stderr.write(f"{error}\n")
        return 2
    bundle, error = _load_config(args)
    if error is not None:
        sys.stderr.write(f"{error}\n")
        return 1
    config = bundle.config
    from twisted.internet import reactor

    from engine.shell.engine import Engine
    from engine.store import StoreError, open_store

    from engine.core.units import parse_duration

    try:
        retention = parse_duration(args.retention, allow_never=True)
    except ValueError as error:
        sys.stderr.write(f"--retention: {error}\n")
        return 2
    from engine.shell.admin import load_token

    admin = None if args.admin == "off" else args.admin
    try:
        admin_token = load_token(args.admin_token_file) if admin else None
    except ValueError as error:
        sys.stderr.write(f"--admin-token-file: {error}\n")
        return 2
    try:
        store = open_store(args.store)
    except (StoreError, ValueError) as error:
        sys.stderr.write(f"--store {args.store}: {error}\n")
        return 1
    http = None if args.metrics == "off" else args.metrics
    try:
        engine = Engine(reactor, config, store, http_endpoint=http, drain_timeout=args.drain_timeout,
                        retention=retention, mappings=bundle.mappings, book=bundle.book,
                        admin_endpoint=admin, admin_token=admin_token, role=args.role)
    except ValueError as error:
        sys.stderr.write(f"{error}\n")
        store.close()
        return 2
    exit_code = [0]

    def started_failed(failure):
        log.get_logger().error("engine.start_failed", error=failure.getErrorMessage()[:200])
        exit_code[0] = 1
        reactor.stop()

    def start():
        from twisted.internet import defer

        defer.maybeDeferred(engine.startService).addErrback(started_failed)

    def reload():
        """SIGHUP / koppel reload: a config that does not load is reported; the running one stays."""
        reloaded, problem = _load_config(args)
        if problem is not None:
            engine.metrics.config_reloads.labels("failed").inc()
            engine.metrics.config_last_reload_successful.set(0)
            for item in problem.problems[:50]:
                engine.log.error("config.reload_failed", problem=str(item))
            return
        d = engine.reload(reloaded)

        def done(_):
            engine.metrics.config_reloads.labels("ok").inc()
            engine.metrics.config_last_reload_successful.set(1)
            engine.metrics.config_last_reload_success_timestamp.set(reactor.seconds())

        def failed(failure):
            engine.metrics.config_reloads.labels("failed").inc()
            engine.metrics.config_last_reload_successful.set(0)
            engine.log.error("config.reload_failed", problem=failure.getErrorMessage()[:200])

        d.addCallbacks(done, failed)

    import signal

    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
    # A process started with SIGINT ignored (`cmd &` in a script, some supervisors) passes that
    # on, and Twisted then leaves SIGINT alone: the engine would not stop on it at all. SIGINT
    # stops it cleanly, like SIGTERM, however it was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # before the pid file: a second engine on this store must not replace the running one's
        engine.claim()
    except StoreError as error:
        log.get_logger().error("engine.start_failed", error=str(error)[:200])
        store.close()
        return 1
    pid_file = Path(args.pid_file) if args.pid_file else None
    if pid_file is not None:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
    engine.metrics.config_last_reload_successful.set(1)
    engine.metrics.config_last_reload_success_timestamp.set(reactor.seconds())
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: engine.stopService() if engine.running else None)
    try:
        reactor.run()
    finally:
        try:  # (removed meanwhile, e.g. a cleanup of /run: nothing to do, the stop was clean)
            if pid_file is not None and pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
        except FileNotFoundError:
            pass
    return exit_code[0]


def _is_koppel(pid: int) -> bool:
    """Does ``pid`` run koppel? (SIGHUP kills a process that does not handle it.) Without
    /proc there is no way to tell, and the pid file is trusted as before."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True
    args = command.split(b"\0")
    return b"run" in args and (b"engine.cli" in args or any(os.path.basename(a) == b"koppel" for a in args))


def _reload(args) -> int:
    """Ask the running engine (by its pid file) to re-read channels and mappings; with no
    --pid-file, every process of a split engine (receive and deliver) is asked."""
    import signal

    if args.pid_file is not None:
        pid_files = [args.pid_file]
    else:
        pid_files = [f for _, _, f in _ROLE_DEFAULTS.values() if Path(f).exists()] or ["var/koppel.pid"]
    status = 0
    for pid_file in dict.fromkeys(pid_files):
        try:
            pid = int(Path(pid_file).read_text().strip())
        except (OSError, ValueError):
            sys.stderr.write(f"no running engine found: cannot read pid file {pid_file}\n")
            status = 1
            continue
        if not _is_koppel(pid):  # a pid file left by a kill -9, its number since reused
            sys.stderr.write(f"process {pid} is not a running koppel (stale pid file {pid_file})\n")
            status = 1
            continue
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            sys.stderr.write(f"no process {pid} (stale pid file {pid_file})\n")
            status = 1
            continue
        print(f"reload requested from engine {pid}; see its log for config.reloaded or config.reload_failed")
    return status


def _send(args) -> int:
    from engine.shell.send import send_files

    for path in args.files:  # every file readable before anything is sent (errors: see main)
        open(path, "rb").close()

    def go(reactor):
        return send_files(reactor, args.to, args.files, timeout=args.timeout, raw=args.raw)

    return _react_deferred(go)


def _bench(args) -> int:
    from engine.shell.bench import load_message, report, run_bench

    if args.connections < 1 or args.messages < 1:
        sys.stderr.write("--connections and --messages must be at least 1\n")
        return 2
    try:
        message = load_message(args.file)
    except ValueError as error:  # a file with no HL7 message in it
        sys.stderr.write(f"error: {error}\n")
        return 1

    def go(reactor):
        d = run_bench(reactor, args.to, connections=args.connections, messages=args.messages,
                      message=message, rate=args.rate)
        return d.addErrback(cannot_connect)

    def cannot_connect(failure):
        from twisted.internet import defer

        error = failure.value.subFailure.value if isinstance(failure.value, defer.FirstError) else failure.value
        from engine.shell.client import describe_failure

        sys.stderr.write(f"cannot connect to {args.to}: {describe_failure(error)}\n")
        return 1

    result = _react_deferred(go)
    if isinstance(result, dict):
        return report(result, as_json=args.json)
    return 1


def _react_deferred(go):
    """Run a Deferred-returning function under the reactor and return its result."""
    from twisted.internet import task

    box = []

    def main(reactor):
        return go(reactor).addCallback(box.append)

    try:
        task.react(main)
    except SystemExit as done:
        if done.code not in (0, None):
            return int(done.code)
    return box[0] if box else 1


def _map(args) -> int:
    from engine.preview import run

    return run(args)


def _messages(args) -> int:
    """Stored messages, newest first: headers and what became of them, never bodies."""
    import datetime as dt

    from engine.operator import open_existing_store
    from engine.store import StoreError

    store, problem = open_existing_store(args.store)
    if store is None:
        sys.stderr.write(f"error: {problem}\n")
        return 1
    try:
        from engine.operator import USAGE, _day, _Fail

        try:
            since, until = _day(args.date_from), _day(args.date_to, end=True)
        except _Fail as fail:
            sys.stderr.write(f"error: {fail.message}\n")
            return USAGE
        try:
            rows = store.list_messages(channel=args.channel, control_id=args.control_id, status=args.status,
                                       processing=args.processing, limit=args.limit, message_type=args.type,
                                       since=since, until=until)
        except StoreError as error:  # a damaged or locked store: one line, as the other commands say it
            sys.stderr.write(f"error: {error}\n")
            return 1
        if args.json:
            import json

            print(json.dumps([{name: getattr(row, name) for name in row.__dataclass_fields__} for row in rows],
                             indent=2))
            return 0
        print("ID\tRECEIVED\tCHANNEL\tTYPE\tCONTROL-ID\tSTATUS\tACK\tSIZE\tPROCESSING\tDETAIL")
        for row in rows:
            received = dt.datetime.fromtimestamp(row.received_at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
            origin = f" (built from {row.origin_id})" if row.origin_id else ""
            # a message a mapping built was never received nor acknowledged: not "accepted AA"
            status, ack = ("built", None) if row.origin_id else (row.status, row.ack_code)
            print("\t".join(str(value) if value is not None else "-" for value in (
                row.id, received, row.channel, row.message_type, row.control_id, status, ack,
                row.size, row.processing, (row.processing_detail or row.error or "") + origin)))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
