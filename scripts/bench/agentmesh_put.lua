-- wrk script: agentmesh kv puts, a fresh key per request, 256-byte values
-- (a JSON string of 254 characters plus its quotes).
local counter = 0
local body = '"' .. string.rep("v", 254) .. '"'
local thread_id = 0

function setup(thread)
  thread:set("thread_id", thread_id)
  thread_id = thread_id + 1
end

function request()
  counter = counter + 1
  local path = "/v1/kv/bench/" .. thread_id .. "/" .. counter
  return wrk.format("PUT", path, { ["Content-Type"] = "application/json" }, body)
end
