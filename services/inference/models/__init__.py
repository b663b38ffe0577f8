"""What models there are and how they run: the catalogue and what is loaded (models.registry), the
hardware found and the engine settings chosen from it (models.hardware), a model's chat template
rendered as llama-server and transformers render it (models.chat_template), and the grammars and
tool prompts of structured output and tool calls (models.grammars)."""
