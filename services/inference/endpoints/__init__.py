"""The external HTTP APIs inference serves, one module each, from request bytes to response bytes:
OpenAI's chat completions (endpoints.chat_completions), legacy text completions
(endpoints.text_completions) and embeddings (endpoints.embeddings, which the Embed RPC shares), and
Anthropic's Messages API (endpoints.messages). Each renders its wire format (services.wire) around
the generation flow (services.inference.flow) and keeps only its own shapes; the servicer routes
to them."""
