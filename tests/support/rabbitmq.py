"""A real RabbitMQ broker for the tests: Debian's `rabbitmq-server` (`.ci/run` installs it) on
free ports, its data, logs and Erlang cookie in a temp dir, its own epmd on a free port so that
nothing outlives the session. `stop()` and `start()` restart the same node (same ports, same
data) for the broker-restart tests; `crash()` kills it without a clean stop."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.ops.embedded import free_ports, tail

LIB_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's scripts, without the wrapper's `su`
MISSING = (
    "rabbitmq-server is not installed: the RabbitMQ tests need a real broker. Run `.ci/run`"
    " (it installs Debian's rabbitmq-server as root) or `apt-get install -y rabbitmq-server`,"
    " or point FLASHGATE_TEST_RABBITMQ_URL at an existing broker"
)


class BrokerMissing(RuntimeError):
    """rabbitmq-server is not installed; the message says how to install it."""


def script(name: str) -> str:
    """The path of a RabbitMQ script: Debian's own one, else the one on PATH."""
    if (LIB_BIN / name).exists():
        return str(LIB_BIN / name)
    found = shutil.which(name)
    if found is None:
        raise BrokerMissing(MISSING)
    return found


class RabbitBroker:
    """One RabbitMQ node in `base` (a fresh directory), on free ports."""

    def __init__(self, base: Path, start_timeout: float = 60) -> None:
        self.server = script("rabbitmq-server")
        self.ctl = script("rabbitmqctl")
        self.base = base
        self.start_timeout = start_timeout
        self.port, self.dist_port, self.epmd_port = free_ports(3)
        self.node = f"fg{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0  # seconds the last start took, until await_startup answered
        self._user = self._run_as()
        self._prepare()

    def _run_as(self) -> pwd.struct_passwd | None:
        """Debian's scripts refuse root: as root, the broker runs as the `rabbitmq` user."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("rabbitmq")
        except KeyError:
            raise BrokerMissing(MISSING) from None

    def _prepare(self) -> None:
        home = self.base / "home"
        for folder in (home, self.base / "mnesia", self.base / "log"):
            folder.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(f"FLASHGATETEST{self.port}")
        cookie.chmod(0o400)
        (self.base / "enabled_plugins").write_text("[].\n")
        if self._user is not None:
            for path in [self.base, *self.base.rglob("*")]:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.base / "home"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_FEATURE_FLAGS_FILE=str(self.base / "feature_flags"),
            RABBITMQ_PID_FILE=str(self.base / "rabbit.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq"),  # none: the defaults
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
        )
        return env

    def _spawn(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        user = {} if self._user is None else {"user": self._user.pw_uid, "group": self._user.pw_gid}
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            args, env=self.env(), cwd=self.base, **user, **kwargs
        )

    def ctl_run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        proc = self._spawn(
            self.ctl,
            "-n",
            self.node,
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the script and the CLI's own Erlang VM
            out, _ = proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out)

    def start(self) -> None:
        """Start the node and wait until it accepts connections."""
        started = time.monotonic()
        with (self.base / "server.out").open("ab") as log:
            self.proc = self._spawn(
                self.server, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout
        while True:  # await_startup fails at once until the node has registered with epmd
            left = deadline - time.monotonic()
            done = self.ctl_run("await_startup", "--timeout", str(max(1, int(left))))
            if done.returncode == 0 or self.proc.poll() is not None or left <= 0:
                break
            time.sleep(0.2)
        if done.returncode != 0 or self.proc.poll() is not None:
            output = done.stdout.decode(errors="replace")
            self.kill()
            raise RuntimeError(
                f"RabbitMQ node {self.node} did not start:\n{output}\n"
                f"{tail(self.base / 'server.out')}"
            )
        self.startup_s = time.monotonic() - started

    def stop(self) -> None:
        """Stop the node (its data stays), then make sure its processes are gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.ctl_run("stop", timeout=30)
        self.kill()

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the scripts left behind
        except ProcessLookupError:
            pass
        proc.wait(10)

    def crash(self) -> None:
        """SIGKILL the node, no clean stop (a crash, an OOM kill); its data stays."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.kill()

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The node stopped for the block, then started again on the same ports and data."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def queue_info(self, name: str) -> dict[str, Any]:
        """`rabbitmqctl list_queues` of one queue: its `durable` flag and `arguments`."""
        done = self.ctl_run(
            "list_queues", "-q", "--formatter", "json", "name", "durable", "arguments"
        )
        assert done.returncode == 0, done.stdout.decode(errors="replace")
        for row in json.loads(done.stdout):
            if row["name"] == name:  # arguments come as [key, type, value]
                return {**row, "arguments": {k: v for k, _, v in row["arguments"]}}
        raise AssertionError(f"no queue {name!r}")

    def close(self) -> None:
        """Stop the node and the epmd it started; remove nothing (the temp dir does)."""
        self.stop()
        kill_epmd(self.epmd_port)


def kill_epmd(port: int) -> None:
    """The epmd that listens on `port` (it leaves the broker's process group): killed."""
    wanted = f"-port\0{port}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"epmd" not in cmdline.split(b"\0")[0]:
            continue
        if wanted in cmdline or f"ERL_EPMD_PORT={port}\0".encode() in environ:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextmanager
def rabbit_broker() -> Iterator[RabbitBroker]:
    """A started broker in a fresh temp dir (not pytest's: its parents are closed to the
    `rabbitmq` user); stopped, with its epmd, and the dir removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="flashgate-rabbitmq-"))
    try:
        broker = RabbitBroker(base)
        try:
            broker.start()
            yield broker
        finally:
            broker.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
