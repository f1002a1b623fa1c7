-- Argo CD health of a federator.dev Federation (argocd-cm: resource.customizations.health.federator.dev_Federation).
-- Healthy when Succeeded; Degraded on the Degraded condition or when Failed; Progressing otherwise.
local hs = {status = "Progressing", message = "waiting for the operator"}
if obj.status == nil then
  return hs
end
local st = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and st.observedGeneration ~= nil and st.observedGeneration < generation then
  hs.message = "waiting for the operator to reconcile generation " .. tostring(generation)
  return hs
end
local progressing = nil
if st.conditions ~= nil then
  for _, c in ipairs(st.conditions) do
    if c.type == "Degraded" and c.status == "True" then
      hs.status = "Degraded"
      hs.message = (c.reason or "Degraded") .. ": " .. (c.message or "")
      return hs
    end
    if c.type == "Progressing" then
      progressing = c
    end
  end
end
if st.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = "the federation failed"
  return hs
end
if st.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "finished round " .. tostring(st.round) .. "/" .. tostring(st.rounds)
  return hs
end
if progressing ~= nil and progressing.message ~= nil and progressing.message ~= "" then
  hs.message = progressing.message
elseif st.phase ~= nil then
  hs.message = st.phase
end
return hs
