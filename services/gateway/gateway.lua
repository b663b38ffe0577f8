-- Parley's gateway filter (Envoy's Lua HTTP filter): health of the upstream services, request
-- checks before transcoding, and errors in OpenAI's and Anthropic's shapes on their paths.
-- services/gateway/envoy_config.py fills in each dollar-brace placeholder from its settings.
local CLUSTERS = {${CLUSTERS_LIST}}
-- Paths whose errors take OpenAI's shape (OPENAI_PATH_PREFIXES).
local OPENAI_PREFIXES = {${OPENAI_PREFIX_LIST}}
-- Paths whose errors take Anthropic's shape (ANTHROPIC_PATH_PREFIXES), and its error types by status.
local ANTHROPIC_PREFIXES = {${ANTHROPIC_PREFIX_LIST}}
local ANTHROPIC_TYPES = {${ANTHROPIC_TYPE_TABLE}}
-- A grpc.health.v1 HealthCheckRequest for the whole server: an empty message, gRPC-framed.
local HEALTH_REQUEST = "\0\0\0\0\0"
-- No id or page token comes near this; gRPC allows 8 KiB of metadata, the path included.
local MAX_PATH_BYTES = 4096
-- PARLEY_MAX_REQUEST_BYTES: checked before anything reads the body (Envoy's buffers stop there too).
local MAX_BODY_BYTES = ${MAX_BODY_BYTES_VALUE}
-- OpenAI error types by HTTP status, for the OpenAI-compatible paths.
local OPENAI_TYPES = {["400"] = "invalid_request_error", ["401"] = "authentication_error",
  ["403"] = "permission_error", ["404"] = "not_found_error", ["409"] = "conflict_error",
  ["413"] = "invalid_request_error", ["429"] = "rate_limit_error"}

local function healthz(handle)
  local unhealthy = {}
  for _, cluster in ipairs(CLUSTERS) do
    local headers, body = handle:httpCall(cluster, {
      [":method"] = "POST",
      [":path"] = "/grpc.health.v1.Health/Check",
      [":authority"] = cluster,
      ["content-type"] = "application/grpc",
      ["te"] = "trailers",
    }, HEALTH_REQUEST, 1000)
    -- SERVING is status = 1: the message bytes 0x08 0x01 at the end of the frame.
    if headers == nil or headers[":status"] ~= "200" or body == nil or string.sub(body, -2) ~= "\8\1" then
      table.insert(unhealthy, '"' .. cluster .. '"')
    end
  end
  local headers = {["content-type"] = "application/json", ["cache-control"] = "no-store"}
  if #unhealthy == 0 then
    headers[":status"] = "200"
    handle:respond(headers, '{"status":"SERVING"}')
  else
    headers[":status"] = "503"
    handle:respond(headers, '{"status":"NOT_SERVING","unhealthy":[' .. table.concat(unhealthy, ",") .. ']}')
  end
end

-- gRPC fails a whole call (INTERNAL, a 500) on a metadata key outside 0-9 a-z _ - ., on a "-bin"
-- value that is not base64 and on a malformed grpc-timeout or an unknown grpc-encoding; HTTP allows
-- all of these. A REST request's headers become the gRPC call's metadata, and no such header means
-- anything to Parley: they are dropped (native gRPC calls pass untouched).
local function drop_headers_grpc_refuses(headers)
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) == 1 then
    return
  end
  local refused = {}
  for key, value in pairs(headers) do
    if string.sub(key, 1, 1) ~= ":" then
      if string.find(key, "[^0-9a-z_.%-]")
          or (string.sub(key, -4) == "-bin" and string.find(value, "^[A-Za-z0-9+/_%-]*=*$") == nil)
          or (key == "grpc-timeout" and string.find(value, "^%d%d?%d?%d?%d?%d?%d?%d?[HMSmun]$") == nil)
          or key == "grpc-encoding" then
        table.insert(refused, key)
      end
    end
  end
  for _, key in ipairs(refused) do
    headers:remove(key)
  end
end

local function starts_with_any(path, prefixes)
  for _, prefix in ipairs(prefixes) do
    if string.find(path, prefix, 1, true) == 1 then
      return true
    end
  end
  return false
end

-- Whose error shape a path's errors take: "anthropic", "openai" or nil (the native one).
local function wire_of(headers, path)
  if starts_with_any(path, ANTHROPIC_PREFIXES) then
    return "anthropic"
  elseif starts_with_any(path, OPENAI_PREFIXES) then
    return headers:get("${ANTHROPIC_VERSION_HEADER}") and "anthropic" or "openai"
  end
  return nil
end

-- An error body in `wire`'s shape; `message` is JSON text (a quoted string), `reason` a finer
-- OpenAI type (or nil); Anthropic's types go by status alone.
local function error_body(wire, status, message, reason)
  if wire == "anthropic" then
    return '{"type":"error","error":{"type":"' .. (ANTHROPIC_TYPES[status] or "api_error") .. '","message":'
      .. message .. '}}'
  end
  local kind = reason or OPENAI_TYPES[status] or "server_error"
  return '{"error":{"message":' .. message .. ',"type":"' .. kind .. '","param":null,"code":"' .. kind .. '"}}'
end

function envoy_on_request(handle)
  drop_headers_grpc_refuses(handle:headers())
  local path = handle:headers():get(":path") or ""
  if #path > MAX_PATH_BYTES then
    -- Longer paths overflow gRPC's metadata limit upstream (a random 429 without Retry-After).
    handle:respond({[":status"] = "414", ["content-type"] = "application/json", ["cache-control"] = "no-store"},
      '{"code":3,"message":"the URL is longer than ' .. MAX_PATH_BYTES .. ' bytes","details":[]}')
    return
  end
  local length = tonumber(handle:headers():get("content-length") or "0") or 0
  if length > MAX_BODY_BYTES then
    -- Refused from the header, before Envoy transcodes or buffers the body.
    local message = '"the request body is larger than the gateway accepts: ' .. length .. ' bytes, at most '
      .. MAX_BODY_BYTES .. ' (PARLEY_MAX_REQUEST_BYTES)"'
    local wire = wire_of(handle:headers(), path)
    local body = wire and error_body(wire, "413", message) or ('{"code":3,"message":' .. message .. ',"details":[]}')
    handle:respond({[":status"] = "413", ["content-type"] = "application/json", ["cache-control"] = "no-store"}, body)
    return
  end
  if path == "/healthz" then
    healthz(handle)
    return
  end
  local wire = wire_of(handle:headers(), path)
  if wire then
    handle:streamInfo():dynamicMetadata():set("parley", "wire", wire)
  end
  local query = string.find(path, "?", 1, true)
  if query and starts_with_any(path, ANTHROPIC_PREFIXES) then
    -- Anthropic's clients add ?beta=true; no field takes it, and the transcoder answers an unknown
    -- query parameter with a 404.
    handle:headers():replace(":path", string.sub(path, 1, query - 1))
  end
end

-- Errors on OpenAI-compatible paths take OpenAI's shape: {"error": {"message", "type", "param", "code"}};
-- on Anthropic's, Anthropic's: {"type": "error", "error": {"type", "message"}}.
-- Only error responses are buffered; successful streams pass untouched.
function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get("parley")
  local wire = meta and meta["wire"]
  if wire == nil then
    return
  end
  local status = handle:headers():get(":status") or "200"
  if tonumber(status) < 400 then
    return
  end
  local body = handle:body()
  local text = body and body:getBytes(0, body:length()) or ""
  local message = status == "413" and '"the request body is larger than the gateway accepts"' or '"request failed"'
  local start = string.find(text, '"message":', 1, true)
  if start then
    local rest = string.sub(text, start + 10)
    local stop = string.find(rest, ',"details":', 1, true)
    if stop then
      message = string.sub(rest, 1, stop - 1)
    else
      message = (string.gsub(rest, "}%s*$", ""))
    end
  end
  if message == '""' then
    -- Some of Envoy's own replies come without words.
    message = status == "404" and '"not found"' or '"request failed"'
  end
  -- A finer reason from the service (ParleyError.reason, e.g. insufficient_quota for a used-up
  -- token budget) is OpenAI's type and code for it.
  local reason = handle:headers():get("parley-reason")
  if reason ~= nil and string.find(reason, "^[a-z_]+$") == nil then
    reason = nil
  end
  local rewritten = error_body(wire, status, message, reason)
  if body then
    body:setBytes(rewritten)
  end
  handle:headers():replace("content-type", "application/json")
end
