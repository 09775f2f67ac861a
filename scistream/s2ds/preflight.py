"""The templates checked before anything is served: rendered for sample sessions, each result
checked by the proxy itself, at start-up and at every reload (SIGHUP).

A template that does not render, or yields a config the proxy refuses, then stops s2cs (or is
refused by the reload) with one line naming the template, its line, the sample and the proxy's
words, instead of failing users' requests later.

Pure: which samples (`samples`), where in a template a config line came from (`template_line`),
how a failure reads. The shell, `check`, renders in a scratch directory and runs the proxy's
check (`haproxy -c`, the stunnel dry run) through the backend.
"""

from __future__ import annotations

import re
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jinja2

from ..errors import BackendFailed, ConfigError
from .backend import Backend, write_private
from .render import ListenerSpec, ProxySpec, Role, SessionFiles, render

# Credentials for the check only: the proxies want real certificate files to load.
SAMPLE_UID = "00000000-0000-4000-8000-000000000000"
SAMPLE_RATE = 1_250_000  # bytes per second: 10 Mb/s
SAMPLE_SOURCES = ("127.0.0.0/8", "::1/128", "192.0.2.0/24")  # outbound: IPv4 and IPv6, as a policy may

# The config lines a proxy names: haproxy `parsing [.../proxy.conf:12]`, stunnel `.../dry.conf:12:`.
_CONFIG_LINE = re.compile(r"(?:proxy|dry)\.conf:(\d+)")
_EXPRESSION = re.compile(r"\{\{.*?\}\}")
_COMMENT = re.compile(r"\{#.*?#\}", re.DOTALL)


@dataclass(frozen=True)
class Sample:
    """A session as the gateway may make one, and how a message names it."""

    description: str  # "an inbound session with a rate, 2 listeners"
    spec: ProxySpec


def describe(role: Role, listeners: int, rate_bytes: int) -> str:
    rate = " with a rate" if rate_bytes else ""
    return f"an {role} session{rate}, {listeners} listener{'s' if listeners > 1 else ''}"


def samples(backend: Backend) -> list[Sample]:
    """Both roles, with and without a rate, one and several listeners: every branch the shipped
    templates take (shaper or not, shaper behind or in front of the proxy). Few, since each costs
    one proxy check at every start. The connection counts (1 and 4) are the ones the samples use."""
    inbound_one = (ListenerSpec("0.0.0.0", 5100, "10.0.0.2", 5001),)
    inbound_two = (
        ListenerSpec("0.0.0.0", 5101, "10.0.0.2", 5001),
        ListenerSpec("0.0.0.0", 5102, "10.0.0.2", 5002),
    )
    outbound_one = (ListenerSpec("0.0.0.0", 5103, "192.0.2.10", 5100),)
    outbound_two = (
        ListenerSpec("0.0.0.0", 5104, "192.0.2.10", 5101),
        ListenerSpec("0.0.0.0", 5105, "192.0.2.10", 5102),
    )
    cases: list[tuple[Role, tuple[ListenerSpec, ...], int, int]] = [
        ("inbound", inbound_one, 1, 0),
        ("inbound", inbound_two, 4, SAMPLE_RATE),
        ("outbound", outbound_one, 1, 0),
        ("outbound", outbound_two, 4, SAMPLE_RATE),
    ]
    found = []
    for i, (role, listeners, num_conn, rate) in enumerate(cases):
        spec = backend.spec(f"check{i}", role, listeners, num_conn, rate, SAMPLE_SOURCES)
        found.append(Sample(describe(role, len(listeners), rate), spec))
    return found


def template_line(source: str, line: str) -> int | None:
    """The line of `source` (a template) that rendered `line` (of a config), when one line of
    literal text with `{{ ... }}` in between matches it; None when none does."""
    wanted = line.strip()
    source = _COMMENT.sub(lambda m: "\n" * m.group().count("\n"), source)
    for number, text in enumerate(source.splitlines(), 1):
        if "{%" in text:
            continue  # a tag renders no line of its own (trim_blocks, lstrip_blocks)
        parts = _EXPRESSION.split(text.strip())
        if not "".join(parts).strip():
            continue  # nothing but expressions: it would match any line
        if re.fullmatch(".*?".join(re.escape(part) for part in parts), wanted):
            return number
    return None


def where_rendering_failed(exc: BaseException, fallback: str) -> tuple[str, int | None]:
    """The template file and line a render failure happened at: jinja2 puts the template's own
    frames into the traceback, named by the template file."""
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return exc.filename or fallback, exc.lineno
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not frame.filename.endswith(".py"):
            return frame.filename, frame.lineno
    return fallback, None


def _at(filename: str, line: int | None) -> str:
    return f"template {filename}" + (f", line {line}" if line else "")


def render_failure(exc: BaseException, filename: str, sample: Sample) -> str:
    where, line = where_rendering_failed(exc, filename)
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"{_at(where, line)}: not a valid template: {exc.message}"
    reason = exc.message if isinstance(exc, ConfigError) else str(exc) or type(exc).__name__
    return f"{_at(where, line)}: does not render for {sample.description}: {reason}"


def refusal(exc: BackendFailed, filename: str, source: str, config: str, sample: Sample) -> str:
    """The proxy's words, with the template line that made the config line it names."""
    found = _CONFIG_LINE.search(exc.message)
    configs = config.splitlines()
    if found and 0 < int(found.group(1)) <= len(configs):
        number = int(found.group(1))
        text = configs[number - 1].strip()
        line = template_line(source, text)
        where = f"{_at(filename, line)} (config line {number}: {text!r})"
    else:
        where = _at(filename, None)
    return f"{where}, rendered for {sample.description}: {exc.message}"


def check(backend: Backend, templates: jinja2.Environment | None = None) -> None:
    """Render `backend`'s template from `templates` (default: the backend's own) for every
    sample and let the proxy check each config; ConfigError with the first failing sample's.
    The samples are checked at once, each proxy check in its own thread: it waits on a process."""
    env = templates or backend.templates
    with tempfile.TemporaryDirectory(prefix="s2cs-check-") as scratch:
        found = samples(backend)
        directories = [Path(scratch) / str(i) for i in range(len(found))]
        with ThreadPoolExecutor(max_workers=len(found), thread_name_prefix="check") as pool:
            for _ in pool.map(lambda s, d: _check_one(backend, env, s, d), found, directories):
                pass  # the first exception, in the samples' order, comes out here


def _check_one(backend: Backend, env: jinja2.Environment, sample: Sample, directory: Path) -> None:
    files = SessionFiles(directory)
    files.directory.mkdir(mode=0o700)
    try:
        template = env.get_template(backend.template)
        text = render(sample.spec, files, backend.template, env)
    except Exception as exc:  # the template's own code may raise anything
        raise ConfigError(render_failure(exc, backend.template, sample)) from None
    filename = template.filename or backend.template
    backend.write_credentials(SAMPLE_UID, files)
    write_private(files.config, text.encode())
    try:
        backend.check(files.config, files)
    except BackendFailed as exc:
        source = Path(filename).read_text(errors="replace") if template.filename else ""
        raise ConfigError(refusal(exc, filename, source, text, sample)) from None
