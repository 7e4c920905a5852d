-- Argo CD health check for lorafleet.io BaseModel, FineTuneJob and AdapterDeployment (one script for the three).
-- Healthy: phase Ready (BaseModel, AdapterDeployment) or Succeeded (FineTuneJob).
-- Progressing: Pending, Running, Progressing, no status yet, or a spec change the operator has not seen yet.
-- Degraded: phase Failed or Degraded, or a Degraded condition that is True.
-- The message is the Ready condition's (the reason when it has none). Lua 5.1, as Argo CD's gopher-lua.
local hs = {}

local function condition(status, wanted)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the lorafleet operator to report a status"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the lorafleet operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
local ready = condition(status, "Ready")
local degraded = condition(status, "Degraded")
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  hs.message = ready.message
elseif ready ~= nil and ready.reason ~= nil then
  hs.message = ready.reason
else
  hs.message = "phase " .. phase
end

if phase == "Failed" or phase == "Degraded" or (degraded ~= nil and degraded.status == "True") then
  hs.status = "Degraded"
elseif phase == "Ready" or phase == "Succeeded" then
  hs.status = "Healthy"
else
  hs.status = "Progressing"
end
return hs
