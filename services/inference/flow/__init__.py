"""One generation's path, the same for every way in: the metered completion (flow.metered: rate
limit, response cache, generation, usage) above one generation from request to last chunk
(flow.service: validate, resolve the model, hand the engine its request, span and metrics), the
part of a long chat that fits a model's context window (flow.fitting), and a request's blocking
work run off the event loop, stopped when the request is (flow.offloop)."""
