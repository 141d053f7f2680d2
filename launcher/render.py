"""The Jinja2 environment for job scripts, and the filters that keep values safe.

Templates hold the text; the backends compute every value they show. Anything that
reaches a shell goes through `sh` (POSIX single quotes); `#SBATCH` lines are not parsed by
a shell, so their values must be plain words (`sbatch_word` refuses anything else).
"""

from __future__ import annotations

import functools
import re
import shlex

import jinja2

from launcher.errors import UserError
from launcher.resources import resource_dir


def shell_quote(value) -> str:
    return shlex.quote(str(value))


def sbatch_word(value) -> str:
    text = str(value)
    if not re.fullmatch(r"[A-Za-z0-9_./:%@=,+-]+", text):
        raise UserError(f"'{text}' cannot be written on an #SBATCH line: use only letters, digits and ._/:%@=,+-")
    return text


def rfc1123_name(text: str, max_length: int = 63) -> str:
    """A lower-case DNS label (RFC 1123, also a valid RFC 1035 label: it starts with a letter)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = "job-" + name
    return name[:max_length].rstrip("-")


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["sh"] = shell_quote
    env.filters["sbatch"] = sbatch_word
    return env


def render_template(name: str, **values) -> str:
    return environment().get_template(name).render(**values)
