"""Wire formats of the external APIs that Parley's one completion flow (services.inference.metered)
answers: each adapter turns its API's JSON into the flow's request and the flow's output stream back
into its API's JSON and server-sent events. Nothing here generates, meters or caches."""
