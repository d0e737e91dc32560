-- Lua peer for tether's HTTP interop tests, on Debian's lua-http (Lua 5.3).
--
-- SERVER  lua5.3 http-peer.lua server [CERT KEY [ALPN]]
--   Listens on 127.0.0.1 (ephemeral port) for HTTP/1.1 and HTTP/2 (prior knowledge) and
--   prints {"ready":true,"port":N}. With CERT and KEY (PEM files) it serves TLS only, with
--   that certificate, choosing by ALPN the client's first of h2 and http/1.1, or only
--   http/1.1 when ALPN is 1.1. Every request is answered 200 with header
--   x-peer: lua-http and body "lua <method> <path> <request body>".
--
-- CLIENT  lua5.3 http-peer.lua client URL VERSION COUNT
--   Makes COUNT POST requests (body "hello <i>") to URL with HTTP VERSION (1.1 or 2; over
--   https:// the server certificate is not verified), and
--   prints one JSON line per response: {"status":S,"version":V,"body":B,"peer":P}.
--   Fatal errors print {"fatal":MESSAGE} and exit 1.
--
-- GET  lua5.3 http-peer.lua get URL VERSION
--   One GET of URL with HTTP VERSION (1.1 or 2; https:// unverified, as above); prints
--   {"status":S,"version":V,"body":B,"type":CONTENT_TYPE}.

local http_server = require "http.server"
local http_headers = require "http.headers"
local http_request = require "http.request"

local function json_string(s)
  return '"' .. tostring(s):gsub('[%c"\\]', function(c)
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

local mode = arg[1]

-- A TLS context with the given PEM certificate and key; ALPN picks the client's first
-- protocol we speak.
local function tls_context(cert_file, key_file, only_http1)
  local read = function(path)
    local f = assert(io.open(path, "rb"))
    local text = f:read("a")
    f:close()
    return text
  end
  local ctx = require "http.tls".new_server_context()
  assert(ctx:setCertificate(require "openssl.x509".new(read(cert_file), "PEM")))
  assert(ctx:setPrivateKey(require "openssl.pkey".new(read(key_file), "PEM")))
  ctx:setAlpnSelect(function(_, protos)
    for _, proto in ipairs(protos) do
      if proto == "http/1.1" or (proto == "h2" and not only_http1) then return proto end
    end
    return nil
  end)
  return ctx
end

if mode == "server" then
  local ctx, tls = nil, false
  if arg[2] then
    ctx, tls = tls_context(arg[2], arg[3], arg[4] == "1.1"), true
  end
  local server = assert(http_server.listen {
    host = "127.0.0.1",
    port = 0,
    tls = tls,
    ctx = ctx,
    onstream = function(_, stream)
      local req = assert(stream:get_headers())
      local body = stream:get_body_as_string() or ""
      local res = http_headers.new()
      res:append(":status", "200")
      res:append("content-type", "text/plain")
      res:append("x-peer", "lua-http")
      assert(stream:write_headers(res, false))
      assert(stream:write_chunk(string.format("lua %s %s %s",
        req:get(":method"), req:get(":path"), body), true))
    end,
    onerror = function(_, context, op, err)
      io.stderr:write(string.format("lua server error: %s %s %s\n", tostring(context), tostring(op), tostring(err)))
    end,
  })
  assert(server:listen())
  local _, _, port = server:localname()
  io.stdout:write(string.format('{"ready":true,"port":%d}\n', port))
  io.stdout:flush()
  assert(server:loop())
elseif mode == "client" then
  local url, version, count = arg[2], tonumber(arg[3] or "1.1"), tonumber(arg[4] or "1")
  for i = 1, count do
    local req = http_request.new_from_uri(url)
    req.version = version
    if url:match("^https:") then
      -- The tests' throwaway certificate is self-signed.
      local ctx = require "http.tls".new_client_context()
      ctx:setVerify(require "openssl.ssl.context".VERIFY_NONE)
      req.ctx = ctx
    end
    req.headers:upsert(":method", "POST")
    req:set_body("hello " .. i)
    local headers, stream = req:go(10)
    if not headers then
      io.stdout:write('{"fatal":' .. json_string(stream) .. '}\n')
      os.exit(1)
    end
    local body = assert(stream:get_body_as_string())
    io.stdout:write(string.format('{"status":%s,"version":%s,"body":%s,"peer":%s}\n',
      headers:get(":status"), json_string(stream.connection.version), json_string(body),
      json_string(headers:get("x-peer") or "")))
    io.stdout:flush()
  end
elseif mode == "get" then
  local url, version = arg[2], tonumber(arg[3] or "1.1")
  local req = http_request.new_from_uri(url)
  req.version = version
  if url:match("^https:") then
    local ctx = require "http.tls".new_client_context()
    ctx:setVerify(require "openssl.ssl.context".VERIFY_NONE)
    req.ctx = ctx
  end
  local headers, stream = req:go(10)
  if not headers then
    io.stdout:write('{"fatal":' .. json_string(stream) .. '}\n')
    os.exit(1)
  end
  local body = assert(stream:get_body_as_string())
  io.stdout:write(string.format('{"status":%s,"version":%s,"body":%s,"type":%s}\n',
    headers:get(":status"), json_string(stream.connection.version), json_string(body),
    json_string(headers:get("content-type") or "")))
  io.stdout:flush()
else
  io.stderr:write("usage: lua5.3 http-peer.lua server [CERT KEY [ALPN]] | client URL VERSION COUNT | get URL VERSION\n")
  os.exit(2)
end
