"""Wire formats of the external APIs, shared by inference (services.inference.metered, its one completion flow) and session (the Responses API)
answers: each adapter turns its API's JSON into the flow's request and the flow's output stream back
into its API's JSON and server-sent events. Nothing here generates, meters or caches."""
