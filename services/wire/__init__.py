"""Wire formats of the external APIs (OpenAI chat and text completions, Responses, Anthropic Messages),
shared by inference (its one completion flow, services.inference.flow.metered) and session (the Responses
API): each adapter turns its API's JSON into the flow's request, and the flow's output stream back
into its API's JSON and server-sent events. Nothing here generates, meters or caches."""
