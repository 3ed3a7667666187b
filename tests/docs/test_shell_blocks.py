"""Every shell block of the README and docs/*.md runs, as a reader would paste it.

Each fenced ```sh, ```bash or ```console block is run by bash (`set -e`), in order, in a
sandbox that looks like a fresh machine with a clone of this repository:

- its own network namespace (`unshare`): loopback only, and port 1883 is free, so a block
  may start `mosquitto -p 1883` or assume a broker there, as the README does; the host
  name `broker` (the docs' placeholder for the operator's broker) is 127.0.0.1;
- a fresh directory per document, holding links to the repository's `.venv`, `config`,
  `scripts`, `systemd`, `bench` and `tests`, with `.venv/bin` first on the PATH (the README's
  `. .venv/bin/activate`) and no `RIGD_*` variables; blocks of one document share it,
  in order, as a reader following the document would;
- a broker on 1883 when the block starts none itself.

Whatever a block leaves running is stopped when it ends: Ctrl-C first, as a person would,
then SIGTERM, then SIGKILL. A block passes when it exits 0 and printed no traceback.

An HTML comment on the line before a block says how it runs, in the Markdown source
where a reader sees it:

- `<!-- not run: REASON -->`: the block cannot run here (it needs root on the host,
  systemd as PID 1, or it is this test suite itself). These are listed by
  `test_blocks_not_run_are_few_and_say_why`, which fails on a marker without a reason.
- `<!-- test: KEY=VALUE ... -->`: `interrupt=S` sends Ctrl-C S seconds in (a command that
  runs until Ctrl-C), and the block passes if it then stops cleanly; `expect=TEXT` (any
  number) must appear in its output; `settle=S` waits S seconds after the last command
  (for what background commands print); `fixture=NAME` prepares what the block assumes
  is already there (see `FIXTURES`); `timeout=S` (default 90).

A ```python block may carry `<!-- test: save-as=FILE -->`: it is written to FILE for the
blocks after it (the docs name it, e.g. `make_order.py`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"sh", "bash", "console", "shell"}
# Blocks that cannot run here, at most: each is a hole in what this test proves.
MAX_NOT_RUN = 8

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not run|test):\s*(?P<body>.*?)\s*-->\s*$")


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None = None  # "not run" or "test"
    body: str = ""
    options: dict[str, list[str]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    def opt(self, key: str, default: str | None = None) -> str | None:
        vals = self.options.get(key)
        return vals[-1] if vals else default


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of `doc` (shell and saved python), with the marker above each."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group("lang"):
            i += 1
            continue
        indent, lang = m.group("indent"), m.group("lang")
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : j]]
        block = Block(doc, i + 1, lang, "\n".join(body) + "\n")
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mk = _MARKER.match(lines[k]) if k >= 0 else None
        if mk:
            block.marker, block.body = mk.group("kind"), mk.group("body")
            if block.marker == "test":
                for item in shlex.split(block.body):
                    key, _, value = item.partition("=")
                    block.options.setdefault(key, []).append(value)
        if lang in SHELLS or block.opt("save-as"):
            out.append(block)
        i = j + 1
    return out


def commands(block: Block) -> str:
    """The shell text of a block: a console block's `$ ` lines, else the whole block."""
    if block.lang != "console":
        return block.text
    return "".join(ln[2:] + "\n" for ln in block.text.splitlines() if ln.startswith("$ "))


ALL = [b for doc in DOCS for b in blocks(doc)]


def test_every_doc_has_its_blocks_found() -> None:
    """The extractor sees the blocks the README is known to have (a broken regex would
    otherwise pass every document with nothing run)."""
    readme = [b for b in ALL if b.doc.name == "README.md" and b.lang in SHELLS]
    assert len(readme) >= 6
    assert any("rigctl grid send" in b.text for b in readme)


def test_blocks_not_run_are_few_and_say_why() -> None:
    skipped = [b for b in ALL if b.marker == "not run"]
    for b in skipped:
        assert len(b.body) >= 10, f"{b.where}: `not run` needs a reason"
    listing = "\n".join(f"  {b.where}: {b.body}" for b in skipped)
    print(f"shell blocks not run ({len(skipped)}):\n{listing}")
    assert len(skipped) <= MAX_NOT_RUN, f"too many blocks not run:\n{listing}"
    for b in ALL:
        unknown = set(b.options) - {
            "interrupt",
            "expect",
            "settle",
            "fixture",
            "timeout",
            "save-as",
        }
        assert not unknown, f"{b.where}: unknown test option(s) {sorted(unknown)}"


# -- the sandbox ---------------------------------------------------------------------------


def _userns_ok() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare (util-linux) and ip (iproute2)"
    r = subprocess.run(
        ["unshare", "--map-root-user", "--net", "--mount", "ip", "link", "set", "lo", "up"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if r.returncode != 0:
        return f"user and network namespaces are not available here: {r.stderr.strip()}"
    return None


# The real mosquitto, found before the sandbox's PATH shadows it.
_MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# Inside a user namespace mosquitto, started as root, cannot drop privileges to its own
# user: this stand-in starts it as `mosquitto -p PORT` would, without that step.
_MOSQUITTO_SHIM = f"""#!/bin/sh
port=1883
while [ $# -gt 0 ]; do
  case "$1" in -p) port="$2"; shift 2;; *) shift;; esac
done
conf="$RIGD_DOCTEST_DIR/.mosquitto-$port.conf"
printf 'user root\\nlistener %s 127.0.0.1\\nallow_anonymous true\\n' "$port" > "$conf"
exec {_MOSQUITTO} -c "$conf"
"""


def _fixture_grid_site(block: Block, n: int) -> str:
    """A site `kg-bishkek-01` (docs/grid-protocol.md's example) on a small simulated farm,
    trusting the operator key the document's keygen made (or one made here), its daemon
    running: the site an operator's commands reach, or an edge host's running rigd.
    `rigctl` finds it through RIGD_CONFIG, as it would /etc/rigd/rigd.toml."""
    return textwrap.dedent(
        f"""\
        rm -f site.toml
        [ -f dispatch-2026.pub ] || rigctl grid keygen --out dispatch-2026 > /dev/null
        rigd sim --rigs 4 --pdus 0 --site kg-bishkek-01 --max-import-kw 6000 \\
            --grid-key dispatch-2026.pub --write-config site.toml \\
            --state-dir site-{n} --interval 2 > site-sim-{n}.log 2>&1 &
        for _ in $(seq 100); do [ -s site.toml ] && break; sleep 0.1; done
        rigd run -c site.toml > site-run-{n}.log 2>&1 &
        mosquitto_sub -t rigd/kg-bishkek-01/status -C 1 -W 30 > /dev/null
        export RIGD_CONFIG=site.toml
        """
    )


def _fixture_history(block: Block, n: int) -> str:
    """A site config (found through RIGD_CONFIG, as /etc/rigd/rigd.toml would be) whose
    state database holds a few hours of history, and a copy of that database."""
    return textwrap.dedent(
        """\
        printf '[site]\\nid = "lab"\\nstate_dir = "lab-state"\\n' > lab.toml
        printf '[control]\\nmax_import_kw = 100\\n' >> lab.toml
        python -m tests.docs.history_fixture lab-state/rigd.sqlite
        cp lab-state/rigd.sqlite copy-of-rigd.sqlite
        export RIGD_CONFIG=lab.toml
        """
    )


FIXTURES: dict[str, Callable[[Block, int], str]] = {
    "grid-site": _fixture_grid_site,
    "history": _fixture_history,
}


def _sandbox(workdir: Path) -> dict[str, str]:
    # tests/: `python -m bench.control` runs the daemon on the tests' simulated-farm harness.
    for name in (".venv", "config", "scripts", "systemd", "bench", "tests", "README.md"):
        link = workdir / name
        if not link.exists():
            link.symlink_to(ROOT / name)
    shims = workdir / ".shims"
    shims.mkdir(exist_ok=True)
    shim = shims / "mosquitto"
    shim.write_text(_MOSQUITTO_SHIM)
    shim.chmod(0o755)
    (workdir / ".hosts").write_text("127.0.0.1 localhost broker\n::1 localhost\n")
    (workdir / "home").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RIGD_", "PYTEST_"))}
    env.update(
        PATH=f"{ROOT / '.venv/bin'}:{shims}:{env.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin",
        HOME=str(workdir / "home"),
        RIGD_DOCTEST_DIR=str(workdir),
        PYTHONPATH=str(ROOT),  # for the fixtures' helpers (tests.docs), not the blocks
        COLUMNS="120",
        TERM="dumb",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


def _wrapper(block: Block, n: int, workdir: Path) -> str:
    script = workdir / f".block-{n}.sh"
    script.write_text("set -e -o pipefail\n" + commands(block))
    setup = ""
    fixture = block.opt("fixture")
    if fixture:
        assert fixture in FIXTURES, f"{block.where}: unknown fixture {fixture!r}"
        setup = FIXTURES[fixture](block, n)
    starts_broker = re.search(r"^\s*mosquitto\b.*-p\s+1883", commands(block), re.M)
    broker = (
        ""
        if starts_broker
        else "mosquitto -p 1883 > /dev/null 2>&1 &\n"
        "for _ in $(seq 50); do mosquitto_pub -t doctest -n 2>/dev/null && break; sleep 0.1; done\n"
    )
    return (
        "set -e\nip link set lo up\n"
        f"mount --bind {workdir / '.hosts'} /etc/hosts\n"
        f"cd {shlex.quote(str(workdir))}\n"
        f"{broker}{setup}"
        f"bash {shlex.quote(str(script))}\n"
        f"sleep {float(block.opt('settle', '0') or 0)}\n"
    )


def _stop_group(pgid: int) -> None:
    """Ctrl-C, then SIGTERM, then SIGKILL to whatever the block left running."""
    for sig, wait_s in ((signal.SIGINT, 3.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_block(block: Block, n: int, workdir: Path) -> tuple[int, str]:
    """Run one block in the sandbox; (exit status, everything it printed)."""
    if block.lang not in SHELLS:  # a saved program, for the blocks after it
        (workdir / str(block.opt("save-as"))).write_text(block.text)
        return 0, ""
    env = _sandbox(workdir)
    log = workdir / f".block-{n}.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                "unshare",
                "--map-root-user",
                "--net",
                "--mount",
                "bash",
                "-c",
                _wrapper(block, n, workdir),
            ],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        interrupt = block.opt("interrupt")
        timeout = float(block.opt("timeout", "90") or 90)
        try:
            if interrupt is not None:
                try:
                    rc = proc.wait(float(interrupt))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGINT)  # the reader's Ctrl-C
                    rc = proc.wait(timeout)
                    rc = 0 if rc in (130, -signal.SIGINT) else rc
            else:
                rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = -1
            out.write(f"\n[doc test: timed out after {timeout:g} s]\n".encode())
        finally:
            _stop_group(proc.pid)
            proc.wait()
    return rc, log.read_text(errors="replace")


# Each block has its own timeout (`timeout=S`, default 90); a document's blocks together
# may outlast the suite's 120 s per test (the README's took 86 s at a load of 8 on two
# cores), so the test's own limit is generous and the blocks' limits do the catching.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_shell_blocks_run(doc: Path) -> None:
    todo = [b for b in blocks(doc) if b.marker != "not run"]
    if not todo:
        return
    why = _userns_ok()
    if why is not None:
        pytest.skip(f"the doc blocks run in a sandbox that {why}")
    # Short: the blocks' Unix sockets (rigd's admin socket) must fit in 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="doc-", dir="/tmp"))
    try:
        for n, block in enumerate(todo):
            rc, output = run_block(block, n, workdir)
            shown = f"{block.where}\n--- block\n{block.text}--- output\n{output[-6000:]}"
            assert rc == 0, f"exit status {rc} of {shown}"
            assert "Traceback (most recent call last)" not in output, f"traceback in {shown}"
            for text in block.options.get("expect", []):
                assert text in output, f"{text!r} not printed by {shown}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
