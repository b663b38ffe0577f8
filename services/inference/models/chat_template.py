"""A model's chat template, rendered the way llama-server and transformers render it, and adapted to
ordinary OpenAI input where the template's own rules would refuse it.

Rendering: Jinja in a sandbox with transformers' extensions (`{% generation %}` passes through,
loop controls, `tojson` without ASCII escapes, `raise_exception`, `strftime_now`). The template
gets `tools` only when the request offers some (Hermes 3's template fails on `tools=None`), the
request's chat_template_kwargs, `enable_thinking` (true unless the request turns thinking off) and
`reasoning_effort` when given.

Adaptations, probed once per template as llama.cpp's common/chat.cpp does: a template without a
system role (Gemma) gets the system message folded into the first user turn. An exception the
template raises on its input (its `raise_exception`, or a Jinja error) is INVALID_ARGUMENT naming the
template's message: the client's chat does not fit this model, the server did not fail.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from services.core.errors import InvalidArgument
from services.core.structured import TemplateOptions
from services.inference.chat_formats import ChatFormat, conversation, for_template

# The last-resort template when a model carries none (ChatML).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROBE = "\x1fprobe\x1f"  # a text no template writes by itself


class TemplateError(Exception):
    """The template cannot be used at all (it does not parse)."""


class _Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}…{% endgeneration %}`: marks assistant text; renders as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys,
                      default=_json_default)


def _json_default(value: Any) -> Any:
    """What Jinja's filters hand tojson besides plain data: `map(...)` gives a generator."""
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _raise(message: str) -> None:
    raise ValueError(message)


def _now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    """One model's template, its family's chat format, and what the template can take."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "",
                 format: ChatFormat | None = None) -> None:
        self.source = source or CHATML
        # Sandboxed, but lists the template builds may grow (Kimi K2's `.append`, as llama.cpp's own
        # Jinja engine allows); the messages it reads are copies.
        environment = jinja2.sandbox.SandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
        environment.filters["tojson"] = _tojson
        try:
            self._template = environment.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template does not parse: {exc}") from exc
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}
        self.format: ChatFormat = format or for_template(self.source)
        self.system_role = self._takes_system_role()

    @property
    def native_tools(self) -> bool:
        return self.format.native_tools

    def _takes_system_role(self) -> bool:
        try:
            text = self._render([{"role": "system", "content": PROBE}, {"role": "user", "content": "hi"}], True, None,
                                {})
        except Exception:  # noqa: BLE001 - whatever the template trips on, it has no system role
            return False
        return PROBE in text

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None, variables: dict[str, Any]) -> str:
        context: dict[str, Any] = {**variables, **self._tokens, "messages": messages,
                                   "add_generation_prompt": add_generation_prompt,
                                   "raise_exception": _raise, "strftime_now": _now}
        if tools:
            context["tools"] = tools
        return self._template.render(**context)

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, options: TemplateOptions | None = None) -> str:
        chat = self.format.template_messages(messages)
        if not self.system_role:
            chat = fold_system(chat)
        options = options or TemplateOptions()
        try:
            prompt = self._render(chat, add_generation_prompt, tools, options.variables())
        except Exception as exc:  # noqa: BLE001 - the model's code on the client's input
            # ValueError: the template's raise_exception(); anything else: the template tripping on input
            # it did not expect (a Jinja error, a TypeError, a ZeroDivisionError...). Either way the chat
            # does not fit this model's template: a 400 naming it, never a 500.
            raise InvalidArgument(f"the chat does not fit the model's chat template: {exc}") from exc
        thinking = self.format.thinking
        if add_generation_prompt and not options.thinking and thinking and prompt.rstrip().endswith(thinking[0]):
            # A template that opens the reasoning block whatever it is told (QwQ, DeepSeek-R1 distills):
            # thinking off closes it, as Qwen3's own template does for enable_thinking=false.
            prompt = f"{prompt.rstrip()}\n\n{thinking[1]}\n\n"
        return prompt

    @functools.lru_cache(maxsize=32)  # noqa: B019 - one template per loaded model, few option sets
    def thinking_open(self, options: TemplateOptions = TemplateOptions()) -> bool:
        """Whether the generation prompt opens the reasoning block (QwQ, DeepSeek-R1 distills), so
        the answer starts inside it."""
        if self.format.thinking is None:
            return False
        try:
            prompt = self.render([{"role": "user", "content": "hi"}], True, None, options)
        except InvalidArgument:
            return False
        return prompt.rstrip().endswith(self.format.thinking[0])


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System messages folded into the next user turn, for a template without a system role (as
    llama-server adapts them): the instructions stay, in the first place the template accepts."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for message in messages:
        if message.get("role") == "system":
            pending.append(message.get("content") or "")
            continue
        if pending and message.get("role") == "user":
            message = {**message, "content": "\n\n".join([*pending, message.get("content") or ""])}
            pending = []
        out.append(message)
    if pending:  # no user turn after them: they become one
        out.append({"role": "user", "content": "\n\n".join(pending)})
    return out


def template_source(params: dict[str, Any]) -> str | None:
    """The catalogue entry's own template (`params.chat_template`: a Jinja file's path, or the
    template's text inline), to use instead of the one the weights carry; None when it names none.
    A file that cannot be read stops the load with its reason."""
    given = params.get("chat_template")
    if not given:
        return None
    if not isinstance(given, str):
        raise TemplateError("params.chat_template must be a file path or the template's text")
    if "{{" in given or "{%" in given:
        return given
    try:
        with open(given, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise TemplateError(f"params.chat_template: cannot read {given}: {exc.strerror}") from exc


def model_template(params: dict[str, Any], own: str | None, fallback: ChatFormat | None,
                   bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """The template a model chats with: the catalogue entry's `params.chat_template`, else its
    `params.chat_format` (a built-in conversation format, services.inference.chat_formats.conversation),
    else the template the weights carry (`own`), else `fallback` (a format chosen from the model;
    None: ChatML). A setting that names nothing usable stops the load with its reason."""
    chosen: ChatFormat | None = fallback
    source = template_source(params)
    if source:
        return ChatTemplate(source, bos_token, eos_token)
    if params.get("chat_format"):
        try:
            chosen = conversation.named(params["chat_format"])
        except ValueError as exc:
            raise TemplateError(str(exc)) from None
    elif own:
        return ChatTemplate(own, bos_token, eos_token)
    return ChatTemplate(chosen.template if chosen else None, bos_token, eos_token, format=chosen)
