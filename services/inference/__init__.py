"""Inference service: models and generation. The service's shell sits here (app, servicer, settings,
metrics); the external APIs in endpoints/ (OpenAI's chat and text completions and embeddings,
Anthropic's Messages), one generation's path in flow/ (metering, generation, fitting long chats,
work off the event loop), the model catalogue, hardware, chat templates and grammars in models/,
the engines with their scheduling in engines/ and the model families' chat formats in
chat_formats/."""
