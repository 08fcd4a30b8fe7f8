-- Argo CD health of a kubedistill.io/v1alpha1 ModelAlias: Healthy when Ready=True, Degraded when
-- Ready=False (the alias points at nothing usable), Progressing until the operator has resolved it.
local hs = {}
local status = obj.status

local ready = nil
if status ~= nil and status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "Ready" then
      ready = c
    end
  end
end

local generation = obj.metadata ~= nil and obj.metadata.generation or nil
local observed = status ~= nil and status.observedGeneration or nil
if ready == nil or (generation ~= nil and observed ~= nil and observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubedistill operator to resolve the alias"
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "Serving " .. tostring(status.ggufURI or status.adapterURI or status.model or "its target")
elseif ready.status == "False" then
  hs.status = "Degraded"
  hs.message = (ready.message ~= nil and ready.message ~= "") and ready.message or tostring(ready.reason)
else
  hs.status = "Progressing"
  hs.message = (ready.message ~= nil and ready.message ~= "") and ready.message or "Resolving"
end
return hs
