"""The start-up check of the templates: samples, messages, and the real proxies' verdicts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scistream.errors import ConfigError
from scistream.s2ds import preflight
from scistream.s2ds.backend import Backend
from scistream.s2ds.haproxy import HaproxyBackend
from scistream.s2ds.preflight import samples, template_line
from scistream.s2ds.render import SessionFiles, default_templates, environment, render
from scistream.s2ds.stunnel import StunnelBackend

BACKENDS = {"haproxy": HaproxyBackend, "stunnel": StunnelBackend}


def operator_templates(tmp_path: Path) -> Path:
    """A copy of the shipped templates, as an operator makes for --templates."""
    path = tmp_path / "templates"
    shutil.copytree(default_templates(), path)
    return path


def backend_of(kind: str, templates: Path | None = None) -> Backend:
    return BACKENDS[kind](environment(templates, default_templates()))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


# --- which samples ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_the_samples_cover_both_roles_rates_and_listener_counts(kind):
    found = samples(backend_of(kind))
    assert {(s.spec.role, s.spec.rate_bytes > 0, len(s.spec.listeners)) for s in found} == {
        ("inbound", False, 1),
        ("inbound", True, 2),
        ("outbound", False, 1),
        ("outbound", True, 2),
    }
    assert [s.description for s in found] == [
        "an inbound session, 1 listener",
        "an inbound session with a rate, 2 listeners",
        "an outbound session, 1 listener",
        "an outbound session with a rate, 2 listeners",
    ]


def test_the_haproxy_samples_take_every_branch_of_its_template():
    """With the shaper behind the proxy (inbound) and in front of it (outbound), with and without
    a rate. (Its branch without a shaper serves only systems without splice(2).)"""
    found = {
        (s.spec.role, s.spec.shaped, s.spec.front, s.spec.rate_bytes > 0)
        for s in samples(backend_of("haproxy"))
    }
    assert found == {
        ("inbound", True, False, False),
        ("inbound", True, False, True),
        ("outbound", True, True, False),
        ("outbound", True, True, True),
    }


# --- template_line ------------------------------------------------------------------------------

TEMPLATE = """\
{# a comment
    option clitcpak
#}
frontend {{ proxy.role }}
{% for l in proxy.listeners %}
    bind {{ l.bind_ip | hostport(l.port) }} id {{ loop.index }}
{% endfor %}
{{ proxy.name }}
    option clitcpak
"""


def test_a_config_line_is_traced_to_the_template_line_that_made_it():
    assert template_line(TEMPLATE, "    bind 0.0.0.0:5100 id 1") == 6
    assert template_line(TEMPLATE, "frontend inbound") == 4


def test_comments_and_lines_of_expressions_only_are_not_taken_for_the_line():
    assert template_line(TEMPLATE, "option clitcpak") == 9  # not the comment's line 2
    assert template_line(TEMPLATE, "something no line made") is None


# --- the check, with the real proxies -----------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_the_shipped_templates_pass(kind):
    preflight.check(backend_of(kind))


@pytest.mark.parametrize(
    ("kind", "old", "new", "words"),
    [
        ("haproxy", "option clitcpka", "option clitcpak", "unknown option 'clitcpak'"),
        ("stunnel", "TIMEOUTidle = 86400", "TIMEOUTidl = 86400", "Specified option name is not valid"),
    ],
)
def test_a_config_the_proxy_refuses_names_the_template_its_line_the_sample_and_the_proxys_words(
    tmp_path, kind, old, new, words
):
    templates = operator_templates(tmp_path)
    path = templates / backend_of(kind).template
    edit(path, old, new)
    line = [text.strip() for text in path.read_text().splitlines()].index(new) + 1
    with pytest.raises(ConfigError) as failed:
        preflight.check(backend_of(kind, templates))
    message = failed.value.message
    assert message.startswith(f"template {path}, line {line} (config line ")
    assert "rendered for an inbound session, 1 listener" in message
    assert words in message
    assert "\n" not in message


def test_a_template_that_breaks_only_with_a_rate_names_that_sample(tmp_path):
    templates = operator_templates(tmp_path)
    path = templates / "haproxy.cfg.j2"
    edit(
        path, "frontend {{ proxy.role }}\n", "frontend {{ proxy.role }}\n{{ 'bogus' if proxy.rate_bytes }}\n"
    )
    with pytest.raises(
        ConfigError, match="rendered for an inbound session with a rate, 2 listeners: HAProxy"
    ):
        preflight.check(backend_of("haproxy", templates))


def test_a_template_naming_a_missing_variable_names_the_template_its_line_and_the_variable(tmp_path):
    templates = operator_templates(tmp_path)
    path = templates / "haproxy.cfg.j2"
    edit(path, "proxy.num_conn + 256", "proxy.max_connections + 256")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "max_connections" in text)
    with pytest.raises(ConfigError) as failed:
        preflight.check(backend_of("haproxy", templates))
    assert failed.value.message == (
        f"template {path}, line {line}: does not render for an inbound session, 1 listener: "
        "'scistream.s2ds.render.ProxySpec object' has no attribute 'max_connections'"
    )


def test_a_template_that_is_not_valid_jinja_names_the_template_and_its_line(tmp_path):
    templates = operator_templates(tmp_path)
    path = templates / "stunnel.conf.j2"
    path.write_text("foreground = yes\n{% if proxy.front %\n")
    with pytest.raises(ConfigError, match=rf"^template {path}, line 2: not a valid template: "):
        preflight.check(backend_of("stunnel", templates))


def test_an_error_in_an_included_template_names_that_file(tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "haproxy.cfg.j2").write_text("global\n{% include 'site.j2' %}\n")
    (templates / "site.j2").write_text("    # site\n    maxconn {{ proxy.no_such_field }}\n")
    with pytest.raises(ConfigError, match=rf"^template {templates}/site.j2, line 2: does not render"):
        preflight.check(backend_of("haproxy", templates))


def test_an_unsafe_value_a_template_makes_is_refused_with_its_line(tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "haproxy.cfg.j2").write_text("global\n    log {{ proxy.name ~ ' # x' }}\n")
    with pytest.raises(ConfigError, match=r"line 2: does not render .*refusing to render unsafe value"):
        preflight.check(backend_of("haproxy", templates))


def test_the_check_uses_the_templates_it_is_given_not_the_backends(tmp_path):
    """As a reload does: the new templates are checked before the backend gets them."""
    templates = operator_templates(tmp_path)
    edit(templates / "haproxy.cfg.j2", "option clitcpka", "option clitcpak")
    backend = backend_of("haproxy")
    with pytest.raises(ConfigError, match="clitcpak"):
        preflight.check(backend, environment(templates, default_templates()))
    preflight.check(backend)  # its own still pass


def test_a_checked_template_is_kept_when_its_file_changes(tmp_path):
    """Edits take effect at a reload (a new environment), once checked; never by themselves."""
    templates = operator_templates(tmp_path)
    env = environment(templates, default_templates())
    backend = HaproxyBackend(env)
    preflight.check(backend)
    edit(templates / "haproxy.cfg.j2", "option clitcpka", "option clitcpak")
    preflight.check(backend)
    assert "clitcpak" not in render(samples(backend)[0].spec, SessionFiles(tmp_path), "haproxy.cfg.j2", env)
