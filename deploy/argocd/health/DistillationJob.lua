-- Argo CD health of a kubedistill.io/v1alpha1 DistillationJob.
-- Healthy once Succeeded, Degraded on Failed (with the failing condition's message), Suspended while
-- spec.suspend holds, Progressing for everything in between: a job is a batch run, so "still
-- working" is the normal state of a freshly synced one, not a fault.
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function failure_message(status)
  for _, kind in ipairs({"Failed", "Complete", "Ready"}) do
    local c = condition(status, kind)
    if c ~= nil and c.message ~= nil and c.message ~= "" and (kind == "Failed") == (c.status == "True") then
      return c.message
    end
  end
  if status.stages ~= nil then
    for _, s in ipairs(status.stages) do
      if s.state == "Failed" and s.message ~= nil and s.message ~= "" then
        return s.name .. ": " .. s.message
      end
    end
  end
  return "The distillation job failed"
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubedistill operator"
  return hs
end

local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Distillation succeeded"
  if status.metrics ~= nil and status.metrics.evalScore ~= nil then
    hs.message = hs.message .. string.format(" (eval score %.3f)", status.metrics.evalScore)
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = failure_message(status)
elseif phase == "Suspended" or (obj.spec ~= nil and obj.spec.suspend == true) then
  hs.status = "Suspended"
  hs.message = "Suspended (spec.suspend is true)"
else
  hs.status = "Progressing"
  hs.message = phase
  if status.progress ~= nil and status.progress.percent ~= nil then
    hs.message = hs.message .. string.format(" (%.0f%%)", status.progress.percent)
  end
end
return hs
