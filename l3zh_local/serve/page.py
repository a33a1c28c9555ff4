"""The chat page served at ``/``: one self-contained HTML file (no build step, nothing fetched from elsewhere).

Like the seed project's Streamlit demo: a system prompt box, sampling controls, reset, streamed replies. Replies
are rendered as Markdown by building DOM nodes from text (never ``innerHTML``), so model output cannot inject
markup or script; the server also sends a Content-Security-Policy that allows only the page's own inline script.
Enter sends; while an input method is composing (pinyin), Enter picks the candidate instead.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def page_html() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
