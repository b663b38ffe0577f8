"""Chat formats, one per model family (as llama.cpp's common/chat.cpp keeps one handler per family):
how a chat enters the family's template, and how its output becomes content, reasoning and tool
calls, whole and streamed. A model's format is chosen once, from its chat template, by the first
entry of FORMATS that recognises it; Hermes tags are the fallback. A new family is one module and
one line here. A model without a chat template chats in one of the built-in conversation formats
instead (chat_formats.conversation: DialoGPT, a transcript, BlenderBot, T5).
"""

from __future__ import annotations

from services.inference.chat_formats.base import ChatFormat, OutputParser, Parsed, parse_whole
from services.inference.chat_formats.command_r7b import CommandR7BFormat
from services.inference.chat_formats.deepseek_dsml import DeepSeekDsmlFormat
from services.inference.chat_formats.deepseek_r1 import DeepSeekR1Format
from services.inference.chat_formats.deepseek_v3 import DeepSeekV3Format
from services.inference.chat_formats.firefunction import FireFunctionFormat
from services.inference.chat_formats.functionary import FunctionaryV31Format, FunctionaryV32Format
from services.inference.chat_formats.gemma import Gemma2Format, Gemma4Format
from services.inference.chat_formats.gpt_oss import GptOssFormat
from services.inference.chat_formats.granite import GraniteFormat
from services.inference.chat_formats.hermes import HermesFormat
from services.inference.chat_formats.kimi import KimiFormat
from services.inference.chat_formats.llama3 import Llama3Format
from services.inference.chat_formats.mistral import MistralFormat
from services.inference.chat_formats.phi import PhiFormat
from services.inference.chat_formats.qwen3_coder import Qwen3CoderFormat

# Most specific first: a template may mention another family's markers (Hermes 3 is a Llama 3.1).
FORMATS: list[type[ChatFormat]] = [
    GptOssFormat,
    KimiFormat,
    DeepSeekR1Format,
    DeepSeekV3Format,
    DeepSeekDsmlFormat,
    Qwen3CoderFormat,
    CommandR7BFormat,
    GraniteFormat,
    Gemma4Format,
    Gemma2Format,
    PhiFormat,
    FunctionaryV32Format,
    FunctionaryV31Format,
    FireFunctionFormat,
    MistralFormat,
    Llama3Format,
    HermesFormat,
]


def for_template(template: str) -> ChatFormat:
    """The format of the family whose template this is."""
    for family in FORMATS:
        if family.matches(template):
            return family(template)
    return HermesFormat(template)


__all__ = ["FORMATS", "ChatFormat", "OutputParser", "Parsed", "for_template", "parse_whole"]
