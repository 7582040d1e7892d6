"""The gradio web demo: an interleaved-composition tab and a multimodal chat tab.

`web_demo.py` parses the command line and calls `launch`; `app` holds the shared state and helpers,
`compose_tab` and `chat_tab` one tab each, `blocks` the page."""
from .app import (CHAT_DEFAULTS, COMPOSE_DEFAULTS, DEMO_BANNER, ChatSession, ComposeSession, DemoApp, UserError,
                  article_dir, describe_error, session_dir, session_key)
from .blocks import build_app, launch

__all__ = ["CHAT_DEFAULTS", "COMPOSE_DEFAULTS", "DEMO_BANNER", "ChatSession", "ComposeSession", "DemoApp", "UserError",
           "article_dir", "describe_error", "session_dir", "session_key", "build_app", "launch"]
