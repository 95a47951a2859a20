"""A model's answer on the page: its Markdown, with nothing the browser would fetch.

The Chatbot renders answers as Markdown and keeps sanitized HTML, so an answer holding
``![x](https://tracker/p.png)`` or ``<img src=https://tracker/p.png>`` made the reader's
browser fetch that address (telling a third party who read it, and when). :func:`shown`
puts a Markdown backslash before ``![`` and before ``<`` that would open a tag, outside
code spans and fenced blocks, so both appear as typed; :func:`as_typed` takes those
backslashes out again, for an answer the user edits in place. (An answer that itself held
``!\\[`` or ``\\<`` outside code comes back from an edit without that backslash.) The
page's Content-Security-Policy (ui.server) stops other-site images whatever the markup.
"""

from __future__ import annotations

import re

# Fenced blocks (to their end, or the end of a still-streaming answer) and code spans:
# Markdown shows these literally already, and a backslash there would show.
CODE = re.compile(r"(```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]*`)", re.S)
ACTIVE = re.compile(r"!\[|<(?=[A-Za-z/!?])")
ESCAPED = re.compile(r"!\\\[|\\<(?=[A-Za-z/!?])")


def _outside_code(text: str, pattern: re.Pattern, repl) -> str:
    parts = CODE.split(text or "")
    parts[::2] = [pattern.sub(repl, p) for p in parts[::2]]
    return "".join(parts)


def shown(text: str) -> str:
    """``text`` as Markdown that shows images and HTML tags as typed."""
    return _outside_code(text, ACTIVE, lambda m: "!\\[" if m.group() == "![" else "\\<")


def as_typed(text: str) -> str:
    """The inverse of :func:`shown`."""
    return _outside_code(text, ESCAPED, lambda m: "![" if m.group().startswith("!") else "<")
