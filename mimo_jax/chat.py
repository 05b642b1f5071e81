"""Chat templates: a hub directory's jinja2 template, rendered as transformers renders it.

A hub tokenizer directory keeps its chat template in ``chat_template.jinja`` or in the
``chat_template`` field of ``tokenizer_config.json`` (a string, or a list of named templates);
the file wins when both exist, as in transformers. ``ChatTemplate.render`` returns the text of
transformers' ``tokenizer.apply_chat_template(messages, tokenize=False, ...)``:

* the same jinja2 environment: sandboxed (templates come from the hub and are untrusted code),
  ``trim_blocks`` and ``lstrip_blocks`` (so a template's line breaks and indentation around
  ``{% %}`` tags vanish), the ``loopcontrols`` extension (``{% break %}``), a ``tojson`` filter
  that does not escape HTML and keeps non-ASCII text, and the globals ``raise_exception`` and
  ``strftime_now``; a ``{% generation %}`` block renders its body unchanged;
* the same variables: ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the
  tokenizer's named special tokens (``bos_token``, ``eos_token``, ...) and every extra keyword,
  such as ``enable_thinking``, which overrides a special token of the same name;
* the same message clean-up: keys whose value is None are dropped, and a reasoning trace given
  as ``reasoning_content``, ``thinking`` or ``reasoning`` is visible under the first two names.

Not covered: transformers' assistant-token masks, ``continue_final_message``, tools given as
Python functions (pass their JSON schemas), and the named templates under
``additional_chat_templates/``. ``encode`` tokenizes the rendered text without adding BOS/EOS,
as ``apply_chat_template(tokenize=True)`` does: the template writes every special token itself.
"""

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from mimo_jax.data import HFTokenizer

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
# Names a message's reasoning trace goes by; templates read the first (and gpt-oss's the second).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML, which would change the prompt's text.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's tokens for transformers'
    training masks; rendering keeps its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _environment() -> jinja2.Environment:
    """The jinja2 environment transformers compiles chat templates in."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _clean_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Drops None values; exposes a reasoning trace under every name templates read."""
    if not isinstance(message, Mapping):
        raise TypeError(f"a chat message must be a dict, got {message!r}")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class ChatTemplate:
    """A chat template bound to its tokenizer.

    Args:
      templates: the jinja2 source, or ``{name: source}`` with a ``"default"`` entry (and
        optionally ``"tool_use"``, picked when tools are given).
      tokenizer: encodes the rendered text; its ``special_tokens`` are template variables.
      source: where the template came from, for error messages.
    """

    def __init__(
        self,
        templates: str | Mapping[str, str],
        tokenizer: HFTokenizer,
        source: str = "<string>",
    ):
        named = {"default": templates} if isinstance(templates, str) else dict(templates)
        if "default" not in named:
            raise ValueError(f"{source}: several chat templates {sorted(named)}, none 'default'")
        env = _environment()
        self.templates = {name: env.from_string(t) for name, t in named.items()}
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, directory: str) -> "ChatTemplate":
        """The template and tokenizer of a hub directory (``HFTokenizer.from_dir``).

        Args:
          directory: holds ``tokenizer.json`` and ``tokenizer_config.json`` (whose
            ``chat_template`` is used unless ``chat_template.jinja`` exists).

        Returns:
          The chat template. A directory without a template or without ``tokenizer.json`` is a
          ValueError naming the missing file.
        """
        config_path = os.path.join(directory, CONFIG_FILE)
        file_path = os.path.join(directory, TEMPLATE_FILE)
        if os.path.exists(file_path):
            with open(file_path, encoding="utf-8") as f:
                templates, source = f.read(), file_path
        else:
            config = {}
            if os.path.exists(config_path):
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            templates, source = config.get("chat_template"), config_path
            if isinstance(templates, list):  # [{"name": ..., "template": ...}, ...]
                templates = {t["name"]: t["template"] for t in templates}
        if not templates:
            missing = f"{config_path} has no 'chat_template' and {file_path} does not exist"
            raise ValueError(f"no chat template: {missing}")
        if not os.path.exists(os.path.join(directory, "tokenizer.json")):
            raise ValueError(
                f"a chat template needs its tokenizer: {directory} has no tokenizer.json"
            )
        return cls(templates, HFTokenizer.from_dir(directory), source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs,
    ) -> str:
        """The prompt text of a conversation.

        Args:
          messages: ``[{"role": "user", "content": "..."}, ...]``.
          add_generation_prompt: end with the header that opens the assistant's reply.
          tools: JSON schemas of callable tools, or None.
          documents: retrieval documents (dicts), or None.
          **kwargs: extra template variables, e.g. ``enable_thinking=False``.

        Returns:
          The rendered text. A template's ``raise_exception`` (e.g. on an unknown role) raises
          ``jinja2.exceptions.TemplateError``.
        """
        if not messages:
            raise ValueError("cannot render an empty conversation")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TypeError("tools must be JSON schemas (dicts)")
        name = "tool_use" if tools is not None and "tool_use" in self.templates else "default"
        variables = {**self.tokenizer.special_tokens, **kwargs}
        return self.templates[name].render(
            messages=[_clean_message(m) for m in messages],
            tools=None if tools is None else [dict(t) for t in tools],
            documents=None if documents is None else [dict(d) for d in documents],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    def encode(self, messages: Sequence[Mapping[str, Any]], **kwargs) -> list[int]:
        """Token ids of ``render(messages, **kwargs)`` (no BOS/EOS added: the template writes
        its special tokens itself)."""
        return [int(i) for i in self.tokenizer.encode(self.render(messages, **kwargs))]
