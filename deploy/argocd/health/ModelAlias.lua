-- Argo CD health of a kubedistill.io/v1alpha1 ModelAlias, from its Ready and Progressing conditions:
-- Healthy when Ready=True and no swap is under way; Progressing while the operator resolves it or a new
-- model server is starting and the gateway is rolling; Degraded when nothing usable serves it, or when a
-- swap stopped (Progressing=False with a failure reason) and the old target still serves.
local hs = {}
local status = obj.status

local ready = nil
local progressing = nil
if status ~= nil and status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "Ready" then
      ready = c
    elseif c.type == "Progressing" then
      progressing = c
    end
  end
end

local function words(c, default)
  if c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return tostring(c.reason or default)
end

local function serving()
  if status.served ~= nil then
    for _, s in ipairs(status.served) do
      if s.role == "primary" then
        return "model=" .. tostring(status.endpoint and status.endpoint.model or obj.metadata.name) .. " via " .. tostring(s.deploymentId)
      end
    end
  end
  return tostring(status.ggufURI or status.adapterURI or status.model or "its target")
end

local generation = obj.metadata ~= nil and obj.metadata.generation or nil
local observed = status ~= nil and status.observedGeneration or nil
if ready == nil or (generation ~= nil and observed ~= nil and observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubedistill operator to resolve the alias"
elseif progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = words(progressing, "Progressing")
elseif progressing ~= nil and progressing.status == "False" and progressing.reason ~= "Complete" then
  hs.status = "Degraded"
  hs.message = words(progressing, "Progressing")
  if ready.status == "True" then
    hs.message = hs.message .. " (still serving " .. serving() .. ")"
  end
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "Serving " .. serving()
elseif ready.status == "False" then
  hs.status = "Degraded"
  hs.message = words(ready, "NotReady")
else
  hs.status = "Progressing"
  hs.message = (ready.message ~= nil and ready.message ~= "") and ready.message or "Resolving"
end
return hs
