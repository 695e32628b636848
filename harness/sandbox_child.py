"""The trusted prelude that runs inside the sandbox and hosts one untrusted program.

Started by harness/sandbox.py as `python -I -B -S -c <this file's text> PAYLOAD_FD RESULT_FD`,
never imported. In order, before any untrusted code exists: read and close the payload (the
solution, the tests, limits, the run's token); set the resource limits; drop to the sandbox uid
when started as root; start the worker thread that will run the program; forbid any further
thread or process (RLIMIT_NPROC 0); install the audit hook; let the worker go. The worker runs
the solution, then the tests, and has the vault write the pass line from its report call.
harness/sandbox.py argues why the program can neither escape nor forge that report.

Exit status (diagnostic only; the parent trusts only the token line): 0 after the pass was
reported, 1 an assert failed, 2 anything else.
"""
import _thread
import ast
import io
import json
import linecache
import os
import resource
import signal
import sys
import traceback

WORKER_STACK_BYTES = 16 << 20  # at least a main thread's usual 8 MB


# --- the audit hook (the second layer; the kernel sandbox is the first) ---------------------

def _make_hook(root: str):
    """An audit hook refusing what a benchmark solution never needs, tamper-proof by construction.

    Everything the hook uses is bound here, in its closure, as immutable values (str, tuples,
    frozensets) or builtin functions and types; it looks up no global or builtin by name and
    calls no method of an object the program made, so redefining modules, builtins or classes
    changes nothing. Once added, only the interpreter references it: no table lives in
    sys.modules['__main__'], and the gc walks that could find it are themselves refused.
    """
    type_, str_, bytes_, int_, tuple_, len_ = type, str, bytes, int, tuple, len
    denied = PermissionError
    getcwd, readlink = os.getcwd, os.readlink
    root_parts = tuple(part for part in root.split("/") if part)
    n_root = len(root_parts)
    dev_null = ("dev", "null")  # the one place outside root that may be written
    refused = frozenset({
        # processes and signals (RLIMIT_NPROC and the PID namespace stop them in the kernel too)
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
        # limits, links, more audit hooks, tracers (a tracer is handed every frame)
        "resource.setrlimit", "resource.prlimit", "os.link", "os.symlink",
        "sys.addaudithook", "sys.settrace", "sys.setprofile", "sys._current_frames",
        # object-graph walks: the only way to this hook's cells or the vault's value stack
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        # hand-made bytecode reads and writes raw memory; exec and compile stay allowed
        "code.__new__"})
    refused_prefixes = ("socket.", "ctypes.", "sys.monitoring.")
    refused_imports = frozenset({"_ctypes", "_posixsubprocess"})  # fork_exec is not audited
    # raw-memory test modules; subinterpreters, which would run without this hook
    refused_import_prefixes = ("_test", "_xx", "xx", "_interp")
    # event -> ((path argument, dir_fd argument or -1), ...), in CPython's argument order
    path_events = (
        ("os.remove", ((0, 1),)), ("os.rmdir", ((0, 1),)), ("os.mkdir", ((0, 2),)),
        ("os.rename", ((0, 2), (1, 3))), ("os.chmod", ((0, 2),)), ("os.chown", ((0, 3),)),
        ("os.utime", ((0, 3),)), ("os.truncate", ((0, -1),)), ("shutil.rmtree", ((0, 1),)),
        ("os.setxattr", ((0, -1),)), ("os.removexattr", ((0, -1),)))
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def hook(event, args):
        if event in refused or event.startswith(refused_prefixes):
            raise denied(f"sandbox: {event} is not allowed")
        if event == "object.__setattr__" and args[1] == "__code__":
            raise denied("sandbox: replacing a function's code is not allowed")
        if event == "import":
            if args[0] in refused_imports or args[0].startswith(refused_import_prefixes):
                raise denied(f"sandbox: import {args[0]} is not allowed")
            return
        targets = []  # (path, dir_fd) pairs that must lie inside root
        if event == "open":  # args: path, mode (None for os.open), flags
            path = args[0]
            if type_(path) is bytes_:
                path = path.decode("utf-8", "surrogateescape")
            if type_(path) is str_ and path.rstrip("/").rpartition("/")[2] == "mem":
                raise denied("sandbox: process memory files cannot be opened")
            if not args[2] & write_flags:
                return  # reads are fine (imports read files)
            if args[1] is None and type_(path) is str_ and not path.startswith("/"):
                raise denied("sandbox: relative os.open for writing (the event lacks its dir_fd)")
            targets.append((path, -1))
        elif event == "sqlite3.connect":
            database = args[0]
            if type_(database) is str_ and database in (":memory:", ""):
                return
            if type_(database) is str_ and database.startswith("file:"):
                raise denied("sandbox: sqlite3 URIs are not allowed")
            targets.append((database, -1))
        else:
            for name, positions in path_events:
                if name == event:
                    for path_at, dir_fd_at in positions:
                        targets.append((args[path_at], -1 if dir_fd_at < 0 else args[dir_fd_at]))
        for path, dir_fd in targets:
            if type_(path) is int_:  # a file descriptor: where it points
                path = readlink("/proc/self/fd/" + str_(path))
            elif type_(path) is bytes_:
                path = path.decode("utf-8", "surrogateescape")
            elif type_(path) is not str_:
                raise denied(f"sandbox: {event} needs a str, bytes or int path")
            if not path.startswith("/"):
                if dir_fd is not None and type_(dir_fd) is not int_:
                    raise denied(f"sandbox: {event} with an odd dir_fd")
                base = getcwd() if dir_fd is None or dir_fd < 0 else readlink(
                    "/proc/self/fd/" + str_(dir_fd))
                path = base + "/" + path
            # Lexical resolution is exact here: the program cannot create symlinks (refused
            # above), so no component under root is one.
            parts = []
            for part in path.split("/"):
                if part == "..":
                    if parts:
                        parts.pop()
                elif part and part != ".":
                    parts.append(part)
            if tuple_(parts) == dev_null:
                continue
            if len_(parts) < n_root or tuple_(parts[:n_root]) != root_parts:
                raise denied(f"sandbox: {event} outside {root}: {path!r}")

    return hook


# --- the worker and the vault ----------------------------------------------------------------

def _vault(box, getframe):
    """Writes the pass line, but only when resumed from the worker's report call (see _boot).

    box: [writer, raw result pipe, writer], the writer a BufferedWriter whose buffer already
    holds the pass line. Priming empties the box onto this frame's value stack, which no Python
    API exposes (gc's object walks, the one way in, are refused by the hook): from then on no
    frame's f_locals leads to the line. The raw pipe is closed on every way out of the inner
    `with` (the outer one keeps the writer alive until then), so an unflushed line is dropped;
    the writer is flushed only if the frame that primed the vault (_boot's) is, when the vault
    resumes, again on the line it primed it from: the report call, which it reaches only after
    the solution and the tests returned. Tuple, subscript and comparison are evaluated left to
    right, so everything left of the `yield` is taken at priming, everything right of it after.
    """
    with box.pop():
        with box.pop():
            # (no-op, flush)[the priming frame is back on its priming line]()
            (int, box.pop().flush)[getframe(1).f_lineno == (getframe(1), (yield))[0].f_lineno]()


def _boot(solution, tests, vault, go, streams, print_exc, next_, exit_, exec_, assertion_error,
          base_exception):
    """The worker thread: prime the vault, run the solution, then the tests, then report.

    The vault is resumed from one call site, twice: first to prime it (it records this frame and
    line), then, with the program's run as the argument, to report. Every name that call uses is
    loaded before the program's code runs, so rebinding this frame's locals (f_locals writes
    through on Python >= 3.13) cannot change what it does; the call reaches the vault only if
    both exec calls returned.
    """
    go.acquire()  # until the process limit and the audit hook are in place
    # Not "__main__", so a completion's demo under `if __name__ == "__main__":` is skipped.
    namespace = {"__name__": "__sandbox__"}
    for primed in (False, True):
        try:
            next_(vault,  # the vault's one call site; the program runs on the next line
                  exec_(tests, (namespace, exec_(solution, namespace))[0]) if primed else None)
        except assertion_error:
            status = 1
            try:
                print_exc()
            except base_exception:
                pass
        except base_exception:
            status = 2
            try:
                print_exc()
            except base_exception:
                pass
        else:
            continue
        break
    else:
        status = 0
    for stream in streams:
        try:
            stream.flush()
        except base_exception:
            pass
    exit_(status)  # skips atexit handlers and finalizers the program may have left


def _plain(value):
    """value with the standard library's subclasses of dict, list and tuple (Counter,
    defaultdict, OrderedDict, namedtuples) made plain, so its repr is a literal when the
    value compares equal to one; anything else unchanged (its repr will not read back)."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)) and type(value) is not frozenset:
        return {_plain(v) for v in value}
    return value


def _serve(solution, calls, go, out, streams, print_exc, exit_, exec_, literal_eval, repr_,
           dumps, plain):
    """The worker thread in calls mode: run the solution, then make each call and write repr of
    its value, as a JSON string, one line per call, to `out` (the result pipe). Nothing here is
    trusted by the parent: it judges the values itself, so the only way to pass is to return
    the right ones."""
    go.acquire()
    namespace = {"__name__": "__sandbox__"}
    status = 0
    try:
        exec_(solution, namespace)
        for name, args, kwargs in calls:
            value = namespace[name](*literal_eval(args), **literal_eval(kwargs))
            out.write((dumps(repr_(plain(value))) + "\n").encode())
    except BaseException:
        status = 2
        try:
            print_exc()
        except BaseException:
            pass
    for stream in (*streams, out):
        try:
            stream.flush()
        except BaseException:
            status = 2
    exit_(status)


def _compile(source: str, filename: str):
    """Compile one part of the program, keeping its source for tracebacks."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return compile(source, filename, "exec")


def _main(payload_fd: int, result_fd: int) -> None:
    with os.fdopen(payload_fd, "r+b") as f:
        payload = json.loads(f.read())
        f.truncate(0)  # from here on the token is nowhere but in the writer's buffer
    limits = payload["limits"]
    for which, value in ((resource.RLIMIT_CPU, limits["cpu_seconds"]),
                         (resource.RLIMIT_AS, limits["memory_bytes"]),
                         (resource.RLIMIT_FSIZE, limits["file_bytes"]),
                         (resource.RLIMIT_NOFILE, limits["open_files"]),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))
    uid = payload["uid"]
    if uid is not None:  # started as root: become nobody, which also clears every capability
        os.setgroups([])  # and makes the kernel mark this process non-dumpable
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # no Python-level signal handler remains
    try:
        solution = _compile(payload["solution"], "solution.py")
        tests = _compile(payload["tests"], "tests.py")
    except SyntaxError:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(2)
    raw = io.FileIO(result_fd, "w", closefd=True)
    go = _thread.allocate_lock()
    go.acquire()
    _thread.stack_size(WORKER_STACK_BYTES)
    if payload["calls"] is not None:  # calls mode: the parent decides the verdict
        writer = vault = None
        _thread.start_new_thread(_serve, (solution, payload["calls"], go, raw,
                                          (sys.stdout, sys.stderr), traceback.print_exc,
                                          os._exit, exec, ast.literal_eval, repr, json.dumps,
                                          _plain))
    else:
        writer = io.BufferedWriter(raw, buffer_size=4096)
        writer.write(f"passed {payload['token']}\n".encode())  # buffered: not in the pipe yet
        vault = _vault([writer, raw, writer], sys._getframe)
        _thread.start_new_thread(_boot, (solution, tests, vault, go, (sys.stdout, sys.stderr),
                                         traceback.print_exc, next, os._exit, exec,
                                         AssertionError, BaseException))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no new thread or process from here on
    if payload["audit_hook"]:
        sys.addaudithook(_make_hook(payload["root"]))
    del payload, raw, writer, vault
    go.release()
    idle = _thread.allocate_lock()
    idle.acquire()
    idle.acquire()  # forever: the worker ends the process


if __name__ == "__main__":
    _main(int(sys.argv[1]), int(sys.argv[2]))
